"""Passing-block selectors: what scores a host's block before APB keeps the top entries per KV head.

Every selector returns raw scores ``[batch, block_len, num_kv_heads]`` for the host's local block; the
same max-pooling (``pool_kernel``), exclusion of anchor positions, top-k per KV head and passing code
(`apb.attention.select_passing`) follow for all of them. ``APBConfig(selector=...)`` names one:

- ``"heads"``: the retaining heads of the adapter, on the block tokens' pre-RoPE q/k/v (the paper's).
- ``"query_attention"``: training-free and query-aware (SnapKV-style): the softmax attention that the
  question tokens spliced into the host's anchor give each block key, summed over the question rows and
  the KV group's query heads. Host 0, which has no anchor in APB, runs the anchor as a probe its block
  does not attend to (`apb.plan.HostView.anchor_visible`). Needs ``query_in_anchor``.
- ``"random"``: uniform random scores, seeded per host and layer (a control).
- ``"oracle"``: the attention mass the final query tokens give each context key in a full-attention
  forward (`apb.recall.attention_mass`), passed in by the caller: evaluation only.

`register_selector` adds one under a new name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from apb.heads import ProjectionCapture, RetainingHeads


@dataclasses.dataclass(kw_only=True, slots=True)
class SelectionInputs:
    """What a selector may look at for one host and layer."""

    layer_idx: int
    host: int
    query: torch.Tensor
    """[batch, num_heads, num_anchor + block_len, head_dim]: this host's post-RoPE queries."""
    key: torch.Tensor
    """[batch, num_kv_heads, num_anchor + block_len, head_dim]: this host's post-RoPE keys."""
    num_anchor: int
    """Anchor rows in front of the block."""
    question_rows: tuple[int, int] | None
    """[start, end) of the question tokens among the anchor rows (None: no question in the anchor)."""
    block_start: int
    """Context position of the block's first token."""
    scaling: float
    """The attention's softmax scale."""
    heads: RetainingHeads | None = None
    capture: ProjectionCapture | None = None
    oracle_scores: dict[int, torch.Tensor] | None = None
    """layer -> [batch, num_kv_heads, num_context] attention mass (the "oracle" selector only)."""
    seed: int = 0


Selector = Callable[[SelectionInputs], torch.Tensor]
_SELECTORS: dict[str, Selector] = {}


def register_selector(name: str, fn: Selector) -> None:
    """Add (or replace) a selector under `name`."""
    _SELECTORS[name] = fn


def available_selectors() -> list[str]:
    return sorted(_SELECTORS)


def get_selector(name: str) -> Selector:
    if name not in _SELECTORS:
        raise ValueError(
            f"unknown passing-block selector {name!r}; available: {', '.join(available_selectors())}"
        )
    return _SELECTORS[name]


def _heads(inputs: SelectionInputs) -> torch.Tensor:
    if inputs.heads is None or inputs.capture is None:
        raise ValueError("selector 'heads' needs retaining heads (apb.load(model, adapter))")
    a = inputs.num_anchor
    q_pre, k_pre, v_pre = inputs.capture.pop(inputs.layer_idx)
    return inputs.heads(inputs.layer_idx, q_pre[:, a:], k_pre[:, a:], v_pre[:, a:])


def _query_attention(inputs: SelectionInputs) -> torch.Tensor:
    if inputs.question_rows is None:
        raise ValueError("selector 'query_attention' needs the question in the anchor (query_in_anchor=True)")
    start, end = inputs.question_rows
    a = inputs.num_anchor
    question = inputs.query[:, :, start:end].float()  # [b, H, nq, d]
    keys = inputs.key[:, :, a:].float()  # [b, kv, L, d]
    batch, num_heads, num_question, head_dim = question.shape
    num_kv_heads = keys.shape[1]
    grouped = question.view(batch, num_kv_heads, num_heads // num_kv_heads, num_question, head_dim)
    logits = torch.einsum("bkgqd,bkld->bkgql", grouped, keys) * inputs.scaling
    weights = logits.softmax(dim=-1).sum(dim=(2, 3))  # [b, kv, L]
    return weights.transpose(1, 2)


def _random(inputs: SelectionInputs) -> torch.Tensor:
    batch, num_kv_heads = inputs.key.shape[0], inputs.key.shape[1]
    block_len = inputs.key.shape[2] - inputs.num_anchor
    seed = inputs.seed * 1_000_003 + inputs.host * 1009 + inputs.layer_idx
    generator = torch.Generator(device=inputs.key.device).manual_seed(seed)
    return torch.rand(batch, block_len, num_kv_heads, generator=generator, device=inputs.key.device)


def _oracle(inputs: SelectionInputs) -> torch.Tensor:
    if not inputs.oracle_scores or inputs.layer_idx not in inputs.oracle_scores:
        raise ValueError(
            "selector 'oracle' is for evaluation only: it needs the full-attention scores "
            "(APBModel.prefill(..., oracle_scores=apb.recall.attention_mass(model, context, query)))"
        )
    mass = inputs.oracle_scores[inputs.layer_idx]  # [b, kv, n]
    block_len = inputs.key.shape[2] - inputs.num_anchor
    return mass[:, :, inputs.block_start : inputs.block_start + block_len].transpose(1, 2).float()


register_selector("heads", _heads)
register_selector("query_attention", _query_attention)
register_selector("random", _random)
register_selector("oracle", _oracle)
