"""Triton forward kernel for APB attention over keys ``[passing | anchor | local]``.

The mask (DESIGN.md) reduces to one rule per query row ``i`` (``i`` counts ``[anchor | local]`` queries):
row ``i`` sees keys ``[lo(i), num_passing + i]`` with ``lo(i) = num_passing`` for anchor rows
(``i < num_anchor``) and ``lo(i) = 0`` for local rows. So it is a causal mask shifted by ``num_passing``
whose anchor rows skip the passing prefix. Per query tile ``[m0, m0 + BLOCK_M)`` the kernel runs:

1. unmasked key tiles ``[lo, lo + k * BLOCK_N)`` that end at or before key ``num_passing + m0``
   (visible to every row of the tile),
2. masked key tiles from there up to ``num_passing + m0 + BLOCK_M`` (the partial diagonal), and
3. only for the single tile that holds both anchor and local rows: the passing keys, masked by row kind.

Every other key tile is fully masked and never loaded. Softmax is the online (FlashAttention-2) kind in
base 2 with the scale folded into ``log2(e)``; lse comes out in natural log.

Tried on an H200 with Triton 3.6 and removed (benchmarks/RESULTS.md, "Kernel"): one masked key loop fed by
TMA, with ``warp_specialize`` (Triton's Hopper producer/consumer pass) and with a persistent grid. The
warp-specialized forms did not finish compiling within 75 s, and nothing measured beat this kernel; the
faster APB attention on Hopper is FlashAttention-4 (`apb.kernels.flash4`, the ``flash`` backend).
"""

from __future__ import annotations

import logging
import math
import os

import torch
from apb.kernels.reference import check_shapes

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
    import triton.testing

    HAS_TRITON = True
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - triton < 3.4
        TensorDescriptor = None
except ImportError:  # pragma: no cover - triton is optional (CPU installs without it use the reference)
    HAS_TRITON = False

_LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
# Whether CUDA GPUs of compute capability >= 9 load K/V through TMA descriptors by default
# (APB_TRITON_TMA=0/1 overrides); set from the H100 measurements in benchmarks/RESULTS.md.
USE_TMA_ON_HOPPER = True

