"""Locret's training loss for retaining heads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

SMOOTH_L1_BETA = 1.0
"""SmoothL1's beta in Locret's loss."""


@dataclass(slots=True)
class RetainLoss:
    """The loss of one micro-batch and what goes into it."""

    loss: torch.Tensor
    """Scalar to backpropagate: fit + smooth_weight * smoothness."""
    fit: torch.Tensor
    """Mean SmoothL1 over layers (detached)."""
    smoothness: torch.Tensor
    """Mean squared difference of adjacent tokens' scores, averaged over layers (detached)."""
    fit_per_layer: torch.Tensor
    """[num_layers] SmoothL1 of each layer (detached): the label fit logged per layer."""


def retain_loss(
    scores: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], *, smooth_weight: float = 0.0025
) -> RetainLoss:
    """SmoothL1(beta=1) between scores and labels, mean over tokens and KV heads, averaged over layers,
    plus `smooth_weight` x the mean squared difference of adjacent tokens' scores.

    scores[l], labels[l]: [batch, block_len, num_kv_heads] for each layer l. Computed in fp32.
    """
    if len(scores) != len(labels) or not scores:
        raise ValueError(f"need one labels tensor per layer's scores, got {len(scores)} and {len(labels)}")
    fits, smooths = [], []
    for layer_scores, layer_labels in zip(scores, labels, strict=True):
        s = layer_scores.float()
        fits.append(F.smooth_l1_loss(s, layer_labels.float().to(s.device), beta=SMOOTH_L1_BETA))
        if s.shape[1] > 1:
            smooths.append((s[:, 1:] - s[:, :-1]).pow(2).mean())
        else:
            smooths.append(s.new_zeros(()))
    fit_per_layer = torch.stack(fits)
    fit = fit_per_layer.mean()
    smoothness = torch.stack(smooths).mean()
    return RetainLoss(
        loss=fit + smooth_weight * smoothness,
        fit=fit.detach(),
        smoothness=smoothness.detach(),
        fit_per_layer=fit_per_layer.detach(),
    )
