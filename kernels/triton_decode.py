"""Split-key Triton kernel for a few query rows over one host's keys (the query pass, decoding steps).

`decode_attention` has few query rows (64 in the query pass, one per decoding step) and many keys (a host's
whole block). A prefill kernel tiles the query rows, so it runs one program per query head and row tile:
32 programs for Llama-3.1-8B's shape, a quarter of an H200's SMs, each streaming the whole block. Here the
keys are cut into splits (FlashDecoding): one program per (batch, KV head, split, row tile) attends the
GQA group's rows (every query head of the KV head, every query row, packed into one tile) to its split of
the keys and writes a partial output and log-sum-exp; `merge_partials` then merges the splits in one
launch. The K/V of a split are read once for all the query heads that share them.

Rule per query row ``i`` (of ``t``): every key is visible, or with ``diag`` (causal) keys ``j <= diag + i``.
With `valid_keys` (a device tensor) only the first ``valid_keys`` keys exist: the grid is sized for the
whole buffer and the kernel reads the count at run time, so that a recorded CUDA graph serves every decoding step.
"""

from __future__ import annotations

import math

import torch
from apb.kernels.merge import merge_partials
from apb.kernels.triton_apb import _LOG2E, HAS_TRITON, triton_supported

_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["t", "num_keys", "diag", "keys_per_split", "iters"])
    def _decode_split_kernel(
        Q,
        K,
        V,
        Out,
        Lse,
        ValidKeys,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_os,
        stride_ob,
        stride_oh,
        stride_ot,
        stride_ls,
        stride_lb,
        stride_lh,
        num_kv_heads,
        t,
        num_keys,
        diag,
        keys_per_split,
        iters,
        qk_scale,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr,
        VALID_FROM_PTR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // num_kv_heads
        kvh = bh % num_kv_heads
        # packed rows: r = g * t + i, query head kvh * GROUP + g, query row i
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < GROUP * t
        head = kvh * GROUP + rows // t
        i = rows % t
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + b * stride_qb + head[:, None] * stride_qh + i[:, None] * stride_qt + d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        if VALID_FROM_PTR:
            num_keys = tl.minimum(num_keys, tl.load(ValidKeys))
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, num_keys)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # a loop count from the arguments, not from program ids (Triton's interpreter before 3.7)
        for it in range(iters):
            cols = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            k = tl.load(k_base + cols[:, None] * stride_kn + d[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # base-2 logits
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= diag + i[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vn + d[None, :], mask=col_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        o_ptr = Out + split * stride_os + b * stride_ob + head[:, None] * stride_oh + i[:, None] * stride_ot
        tl.store(o_ptr + d[None, :], out, mask=row_ok[:, None])
        tl.store(Lse + split * stride_ls + b * stride_lb + head * stride_lh + i, lse, mask=row_ok)


def split_decode_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention_split` takes these inputs: what the Triton kernels take (`triton_supported`:
    fp16/bf16, a supported head_dim), K/V of q's dtype, contiguous head_dim, and GQA."""
    return (
        triton_supported(q)
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.shape[1] % k.shape[1] == 0
        and all(x.stride(-1) == 1 for x in (q, k, v))
    )


def num_splits(batch: int, num_kv_heads: int, row_tiles: int, num_keys: int, num_sms: int) -> int:
    """Splits of the keys: enough programs for about two per SM, a power of two (few distinct merges to
    compile), no split under `_MIN_KEYS_PER_SPLIT` keys."""
    programs = batch * num_kv_heads * row_tiles
    want = max(1, math.ceil(2 * num_sms / programs))
    cap = max(1, min(_MAX_SPLITS, num_keys // _MIN_KEYS_PER_SPLIT))
    splits = 1
    while splits * 2 <= min(want, cap):
        splits *= 2
    return splits


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: a few splits, so that the tests cover the merge
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def decode_attention_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_prefix: int | None,
    softmax_scale: float | None = None,
    splits: int | None = None,
    block_n: int = 64,
    valid_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apb.kernels.decode_attention` by splits of the keys (see the module docstring).

    q: [batch, num_heads, t, head_dim]; k, v: [batch, num_kv_heads, S, head_dim] (any strides but the last).
    num_prefix None: every key is visible; else query i sees keys ``j <= num_prefix + i``.
    Returns out [batch, num_heads, t, head_dim] in q's dtype and lse [batch, num_heads, t] (fp32).
    `splits` None: from the GPU's SM count (`num_splits`). `valid_keys`: a one-element integer tensor on q's
    device; only keys ``j < valid_keys`` exist (read by the kernel, so it may change between replays of a
    CUDA graph); the splits cover all S keys."""
    batch, num_heads, t, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    rows = group * t
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    row_tiles = triton.cdiv(rows, block_m)
    if splits is None:
        splits = num_splits(batch, num_kv_heads, row_tiles, num_keys, _sm_count(q.device))
    splits = max(1, min(splits, triton.cdiv(max(num_keys, 1), block_n)))
    keys_per_split = triton.cdiv(triton.cdiv(max(num_keys, 1), splits), block_n) * block_n
    splits = triton.cdiv(max(num_keys, 1), keys_per_split)
    outs = torch.empty(splits, batch, num_heads, t, head_dim, device=q.device, dtype=torch.float32)
    lses = torch.empty(splits, batch, num_heads, t, device=q.device, dtype=torch.float32)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    _decode_split_kernel[(batch * num_kv_heads, splits, row_tiles)](
        q, k, v, outs, lses, lses if valid_keys is None else valid_keys,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        outs.stride(0), outs.stride(1), outs.stride(2), outs.stride(3),
        lses.stride(0), lses.stride(1), lses.stride(2),
        num_kv_heads, t, num_keys, 0 if num_prefix is None else num_prefix, keys_per_split,
        keys_per_split // block_n, scale * _LOG2E,
        GROUP=group, HEAD_DIM=head_dim, CAUSAL=num_prefix is not None,
        VALID_FROM_PTR=valid_keys is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, num_stages=3,  # H200: 3 stages 8% faster than 2 for a decoding step, 18% for the query pass
    )  # fmt: skip
    if splits == 1:
        return outs[0].to(q.dtype), lses[0]
    return merge_partials(outs, lses, out_dtype=q.dtype)


__all__ = ["decode_attention_split", "num_splits", "split_decode_supported"]