if HAS_TRITON:

    @triton.jit(
        do_not_specialize=[
            "num_queries",
            "num_keys",
            "num_passing",
            "num_anchor",
            "causal_shift",
            "len_bucket",
        ],
    )
    def _apb_fwd_kernel(
        Q,
        K,
        V,
        Out,
        Lse,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_ob,
        stride_oh,
        stride_om,
        num_heads,
        num_queries,
        num_keys,
        num_passing,
        num_anchor,
        causal_shift,  # rows see `causal_shift` more keys past their diagonal (decoding: all keys); 0 for APB
        len_bucket,  # autotune key only: a coarse bucket of num_queries, so new lengths reuse configs
        qk_scale,  # softmax_scale * log2(e)
        GROUP: tl.constexpr,
        USE_TMA: tl.constexpr,  # K, V are host TensorDescriptors over [batch * kv_heads * keys, head_dim]
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        # Heaviest query tiles (the last local rows see the most keys) are launched first.
        tile_m = tl.num_programs(1) - 1 - tl.program_id(1)
        off_b = pid_bh // num_heads
        off_h = pid_bh % num_heads
        off_kvh = off_h // GROUP

        m0 = tile_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        # Row of this (batch, kv head)'s first key in the flattened TMA view (unused by pointer loads).
        kv_row0 = (off_b * (num_heads // GROUP) + off_kvh) * num_keys
        if USE_TMA:
            k_base = K
            v_base = V
        else:
            k_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
            v_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh

        q = tl.load(
            q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
            mask=offs_m[:, None] < num_queries,
            other=0.0,
        )

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # Tiles made only of local rows start at key 0; tiles with anchor rows start at the anchor.
        all_local = (m0 >= num_anchor).to(tl.int32)
        lo = num_passing * (1 - all_local)
        diag_offset = num_passing + causal_shift  # row i sees keys <= diag_offset + i
        # keys < diag are visible to every row of this tile (clamped: unmasked loads stay inside the keys)
        diag = tl.minimum(diag_offset + m0 + 1, num_keys)
        full_end = lo + ((diag - lo) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(num_keys, diag_offset + m0 + BLOCK_M)

        acc, l_i, m_i = _attend_keys(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
            lo, full_end, num_passing, diag_offset, num_anchor, qk_scale,
            kv_row0, BLOCK_N, False, USE_TMA,
        )  # fmt: skip
        acc, l_i, m_i = _attend_keys(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
            full_end, hi, num_passing, diag_offset, num_anchor, qk_scale,
            kv_row0, BLOCK_N, True, USE_TMA,
        )  # fmt: skip
        # The one tile holding both anchor and local rows: its local rows also see the passing keys.
        mixed = ((m0 < num_anchor) & (m0 + BLOCK_M > num_anchor)).to(tl.int32)
        acc, l_i, m_i = _attend_keys(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
            0, num_passing * mixed, num_passing, diag_offset, num_anchor, qk_scale,
            kv_row0, BLOCK_N, True, USE_TMA,
        )  # fmt: skip

        # Every real row sees at least its own key, so l_i > 0; padded rows are not stored.
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        acc = acc / l_safe[:, None]
        row_ok = offs_m < num_queries
        o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
        tl.store(
            o_base + offs_m[:, None] * stride_om + offs_d[None, :],
            acc.to(Out.dtype.element_ty),
            mask=row_ok[:, None],
        )
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
        tl.store(Lse + pid_bh.to(tl.int64) * num_queries + offs_m, lse, mask=row_ok)

    @triton.jit
    def _attend_keys(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_m,
        offs_d,
        start,
        end,
        num_passing,
        diag_offset,
        num_anchor,
        qk_scale,
        kv_row0,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        USE_TMA: tl.constexpr,
    ):
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + offs_n
            if MASKED:
                in_range = cols < end  # end <= num_keys; also keeps phase 3 inside the passing keys
            if USE_TMA:
                # Rows past this head's keys belong to the next head (or are zero past the tensor);
                # their scores are masked to -inf below, so they add p = 0.
                k = k_base.load([kv_row0 + start_n, 0])
                v = v_base.load([kv_row0 + start_n, 0])
            elif MASKED:
                k = tl.load(
                    k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None], other=0.0
                )
                v = tl.load(
                    v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0
                )
            else:
                k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
                v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
            qk = tl.dot(q, tl.trans(k))
            if MASKED:
                visible = (
                    (cols[None, :] <= diag_offset + offs_m[:, None])
                    & in_range[None, :]
                    & ((cols[None, :] >= num_passing) | (offs_m[:, None] >= num_anchor))
                )
                qk = tl.where(visible, qk * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                # A row with nothing visible so far keeps m = -inf; subtract 0 instead so no NaN appears.
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(qk - m_sub[:, None])
                alpha = tl.math.exp2(m_i - m_sub)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.math.exp2(qk * qk_scale - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        return acc, l_i, m_i

    def _set_block_shapes(nargs) -> None:
        # TMA descriptors hold the tile shape, which depends on the config being tried.
        if nargs.get("USE_TMA"):
            for name in ("K", "V"):
                nargs[name].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]

    def _configs() -> list[triton.Config]:
        """Candidates for the autotuner; tuned on an H100 (benchmarks/RESULTS.md)."""
        shapes = [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
        return [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes
            )
            for bm, bn, w, s in shapes
        ]

    # Per head dim, the candidates worth timing (H100 sweep at 128K, benchmarks/RESULTS.md): the
    # best large-length tile plus (64, 64) for short inputs where 128-row tiles leave SMs idle.
    _CANDIDATES = {
        32: {(128, 64), (64, 64)},
        64: {(128, 64), (64, 128), (64, 64)},
        128: {(128, 128), (128, 64), (64, 64)},
        256: {(64, 64), (64, 32)},
    }

    def _prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        wanted = _CANDIDATES.get(head_dim)
        kept = [c for c in configs if wanted is None or (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) in wanted]
        return kept or configs

    def _quick_bench(kernel_call, quantiles):
        # Short timing runs: a first call in a new length bucket tunes in well under a second.
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    _autotune_kwargs = dict(
        configs=_configs(),
        key=["HEAD_DIM", "GROUP", "len_bucket", "USE_TMA"],
        prune_configs_by={"early_config_prune": _prune},
    )
    try:
        _apb_fwd_autotuned = triton.autotune(**_autotune_kwargs, do_bench=_quick_bench)(_apb_fwd_kernel)
    except TypeError:  # pragma: no cover - triton without a do_bench hook
        _apb_fwd_autotuned = triton.autotune(**_autotune_kwargs)(_apb_fwd_kernel)


def len_bucket(num_queries: int) -> int:
    """Coarse bucket of the query length (powers of 2 from 256 to 64K) for the autotune key."""
    bucket = 256
    while bucket < num_queries and bucket < 65536:
        bucket *= 2
    return bucket


def _tma_default(device: torch.device) -> bool:
    if os.environ.get("APB_TRITON_TMA") is not None:
        return os.environ["APB_TRITON_TMA"] == "1"
    return USE_TMA_ON_HOPPER and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def triton_supported(q: torch.Tensor) -> bool:
    """Whether `apb_attention_triton` takes q's device, dtype and head_dim (interpreted on the CPU)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return (
        HAS_TRITON
        and (q.is_cuda or interpreted)
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] in SUPPORTED_HEAD_DIMS
    )


def _tma_ready(t: torch.Tensor) -> bool:
    # TMA: 16-byte aligned base and strides (all but the last, which must be 1).
    size = t.element_size()
    return (
        t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all((st * size) % 16 == 0 for st in t.stride()[:-1])
    )


def apb_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_passing: int,
    num_anchor: int,
    softmax_scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool | None = None,
    causal_shift: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APB attention through the Triton kernel (fp16/bf16; CUDA, or any device under TRITON_INTERPRET=1).

    q: [batch, num_heads, num_anchor + num_local, head_dim]
    k, v: [batch, num_kv_heads, num_passing + num_anchor + num_local, head_dim]
    Returns out [batch, num_heads, num_queries, head_dim] (q's dtype) and lse [batch, num_heads, num_queries]
    (fp32, natural log). Giving `block_m` and `block_n` bypasses the autotuner (tests, sweeps).
    `use_tma` loads K/V tiles through Hopper's tensor memory accelerator (default: compute capability >= 9;
    APB_TRITON_TMA=0/1 overrides).
    `causal_shift` lets every row see that many more keys past its diagonal (`decode_attention` uses it to
    make all keys visible); APB attention itself uses 0.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    check_shapes(q, k, v, num_passing, num_anchor)
    if not triton_supported(q):
        raise ValueError(
            f"the Triton kernel takes fp16/bf16 CUDA tensors with head_dim in {SUPPORTED_HEAD_DIMS}; "
            f"got {q.dtype} on {q.device} with head_dim {q.shape[-1]}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if not scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, num_heads, num_queries), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if use_tma is None:
        use_tma = TensorDescriptor is not None and _tma_default(q.device)
    if use_tma:
        k, v = k.contiguous(), v.contiguous()
        use_tma = _tma_ready(k) and _tma_ready(v)  # else pointer loads
    k_arg, v_arg = k, v
    if use_tma:
        # Placeholder tile shape; the launch below (or the autotuner's pre_hook) sets the real one.
        k_arg, v_arg = (
            TensorDescriptor(t, [t.numel() // head_dim, head_dim], [head_dim, 1], [block_n or 64, head_dim])
            for t in (k, v)
        )
    args = (
        q, k_arg, v_arg, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_heads, num_queries, num_keys, num_passing, num_anchor, causal_shift, len_bucket(num_queries),
        scale * _LOG2E,
    )  # fmt: skip
    group = num_heads // num_kv_heads
    if block_m is not None or block_n is not None:
        bm, bn = block_m or 128, block_n or 64
        grid = (batch * num_heads, triton.cdiv(num_queries, bm))
        if use_tma:
            k_arg.block_shape = v_arg.block_shape = [bn, head_dim]
        _apb_fwd_kernel[grid](
            *args,
            GROUP=group,
            USE_TMA=use_tma,
            HEAD_DIM=head_dim,
            BLOCK_M=bm,
            BLOCK_N=bn,
            num_warps=num_warps or 8,
            num_stages=num_stages or 3,
        )
    else:

        def grid(meta):
            return (batch * num_heads, triton.cdiv(num_queries, meta["BLOCK_M"]))

        _apb_fwd_autotuned[grid](*args, GROUP=group, HEAD_DIM=head_dim, USE_TMA=use_tma)
    return out, lse


__all__ = ["HAS_TRITON", "SUPPORTED_HEAD_DIMS", "apb_attention_triton", "len_bucket", "triton_supported"]
