"""`apb_attention`: the Triton kernel on CUDA for fp16/bf16, the plain reference otherwise."""

from __future__ import annotations

import torch
from apb.kernels.reference import apb_attention_ref, check_shapes, decode_attention_ref
from apb.kernels.triton_apb import apb_attention_triton, triton_supported
from apb.kernels.triton_decode import decode_attention_split, split_decode_supported


def apb_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_passing: int,
    num_anchor: int,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APB attention over keys ``[passing | anchor | local]`` (forward only).

    q: [batch, num_heads, num_anchor + num_local, head_dim]
    k, v: [batch, num_kv_heads, num_passing + num_anchor + num_local, head_dim]; num_heads is a multiple
    of num_kv_heads (GQA). Anchor queries see the anchor causally; local queries see every passing key,
    the whole anchor and the local block causally.
    Returns out [batch, num_heads, num_queries, head_dim] in q's dtype and lse [batch, num_heads,
    num_queries] (fp32, natural log), for merging partial attentions.
    fp16/bf16 CUDA tensors with head_dim 16..256 (powers of two) run the Triton kernel; fp32, CPU
    tensors and other head dims run `apb_attention_ref`.
    """
    check_shapes(q, k, v, num_passing, num_anchor)
    if q.is_cuda and triton_supported(q) and k.dtype == q.dtype and v.dtype == q.dtype:
        return apb_attention_triton(
            q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=softmax_scale
        )
    return apb_attention_ref(
        q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=softmax_scale
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_prefix: int | None,
    softmax_scale: float | None = None,
    valid_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A few query rows (the query pass, a decoding step) over one host's keys, with lse for merging.

    q: [batch, num_heads, t, head_dim]; k, v: [batch, num_kv_heads, S, head_dim].
    num_prefix None: every key is visible (a host's cached block). Otherwise query i sees keys
    ``j <= num_prefix + i`` (the cache, then the queries' own keys, causal): APB attention with
    `num_passing = num_prefix` and no anchor. `valid_keys` (a one-element integer tensor on q's device):
    only keys ``j < valid_keys`` exist, the rest of the buffer is ignored; read on the device, so a CUDA
    graph recorded once serves buffers that fill up between replays.
    Returns out [batch, num_heads, t, head_dim] in q's dtype and lse [batch, num_heads, t] (fp32).
    fp16/bf16 CUDA tensors run the split-key Triton kernel (`apb.kernels.triton_decode`: the keys cut
    into splits so that every SM has work, the splits merged by log-sum-exp; the K/V may be a strided view,
    such as the last host's store with room after it); everything else runs `decode_attention_ref`.
    """
    t, num_keys = q.shape[2], k.shape[2]
    fits = num_keys >= 1 if num_prefix is None else num_keys == num_prefix + t
    if q.is_cuda and fits and split_decode_supported(q, k, v):
        return decode_attention_split(
            q, k, v, num_prefix=num_prefix, softmax_scale=softmax_scale, valid_keys=valid_keys
        )
    return decode_attention_ref(
        q, k, v, num_prefix=num_prefix, softmax_scale=softmax_scale, valid_keys=valid_keys
    )
