"""Passing-block recall: how much of the attention that matters a compressor passes on.

For each layer, KV head and host that passes a block, the recall is the share of the final query tokens'
attention mass (post-softmax, from a full-attention forward of the same input) that falls on the tokens
the host passed, divided by the share that an oracle, which knew that attention, would capture with the
same budget from the same candidates (the host's block tokens that may be passed). 1.0 = as good as the
oracle; the "oracle" selector (which ranks by this mass, then max-pools) comes close to it.

    mass = attention_mass(model, context_ids, query_ids)                # full attention, once
    with apbm.recording() as record:                                     # what every host passed
        apbm.prefill(context_ids, query_ids, config=config, num_hosts=4)
    summary = passing_recall(mass, record.plan, record.passing)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from apb.attention import activate
from apb.plan import HostPlan


@dataclasses.dataclass(kw_only=True, slots=True)
class _MassState:
    """Causal attention (the model's own result, through SDPA) that also sums, per KV head, the attention
    the last `num_rows` query rows give every key."""

    num_rows: int
    num_context: int
    mass: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def attend(self, module: nn.Module, query, key, value, scaling: float):
        num_heads, num_kv_heads = query.shape[1], key.shape[1]
        group = num_heads // num_kv_heads
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=group > 1
        )
        rows = query[:, :, -self.num_rows :].float()
        keys = key.float()
        batch, _, total, head_dim = keys.shape
        grouped = rows.view(batch, num_kv_heads, group, self.num_rows, head_dim)
        logits = torch.einsum("bkgqd,bksd->bkgqs", grouped, keys) * scaling
        first = total - self.num_rows  # row i sees keys <= first + i
        visible = torch.arange(total, device=keys.device)[None, :] <= (
            first + torch.arange(self.num_rows, device=keys.device)[:, None]
        )
        logits = logits.masked_fill(~visible, -math.inf)
        weights = logits.softmax(dim=-1).sum(dim=(2, 3))  # [b, kv, total]
        self.mass[module.layer_idx] = weights[:, :, : self.num_context]
        return out


@torch.no_grad()
def attention_mass(
    model: nn.Module, context_ids: torch.Tensor, query_ids: torch.Tensor
) -> dict[int, torch.Tensor]:
    """layer -> [batch, num_kv_heads, num_context]: the attention the query tokens give each context key
    in one full-attention forward of context + query (summed over the query rows and the KV group's
    query heads, so each row of a head sums to at most len(query) x group).

    `model` must have APB's attention installed (`apb.APBModel(model)` or `apb.load` did that)."""
    if context_ids.dim() == 1:
        context_ids = context_ids[None]
    if query_ids.dim() == 1:
        query_ids = query_ids[None]
    state = _MassState(num_rows=query_ids.shape[1], num_context=context_ids.shape[1])
    ids = torch.cat([context_ids, query_ids], dim=1)
    with activate(model.config, state):
        model.get_decoder()(input_ids=ids, use_cache=False)
    return state.mass


@dataclasses.dataclass(kw_only=True, slots=True)
class RecallSummary:
    """Recall of one prefill: the mean, and every (host, layer, KV head) value."""

    mean: float
    """Mean over every host that passes, layer and KV head (and batch row)."""
    per_host: dict[int, float]
    """host -> mean over its layers and KV heads."""
    values: list[dict[str, Any]]
    """One dict per (host, layer): {"host", "layer", "recall": [per KV head]} (batch-averaged)."""


def passing_recall(
    mass: dict[int, torch.Tensor], plan: HostPlan, passing: dict[int, dict[int, torch.Tensor]]
) -> RecallSummary:
    """Recall of the passing blocks `passing` (host -> layer -> [batch, kv, count] local indices, as
    `APBModel.recording` gives them) against the attention `mass` (`attention_mass`) under `plan`."""
    values, per_host = [], {}
    for host, per_layer in sorted(passing.items()):
        view = plan.hosts[host]
        start, end = view.block
        host_values = []
        for layer, idx in sorted(per_layer.items()):
            block_mass = mass[layer][:, :, start:end].float()  # [b, kv, L]
            captured = torch.gather(block_mass, 2, idx.to(block_mass.device)).sum(-1)  # [b, kv]
            candidates = block_mass[:, :, view.num_excluded :]
            best = candidates.topk(idx.shape[-1], dim=-1).values.sum(-1)
            recall = (captured / best.clamp_min(1e-30)).mean(0)  # [kv]
            values.append({"host": host, "layer": layer, "recall": recall.tolist()})
            host_values.append(recall.mean().item())
        if host_values:
            per_host[host] = sum(host_values) / len(host_values)
    all_values = [r for v in values for r in v["recall"]]
    mean = sum(all_values) / len(all_values) if all_values else float("nan")
    return RecallSummary(mean=mean, per_host=per_host, values=values)


@torch.no_grad()
def recall_runs(
    apbm: Any,
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    methods: dict[str, tuple[str, Any]],
    hosts: list[int],
    divisors: list[int],
    progress: bool = True,
    backend: str = "auto",
    split: str = "equal",
) -> list[dict[str, Any]]:
    """Passing-block recall of several compressors on the same inputs, one row per (sample, host count,
    budget, method): ``{"sample", "length", "hosts", "divisor", "passing_len", "method", "recall"}``.

    samples: ``(context_ids [n], query_ids [q], anchor_query_ids [a])``; the attention mass is that of the
    query rows. methods: name -> (selector, retaining heads or None); the APB config is the paper's for
    the length and host count (`APBConfig.for_length`) with passing_len = block / divisor, the attention
    `backend` and the host `split` (the paper's equal blocks unless asked: `APBConfig.split`).
    A setting the input does not fit (say, a question longer than the anchor) gets recall None and the
    reason."""
    from tqdm.auto import tqdm

    from apb.config import APBConfig

    rows = []
    total = len(samples) * len(hosts) * len(divisors) * len(methods)
    bar = tqdm(total=total, desc="recall", disable=not progress)
    for index, (context, query, anchor_query) in enumerate(samples):
        mass = attention_mass(apbm.model, context, query)
        n = context.shape[-1]
        for num_hosts in hosts:
            for divisor in divisors:
                passing_len = max(1, (n // num_hosts) // divisor)
                for name, (selector, heads) in methods.items():
                    row = {"sample": index, "length": n, "hosts": num_hosts, "divisor": divisor}
                    row.update(passing_len=passing_len, method=name, recall=None)
                    bar.update(1)
                    try:
                        config = APBConfig.for_length(
                            n,
                            num_hosts,
                            passing_len=passing_len,
                            selector=selector,
                            backend=backend,
                            split=split,
                        )
                    except ValueError as err:
                        rows.append({**row, "error": str(err)})
                        continue
                    if heads is not None:
                        apbm.heads = heads
                    try:
                        with apbm.recording() as record:
                            apbm.prefill(
                                context,
                                query,
                                config=config,
                                num_hosts=num_hosts,
                                anchor_query_ids=anchor_query,
                                oracle_scores=mass if selector == "oracle" else None,
                            )
                    except ValueError as err:
                        rows.append({**row, "error": str(err)})
                        continue
                    row["recall"] = passing_recall(mass, record.plan, record.passing).mean
                    rows.append(row)
    bar.close()
    return rows


def recall_markdown(rows: list[dict[str, Any]]) -> str:
    """Mean recall per method (rows) and (host count, budget) (columns), with the number of samples; rows
    that have a length ``cell`` (the evaluation's) get one more table per cell when there are several."""
    tables = [_recall_table(rows)]
    cells = sorted({r["cell"] for r in rows if r.get("cell") is not None})
    if len(cells) > 1:
        for cell in cells:
            tables += [
                f"\n{cell // 1024}K prompts only:\n",
                _recall_table([r for r in rows if r.get("cell") == cell]),
            ]
    return "\n".join(tables)


def _recall_table(rows: list[dict[str, Any]]) -> str:
    settings = sorted({(r["hosts"], r["divisor"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | " + " | ".join(f"H={h}, block/{d}" for h, d in settings) + " |"
    lines = [head, "|" + "---|" * (len(settings) + 1)]
    for method in methods:
        cells = []
        for h, d in settings:
            values = [r["recall"] for r in rows if (r["method"], r["hosts"], r["divisor"]) == (method, h, d)]
            done = [v for v in values if v is not None]
            cells.append(f"{sum(done) / len(done):.3f} (n={len(done)})" if done else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
