"""One training micro-step on a frozen base: a single no-grad forward gives the heads' inputs and labels.

Shared by the DeepSpeed trainer and `scripts/bench_train.py`, so the benchmark times the real step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from apb.data.layout import HostLayout
from apb.train.labels import LabelRequest, collecting_labels, use_label_attention
from apb.train.loss import RetainLoss, retain_loss
from torch import nn

from apb.heads import ProjectionCapture, RetainingHeads

BlockInputs = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""Per layer: the block tokens' pre-RoPE (q, k, v), [batch, block_len, width] each, no grad."""


class HeadsStack(nn.Module):
    """The trainable module handed to DeepSpeed: all layers' heads applied to their block inputs.

    `.heads` is the `RetainingHeads` (what `apb.adapter.save_adapter` takes).
    """

    def __init__(self, heads: RetainingHeads):
        super().__init__()
        self.heads = heads

    def forward(self, inputs: BlockInputs) -> list[torch.Tensor]:
        """-> per layer scores [batch, block_len, num_kv_heads]."""
        return [self.heads(i, q, k, v) for i, (q, k, v) in enumerate(inputs)]


def freeze(model: nn.Module) -> nn.Module:
    """Make the base frozen: no parameter requires grad; eval mode (no dropout)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def prepare_base(model: nn.Module) -> ProjectionCapture:
    """Freeze `model`, switch it to the label attention, attach q/k/v capture hooks."""
    freeze(model)
    use_label_attention(model)
    return ProjectionCapture(model)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head: labels and heads need no logits (saves the vocab matmul)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


@torch.no_grad()
def base_forward(
    model: nn.Module,
    capture: ProjectionCapture,
    layout: HostLayout,
    *,
    chunk_elements: int = 1 << 26,
) -> tuple[BlockInputs, list[torch.Tensor]]:
    """One no-grad forward of the base over `layout`.

    Returns the block tokens' pre-RoPE q/k/v per layer and the labels per layer
    ([1, block_len, num_kv_heads], fp32). Nothing else of the forward is kept.
    """
    device = capture.layers[0].self_attn.q_proj.weight.device
    input_ids = layout.input_ids.to(device).unsqueeze(0)
    position_ids = layout.position_ids.to(device).unsqueeze(0)
    request = LabelRequest(
        block=layout.block, label_rows=layout.label_rows, capture=capture, chunk_elements=chunk_elements
    )
    num_layers = len(capture.layers)
    with capture.capturing() as store, collecting_labels(request):
        decoder_of(model)(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        missing = [i for i in range(num_layers) if i not in request.labels or i not in store]
        if missing:
            raise RuntimeError(
                f"layers {missing} produced no labels/inputs: is the model using the label attention "
                f"({model.config._attn_implementation!r})?"
            )
        inputs = [capture.pop(i) for i in range(num_layers)]
    labels = [request.labels[i] for i in range(num_layers)]
    return inputs, labels


def micro_step(
    model: nn.Module,
    capture: ProjectionCapture,
    heads_forward: Callable[[BlockInputs], Sequence[torch.Tensor]],
    layout: HostLayout,
    *,
    smooth_weight: float,
    chunk_elements: int = 1 << 26,
) -> RetainLoss:
    """Base forward (no grad) -> heads forward (grad) -> loss. The caller runs backward/step."""
    inputs, labels = base_forward(model, capture, layout, chunk_elements=chunk_elements)
    scores = heads_forward(inputs)
    return retain_loss(scores, labels, smooth_weight=smooth_weight)
