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

The fused form (``FUSED``) runs the same key tiles in one loop, each masked by the row's bounds, with Q, K
and V all loaded through TMA descriptors: that is the loop shape Triton 3.6's Hopper warp specialization
(``WARP_SPECIALIZE``: a producer warp group feeding two consumer warp groups of BLOCK_M/2 rows each) compiles;
on sm90 it rejects two loops in a row and pointer loads of Q (checked by compiling for sm90 with Triton 3.6).
``PERSISTENT`` launches about one program per SM that strides over the query tiles.
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
# Whether sm90 GPUs run the fused, warp-specialized loop by default (APB_TRITON_WS=0/1 overrides), and for
# which head dims (those compiled and measured).
WARP_SPECIALIZE_ON_HOPPER = False
WARP_SPECIALIZE_HEAD_DIMS = (64, 128)

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
        num_batch_heads,
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
        FUSED: tl.constexpr = False,  # one key loop, masked on every tile; Q is a [b, h, m, d] TensorDescriptor
        WARP_SPECIALIZE: tl.constexpr = False,  # compiler hint on the (fused) loop; ignored by the interpreter
        PERSISTENT: tl.constexpr = False,  # a grid of ~one program per SM striding over the query tiles
        ANCHOR_ALIGNED: tl.constexpr = False,  # num_anchor % 128 == 0: no tile mixes anchor and local rows
    ):
        num_tiles_m = tl.cdiv(num_queries, BLOCK_M)
        if PERSISTENT:
            # Tile t: query tile (heaviest first) t // num_batch_heads of (batch, head) t % num_batch_heads, so
            # every program walks from heavy to light tiles and heads of one GQA group run side by side.
            num_tiles = num_tiles_m * num_batch_heads
            for tile in tl.range(
                tl.program_id(0), num_tiles, tl.num_programs(0), warp_specialize=WARP_SPECIALIZE
            ):
                # warp_specialize sits on this loop (the producer runs ahead into the next tile), not inside
                _apb_fwd_tile(
                    Q, K, V, Out, Lse, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                    tile % num_batch_heads, num_tiles_m - 1 - tile // num_batch_heads,
                    num_heads, num_queries, num_keys, num_passing, num_anchor, causal_shift, qk_scale,
                    GROUP, USE_TMA, HEAD_DIM, BLOCK_M, BLOCK_N, FUSED, False, ANCHOR_ALIGNED,
                )  # fmt: skip
        else:
            # Heaviest query tiles (the last local rows see the most keys) are launched first.
            _apb_fwd_tile(
                Q, K, V, Out, Lse, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                tl.program_id(0), num_tiles_m - 1 - tl.program_id(1),
                num_heads, num_queries, num_keys, num_passing, num_anchor, causal_shift, qk_scale,
                GROUP, USE_TMA, HEAD_DIM, BLOCK_M, BLOCK_N, FUSED, WARP_SPECIALIZE, ANCHOR_ALIGNED,
            )  # fmt: skip

    @triton.jit
    def _apb_fwd_tile(
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
        off_bh,
        tile_m,
        num_heads,
        num_queries,
        num_keys,
        num_passing,
        num_anchor,
        causal_shift,
        qk_scale,
        GROUP: tl.constexpr,
        USE_TMA: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FUSED: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr,
        ANCHOR_ALIGNED: tl.constexpr,
    ):
        """One query tile of one (batch, head): out and lse of rows [tile_m * BLOCK_M, + BLOCK_M)."""
        off_b = off_bh // num_heads
        off_h = off_bh % num_heads
        off_kvh = off_h // GROUP

        m0 = tile_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        # Row of this (batch, kv head)'s first key in the flattened TMA view (unused by pointer loads).
        kv_row0 = (off_b * (num_heads // GROUP) + off_kvh) * num_keys
        if USE_TMA:
            k_base = K
            v_base = V
        else:
            k_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
            v_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        diag_offset = num_passing + causal_shift  # row i sees keys <= diag_offset + i
        hi = tl.minimum(num_keys, diag_offset + m0 + BLOCK_M)

        if FUSED:
            # Triton 3.6's Hopper warp specialization takes a single loop fed by TMA loads only, so Q comes
            # through a descriptor (rows past num_queries read as zeros) and one loop covers every visible
            # key tile; each tile is masked by the per-row bounds [row_lo, row_hi].
            q = Q.load([off_b, off_h, m0, 0]).reshape([BLOCK_M, HEAD_DIM])
            has_local = tl.minimum(m0 + BLOCK_M, num_queries) > num_anchor
            lo = tl.where(has_local, 0, num_passing)
            row_lo = tl.where(offs_m < num_anchor, num_passing, 0)
            row_hi = tl.minimum(diag_offset + offs_m, num_keys - 1)
            acc, l_i, m_i = _attend_keys_fused(
                acc, l_i, m_i, q, K, V, lo, hi, row_lo, row_hi, qk_scale, kv_row0,
                BLOCK_N, WARP_SPECIALIZE, ANCHOR_ALIGNED,
            )  # fmt: skip
        else:
            q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
            q = tl.load(
                q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=offs_m[:, None] < num_queries,
                other=0.0,
            )
            # Tiles made only of local rows start at key 0; tiles with anchor rows start at the anchor.
            all_local = (m0 >= num_anchor).to(tl.int32)
            lo = num_passing * (1 - all_local)
            # keys < diag are visible to every row of this tile (clamped: unmasked loads stay inside the keys)
            diag = tl.minimum(diag_offset + m0 + 1, num_keys)
            full_end = lo + ((diag - lo) // BLOCK_N) * BLOCK_N
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
        tl.store(Lse + off_bh.to(tl.int64) * num_queries + offs_m, lse, mask=row_ok)

    @triton.jit
    def _attend_keys_fused(
        acc,
        l_i,
        m_i,
        q,
        k_desc,
        v_desc,
        start,
        end,
        row_lo,
        row_hi,
        qk_scale,
        kv_row0,
        BLOCK_N: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr,
        ANCHOR_ALIGNED: tl.constexpr,
    ):
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            # Rows past this head's keys belong to the next head (or are zero past the tensor); row_hi
            # < num_keys masks them.
            k = k_desc.load([kv_row0 + start_n, 0])
            v = v_desc.load([kv_row0 + start_n, 0])
            qk = tl.dot(q, tl.trans(k))
            cols = start_n + offs_n
            if ANCHOR_ALIGNED:  # tiles with anchor rows start at num_passing: only the diagonal bound is left
                visible = cols[None, :] <= row_hi[:, None]
            else:
                visible = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] <= row_hi[:, None])
            qk = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # Anchor rows of the mixed tile see nothing among the passing keys: keep m = -inf, subtract 0.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        return acc, l_i, m_i

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
        if nargs.get("FUSED"):
            nargs["Q"].block_shape = [1, 1, nargs["BLOCK_M"], nargs["HEAD_DIM"]]

    # (BLOCK_M, BLOCK_N, num_warps, num_stages). Split loops: tuned on an H100 (benchmarks/RESULTS.md).
    # Warp-specialized: num_warps is the default partition's; the compiler adds a producer warp group and a
    # second consumer (12 warps in all), and num_stages is the depth of the K/V ring.
    _SPLIT_SHAPES = [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
    _WS_SHAPES = [(128, 128, 4, 2), (128, 64, 4, 3), (64, 64, 4, 3)]

    def _configs(shapes) -> list[triton.Config]:
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

    def _autotuned(shapes):
        kwargs = dict(
            configs=_configs(shapes),
            key=["HEAD_DIM", "GROUP", "len_bucket", "USE_TMA", "FUSED", "PERSISTENT", "ANCHOR_ALIGNED"],
            prune_configs_by={"early_config_prune": _prune},
        )
        try:
            return triton.autotune(**kwargs, do_bench=_quick_bench)(_apb_fwd_kernel)
        except TypeError:  # pragma: no cover - triton without a do_bench hook
            return triton.autotune(**kwargs)(_apb_fwd_kernel)

    # One autotuner per loop form (warp-specialized or not): their tile candidates differ.
    _AUTOTUNED = {False: _autotuned(_SPLIT_SHAPES), True: _autotuned(_WS_SHAPES)}


def len_bucket(num_queries: int) -> int:
    """Coarse bucket of the query length (powers of 2 from 256 to 64K) for the autotune key."""
    bucket = 256
    while bucket < num_queries and bucket < 65536:
        bucket *= 2
    return bucket


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value == "1"


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def _tma_default(device: torch.device) -> bool:
    flag = _env_flag("APB_TRITON_TMA")
    if flag is not None:
        return flag
    return USE_TMA_ON_HOPPER and _capability(device)[0] >= 9


def _warp_specialize_default(device: torch.device, head_dim: int) -> bool:
    # Only where it was compiled and measured: Hopper (sm90; Blackwell takes another compiler path).
    flag = _env_flag("APB_TRITON_WS")
    if flag is not None:
        return flag
    return WARP_SPECIALIZE_ON_HOPPER and _capability(device)[0] == 9 and head_dim in WARP_SPECIALIZE_HEAD_DIMS


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


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, so the persistent loop strides over several tiles


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
    fused: bool | None = None,
    warp_specialize: bool | None = None,
    persistent: bool | None = None,
    causal_shift: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APB attention through the Triton kernel (fp16/bf16; CUDA, or any device under TRITON_INTERPRET=1).

    q: [batch, num_heads, num_anchor + num_local, head_dim]
    k, v: [batch, num_kv_heads, num_passing + num_anchor + num_local, head_dim]
    Returns out [batch, num_heads, num_queries, head_dim] (q's dtype) and lse [batch, num_heads, num_queries]
    (fp32, natural log). Giving `block_m` and `block_n` bypasses the autotuner (tests, sweeps).
    How it runs (None = the default for the device):
    `use_tma` loads K/V tiles through Hopper's tensor memory accelerator (default: compute capability >= 9).
    `fused` runs one key loop masked on every tile, with Q, K, V all through TMA descriptors (needs TMA),
    instead of separate unmasked and masked loops; `warp_specialize` (implies `fused`) asks the compiler for
    producer/consumer warp groups on that loop (default: sm90 with WARP_SPECIALIZE_ON_HOPPER).
    `persistent` launches about one program per SM, each striding over the query tiles heaviest first.
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
        use_tma = TensorDescriptor is not None and (bool(fused or warp_specialize) or _tma_default(q.device))
    if warp_specialize is None:
        warp_specialize = use_tma and _warp_specialize_default(q.device, head_dim)
    fused = warp_specialize if fused is None else fused or warp_specialize
    persistent = bool(persistent)
    if fused and not use_tma:
        raise ValueError("the fused (and warp-specialized) loop loads through TMA; it needs use_tma")
    if use_tma:
        k, v = k.contiguous(), v.contiguous()
        if fused and not _tma_ready(q):
            q = q.contiguous()
        # TMA needs 16-byte aligned bases; fall back to pointer loads (split loops) otherwise.
        use_tma = _tma_ready(k) and _tma_ready(v) and (not fused or _tma_ready(q))
        fused, warp_specialize = fused and use_tma, warp_specialize and use_tma
    q_arg, k_arg, v_arg = q, k, v
    if use_tma:
        # Placeholder tile shapes; the launch below (or the autotuner's pre_hook) sets the real ones.
        k_arg, v_arg = (
            TensorDescriptor(t, [t.numel() // head_dim, head_dim], [head_dim, 1], [block_n or 64, head_dim])
            for t in (k, v)
        )
        if fused:
            q_arg = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, block_m or 64, head_dim])
    args = (
        q_arg, k_arg, v_arg, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        batch * num_heads, num_heads, num_queries, num_keys, num_passing, num_anchor, causal_shift,
        len_bucket(num_queries), scale * _LOG2E,
    )  # fmt: skip
    flags = dict(
        GROUP=num_heads // num_kv_heads,
        USE_TMA=use_tma,
        HEAD_DIM=head_dim,
        FUSED=fused,
        WARP_SPECIALIZE=warp_specialize,
        PERSISTENT=persistent,
        # 128 is a multiple of every BLOCK_M, so no query tile then holds both anchor and local rows
        ANCHOR_ALIGNED=fused and num_anchor % 128 == 0,
    )
    num_sms = _num_sms(q.device)

    def grid(meta):
        num_tiles_m = triton.cdiv(num_queries, meta["BLOCK_M"])
        if persistent:
            return (min(num_sms, batch * num_heads * num_tiles_m),)
        return (batch * num_heads, num_tiles_m)

    if block_m is not None or block_n is not None:
        bm, bn = block_m or 128, block_n or 64
        if use_tma:
            k_arg.block_shape = v_arg.block_shape = [bn, head_dim]
        if fused:
            q_arg.block_shape = [1, 1, bm, head_dim]
        _apb_fwd_kernel[grid({"BLOCK_M": bm})](
            *args,
            **flags,
            BLOCK_M=bm,
            BLOCK_N=bn,
            num_warps=num_warps or (4 if warp_specialize else 8),
            num_stages=num_stages or (2 if warp_specialize else 3),
        )
    else:
        _AUTOTUNED[warp_specialize][grid](*args, **flags)
    return out, lse


__all__ = ["HAS_TRITON", "SUPPORTED_HEAD_DIMS", "apb_attention_triton", "len_bucket", "triton_supported"]
