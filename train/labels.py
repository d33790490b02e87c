"""Locret's labels, computed inside the base model's own forward.

A registered attention function (``transformers.AttentionInterface``, name :data:`ATTN_NAME`) runs the
normal causal attention with SDPA and, while a :class:`LabelRequest` is active, also computes for each
layer the labels of the block tokens:

    label[b, j, h] = max over label rows i and over the query heads g of KV group h of
                     q[b, g, i] · k[b, h, j] * scaling          (post-RoPE q and k)

``scaling`` is the attention module's own softmax scale (``1/sqrt(head_dim)`` for every supported
family). Only the label rows' scores are formed, in chunks of rows, so memory stays at
``chunk_rows * num_heads * block_len`` scores: no ``[seq, seq]`` matrix per head is ever built.

The same call slices the layer's captured pre-RoPE q/k/v (:class:`apb.ProjectionCapture`) down to the
block tokens, so a forward keeps only what the heads read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from apb.heads import ProjectionCapture

ATTN_NAME = "apb_retain_labels"
"""The attention implementation name this module registers."""

DEFAULT_CHUNK_ELEMENTS = 1 << 26
"""Scores formed at once per label chunk (64M: 128 MiB in bf16)."""


@dataclass(kw_only=True, slots=True)
class LabelRequest:
    """What the attention function computes during one forward (set with :func:`collecting_labels`)."""

    block: tuple[int, int]
    """[start, end) of the block tokens (the tokens scored) in the sequence."""
    label_rows: tuple[int, int]
    """[start, end) of the label rows (question and answer tokens) in the sequence."""
    capture: ProjectionCapture | None = None
    """If given, each layer's captured q/k/v are sliced to the block as soon as the layer runs."""
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    """Bound on the scores formed at once: rows per chunk = chunk_elements // (batch * heads * block)."""
    labels: dict[int, torch.Tensor] = field(default_factory=dict)
    """Output: layer index -> labels [batch, block_len, num_kv_heads] (fp32)."""

    def __post_init__(self) -> None:
        for name in ("block", "label_rows"):
            start, end = getattr(self, name)
            if not 0 <= start < end:
                raise ValueError(f"{name} must be a non-empty range [start, end), got {(start, end)}")
        if self.block[1] > self.label_rows[0]:
            raise ValueError(f"label rows {self.label_rows} must come after the block {self.block}")


_ACTIVE: list[LabelRequest] = []


@contextmanager
def collecting_labels(request: LabelRequest) -> Iterator[LabelRequest]:
    """Make `request` active for the forwards run inside the block; its `labels` fill per layer."""
    _ACTIVE.append(request)
    try:
        yield request
    finally:
        _ACTIVE.pop()


def block_labels(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    block: tuple[int, int],
    label_rows: tuple[int, int],
    scaling: float,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Labels from post-RoPE q and k.

    query: [batch, num_heads, seq, head_dim], key: [batch, num_kv_heads, seq, head_dim]
    -> labels: [batch, block_len, num_kv_heads] (fp32).
    Query heads of KV head h are h*g .. h*g+g-1 (g = num_heads // num_kv_heads), as in `repeat_kv`.
    """
    batch, num_heads, _, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    block_len = block[1] - block[0]
    keys_t = key[:, :, block[0] : block[1]].transpose(-1, -2)  # [b, kv, d, B]
    rows = query[:, :, label_rows[0] : label_rows[1]]  # [b, H, L, d]
    num_rows = rows.shape[2]
    rows_per_chunk = max(1, chunk_elements // max(1, batch * num_heads * block_len))
    best = None
    for start in range(0, num_rows, rows_per_chunk):
        chunk = rows[:, :, start : start + rows_per_chunk]
        # [b, kv, g * Lc, d] @ [b, kv, d, B] -> [b, kv, g * Lc, B]; max over the group's heads and rows.
        chunk = chunk.reshape(batch, num_kv_heads, group * chunk.shape[2], head_dim)
        chunk_max = torch.matmul(chunk, keys_t).amax(dim=2)
        best = chunk_max if best is None else torch.maximum(best, chunk_max)
    assert best is not None
    return (best.float() * scaling).transpose(1, 2).contiguous()


def label_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA attention (the model's output is unchanged) plus labels for the active request.

    query: [batch, num_heads, seq, head_dim], key/value: [batch, num_kv_heads, seq, head_dim]
    -> ([batch, seq, num_heads, head_dim], None), the shape transformers' attention functions return.

    The trainer feeds one unpadded sequence per row and no attention mask, so attention is plain
    causal attention; the mask function registered for this name builds nothing, and a mask passed
    anyway is ignored on purpose.
    """
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    request = _ACTIVE[-1] if _ACTIVE else None
    layer_idx = getattr(module, "layer_idx", None)
    if request is not None and layer_idx is not None:
        request.labels[layer_idx] = block_labels(
            query,
            key,
            block=request.block,
            label_rows=request.label_rows,
            scaling=scale,
            chunk_elements=request.chunk_elements,
        )
        if request.capture is not None and request.capture.enabled:
            entry = request.capture.store.get(layer_idx)
            if entry is not None:
                # Keep the block tokens only; the full-sequence tensors are freed with this layer.
                start, end = request.block
                for name in list(entry):
                    entry[name] = entry[name][:, start:end].clone()
    # enable_gqa (torch >= 2.5) lets SDPA's flash/cuDNN kernels read the KV heads without repeating them.
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        is_causal=query.shape[2] > 1,
        scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The label attention is always plain causal (is_causal=True): no mask tensor is ever needed."""
    return None


AttentionInterface.register(ATTN_NAME, label_attention)
# Registering a mask function too makes every transformers 5.x build no mask for this name (some
# versions look the name up and fail on an unregistered one).
AttentionMaskInterface.register(ATTN_NAME, _no_mask)


def use_label_attention(model: nn.Module) -> None:
    """Switch `model` to the label-computing attention function (outputs stay those of causal SDPA)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_NAME)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTN_NAME
