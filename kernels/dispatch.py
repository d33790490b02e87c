"""`apb_attention`: the Triton kernel on CUDA for fp16/bf16, the plain reference otherwise."""

from __future__ import annotations

import torch
from apb.kernels.reference import apb_attention_ref
from apb.kernels.triton_apb import _check_shapes, apb_attention_triton, triton_supported


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
    _check_shapes(q, k, v, num_passing, num_anchor)
    if q.is_cuda and triton_supported(q) and k.dtype == q.dtype and v.dtype == q.dtype:
        return apb_attention_triton(
            q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=softmax_scale
        )
    return apb_attention_ref(
        q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=softmax_scale
    )
