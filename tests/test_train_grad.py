"""Only the heads learn: their gradients flow, the frozen base gets none; the loss's two terms."""

from __future__ import annotations

import torch
from apb.data.layout import LayoutParams, build_host_layout
from apb.train.loss import retain_loss
from apb.train.step import HeadsStack, micro_step, prepare_base
from conftest import tiny_model

from apb.heads import ModelShape, RetainingHeads


def test_heads_get_gradients_and_base_gets_none(family):
    model = tiny_model(family, initializer_range=0.2)
    capture = prepare_base(model)
    heads = HeadsStack(RetainingHeads(ModelShape.from_model(model), hidden_size=32))
    layout = build_host_layout(
        list(range(3, 70)), [80, 81, 82], [90, 91], LayoutParams(anchor_len=16, query_offset=4)
    )
    result = micro_step(model, capture, heads, layout, smooth_weight=0.0025)
    result.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The graph holds the heads only: backward through it once more needs no base tensors.
    assert result.fit_per_layer.shape == (model.config.num_hidden_layers,)


def test_loss_terms():
    scores = [torch.tensor([[[0.0], [1.0], [3.0]]])]  # [batch 1, 3 tokens, 1 KV head]
    labels = [torch.tensor([[[0.5], [1.0], [1.0]]])]
    out = retain_loss(scores, labels, smooth_weight=0.5)
    fit = (0.5 * 0.5**2 + 0.0 + (2.0 - 0.5)) / 3  # SmoothL1 with beta 1: quadratic below 1, linear above
    smooth = (1.0**2 + 2.0**2) / 2
    assert torch.isclose(out.fit, torch.tensor(fit))
    assert torch.isclose(out.smoothness, torch.tensor(smooth))
    assert torch.isclose(out.loss, torch.tensor(fit + 0.5 * smooth))


def test_zero0_grad_norm_is_the_heads_gradient_norm():
    """ZeRO 0 with a torch optimizer records no global grad norm in DeepSpeed; the trainer computes it."""
    from types import SimpleNamespace

    from apb.train.trainer import _local_grad_norm

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    module(torch.randn(5, 3)).square().sum().backward()
    expected = torch.cat([p.grad.flatten() for p in module.parameters()]).norm().item()
    engine0 = SimpleNamespace(zero_optimization_stage=lambda: 0, module=module)
    assert abs(_local_grad_norm(engine0) - expected) < 1e-5 * expected
    engine2 = SimpleNamespace(zero_optimization_stage=lambda: 2, module=module)
    assert _local_grad_norm(engine2) is None  # partitioned gradients: DeepSpeed's own norm is used
