"""One host view: what every APB host holds, reads and passes on.

A :class:`HostPlan` is built from an :class:`~apb.config.APBConfig`, the context length, the query length
and the number of hosts. Everything that depends on "which host sees what" comes from it: the prefill
(`APBModel`), the passing counts, the benchmarks and the training-sample builder (`apb.data.layout`),
so heads are trained on exactly the view that inference runs.

Host h > 0 attends over ``[anchor | block]`` (host 0 over its block only): the anchor is the first
context tokens with the query spliced in after `query_offset` tokens (``query_in_anchor``), at positions
``0..anchor_len-1``; the block is the context slice ``[start, end)`` at its true positions. Host 0's
first `anchor_len` block tokens are never passed on (every later host holds them in its anchor).

Who computes the anchor (``APBConfig.share_anchor``): in the paper every host h > 0 runs the anchor
rows in front of its block. The anchor rows see only the anchor, so every host computes the same anchor
K/V; with ``share_anchor`` (the default) host 0 computes them once and sends them at every layer, and
hosts h > 0 run their block alone. Without a query spliced in, host 0's first block tokens are the
anchor and cost it nothing; with one, host 0 runs the anchor rows apart from its block
(``anchor_visible=False``). The attention is the same; the work of the anchor rows is done once instead
of H - 1 times.

Splits (``APBConfig.split``):

- ``"balanced"`` (the default): block sizes from a cost model (:class:`CostModel`: linear work per token
  plus attention work per visible query-key pair) so that every host's predicted time is the same. The
  last host attends over the anchor and every earlier host's passing block, host 0 over its own block
  only, so with equal blocks the early hosts wait at every layer's all-gather; the balanced split gives
  them more tokens instead. With the shared anchor it cuts APB's prefill by 7-9% at 128K (4 and 8 simulated
  hosts on an H200). On SmolLM2 at 2K-8K it scored +0.5 +- 0.6 points against the equal split with 2 hosts
  and +0.3 +- 0.7 with 4 (paired on the same items, 95% intervals; benchmarks/RESULTS.md).
- ``"equal"``: n // H tokens a host, the paper's split.

Exact mode (`APBConfig.exact`, no compression) is exact under any split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from apb.config import APBConfig


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class HostView:
    """One host's share of the prefill."""

    host: int
    """Host index (0 = the start of the context)."""
    block: tuple[int, int]
    """[start, end) of the context tokens this host owns (and keeps in its cache)."""
    num_anchor: int
    """Anchor tokens in front of the block (0 on host 0 and with a single host)."""
    num_excluded: int
    """Leading block tokens never passed on (host 0: the anchor's positions)."""
    passing_count: int
    """Entries per KV head this host passes on (0 for the last host, whose block nobody reads)."""
    reads: tuple[int, ...]
    """Earlier hosts whose passing blocks this host attends to (those that pass anything)."""
    anchor_visible: bool = True
    """False when host 0 runs anchor rows its block does not see: the probe anchor of the
    "query_attention" selector (so that the question's queries exist) or the anchor it runs for the later
    hosts (`APBConfig.share_anchor`); host 0's block results stay exact either way."""
    received_anchor: int = 0
    """Anchor keys this host's block attends to but does not compute: host 0 sends their K/V at every
    layer (`APBConfig.share_anchor`); this host then runs no anchor rows (num_anchor == 0)."""
    serves_anchor: bool = False
    """Host 0 sends the anchor's K/V to the later hosts at every layer: those of its anchor rows, or, with
    no query spliced in, those of its first anchor_len block tokens, which are the anchor."""

    @property
    def block_len(self) -> int:
        return self.block[1] - self.block[0]

    @property
    def num_tokens(self) -> int:
        """Tokens this host runs through the decoder: anchor rows + block."""
        return self.num_anchor + self.block_len

    def position_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[num_anchor + block_len]: anchor 0..num_anchor-1, then the block's true positions."""
        block = torch.arange(self.block[0], self.block[1], device=device)
        if not self.num_anchor:
            return block
        return torch.cat([torch.arange(self.num_anchor, device=device), block])

    def input_ids(self, context: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """context: [batch, n], anchor: [batch, anchor_len] -> [batch, num_anchor + block_len]."""
        local = context[:, self.block[0] : self.block[1]]
        if not self.num_anchor:
            return local
        return torch.cat([anchor[:, : self.num_anchor], local], dim=1)


MEASURED_ATTENTION_WEIGHT = 0.81
"""Time of an attention FLOP over that of a token-linear FLOP in a host's forward, fitted to the 12 hosts of
one simulated 128K / 4-host run on an H200 (Llama-3.1-8B shape, FlashAttention-4, compiled layers; three
splits): linear work ran at 536 effective TFLOP/s (the GEMMs plus the norms, RoPE, activations and
selection around them), attention at 662, and the two-term model matched every host within 1.6%
(benchmarks/RESULTS.md). With FLOPs alone (weight 1) the balanced split gave host 0, whose work is mostly
linear, 2-4% too many tokens. `APBModel.calibrate` fits it for another GPU, backend or model (the Triton backend
on the same H200: 1.16)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CostModel:
    """Predicted time of one host's prefill, in FLOP-equivalents.

    cost = flops_per_token * tokens + attention_weight * flops_per_pair * visible (query, key) pairs.

    FLOPs alone balanced 4 H200s to within 7% busy time at 32K-256K (Llama-3.1-8B shape); a term for the
    retaining heads' selection work, calibrated on one run, moved the imbalance to the last host instead
    (benchmarks/RESULTS.md), so it is left out.
    """

    flops_per_token: float
    """Token-linear work of one context token through the decoder (QKV, O-projection, MLP): 2 x their
    weights in every layer but the last, where a host computes only the K/V it keeps."""
    flops_per_pair: float
    """Attention work of one visible (query, key) pair through the decoder: 4 x num_heads x head_dim in every
    layer but the last, which runs no attention for the context."""
    attention_weight: float = 1.0
    """Time of one attention FLOP relative to one linear FLOP (1.0: both run at the same rate)."""

    def __post_init__(self) -> None:
        if not self.flops_per_token > 0 or self.flops_per_pair < 0 or not self.attention_weight >= 0:
            raise ValueError(
                f"CostModel needs flops_per_token > 0, flops_per_pair >= 0 and attention_weight >= 0; got "
                f"{self.flops_per_token}, {self.flops_per_pair}, {self.attention_weight}"
            )

    @classmethod
    def from_model_config(cls, config: Any, attention_weight: float | None = None) -> CostModel:
        """From a transformers config of a GQA decoder (hidden_size, intermediate_size, head counts);
        `attention_weight` None: `MEASURED_ATTENTION_WEIGHT`."""
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        layers = config.num_hidden_layers
        kv_weights = hidden * 2 * num_kv_heads * head_dim  # k, v
        weights = kv_weights + hidden * num_heads * head_dim  # q
        weights += num_heads * head_dim * hidden  # o
        weights += 3 * hidden * intermediate  # gated MLP
        # the last layer computes only the context's K and V (`apb.attention.ContextStored`)
        return cls(
            flops_per_token=2.0 * (weights * (layers - 1) + kv_weights),
            flops_per_pair=4.0 * num_heads * head_dim * (layers - 1),
            attention_weight=MEASURED_ATTENTION_WEIGHT if attention_weight is None else attention_weight,
        )

    @property
    def _pair(self) -> float:
        return self.flops_per_pair * self.attention_weight

    def host_cost(
        self, num_anchor: int, block_len: float, num_passing: int, anchor_visible: bool = True
    ) -> float:
        """One host's cost from its work (`host_work`)."""
        return self.work_cost(*host_work(num_anchor, block_len, num_passing, anchor_visible))

    def work_cost(self, tokens: float, pairs: float) -> float:
        """The cost of `tokens` through the decoder with `pairs` visible (query, key) pairs."""
        return self.flops_per_token * tokens + self._pair * pairs

    def fit(self, samples: Sequence[tuple[float, float, float]]) -> Calibration:
        """This cost model with the attention weight fitted to measured host times.

        `samples`: (tokens, pairs, seconds) of timed hosts (`HostPlan.work` gives the first two). Fits
        seconds = fixed + tokens * flops_per_token / linear_rate + pairs * flops_per_pair / attention_rate
        by least squares on the relative error. The fixed part (launches, syncs: the same on every host)
        does not move a balanced split and is left out of the cost model. `ValueError` when the samples
        cannot separate the two rates: fewer than three, hosts whose work differs too little, or times
        that do not grow with the work (too short a context, where fixed costs dominate)."""
        rows = [tuple(float(x) for x in sample) for sample in samples]
        if len(rows) < 3 or any(len(row) != 3 for row in rows):
            raise ValueError(f"fit needs at least 3 (tokens, pairs, seconds) samples, got {samples!r}")
        if not all(tokens > 0 and pairs >= 0 and seconds > 0 for tokens, pairs, seconds in rows):
            raise ValueError(f"fit needs tokens > 0, pairs >= 0 and seconds > 0 in every sample, got {rows}")
        # each row divided by its time: least squares on the relative error
        design = torch.tensor(
            [[1.0 / t, self.flops_per_token * n / t, self.flops_per_pair * p / t] for n, p, t in rows],
            dtype=torch.float64,
        )
        scale = design.abs().amax(dim=0).clamp_min(1e-300)
        singular = torch.linalg.svdvals(design / scale)
        if singular[-1] < 1e-6 * singular[0]:
            raise ValueError(
                "the timed hosts' work does not vary enough to tell linear from attention work apart: time "
                "hosts whose share of attention differs (several hosts, two context lengths)"
            )
        solution = torch.linalg.lstsq(design / scale, torch.ones(len(rows), 1, dtype=torch.float64))
        fixed, per_linear, per_attention = (solution.solution.squeeze(1) / scale).tolist()
        if not (per_linear > 0 and per_attention > 0 and fixed >= -0.05 * min(t for _, _, t in rows)):
            raise ValueError(
                "the host times do not fit fixed + linear + attention work (fitted seconds per linear FLOP "
                f"{per_linear:.3g}, per attention FLOP {per_attention:.3g}, fixed {fixed:.3g} s): at this length "
                "costs the model does not count dominate; time a longer context"
            )
        predicted = design @ torch.tensor([fixed, per_linear, per_attention], dtype=torch.float64)
        return Calibration(
            cost=dataclasses.replace(self, attention_weight=per_attention / per_linear),
            linear_tflops=1e-12 / per_linear,
            attention_tflops=1e-12 / per_attention,
            fixed_seconds=max(fixed, 0.0),
            max_error=float((predicted - 1).abs().max()),
            samples=tuple(rows),
        )

    def max_block(
        self, budget: float, num_anchor: int, num_passing: int, anchor_visible: bool = True
    ) -> float:
        """The largest (real) block whose `host_cost` stays within `budget` (0 if even none fits)."""
        a = num_anchor
        fixed = self.flops_per_token * a + self._pair * a * (a + 1) / 2
        spare = budget - fixed
        if spare <= 0:
            return 0.0
        linear = self.flops_per_token + self._pair * (num_passing + (a if anchor_visible else 0) + 0.5)
        if self._pair == 0:
            return spare / linear
        # pair/2 * b^2 + linear * b - spare = 0
        return (-linear + math.sqrt(linear * linear + 2.0 * self._pair * spare)) / self._pair


def host_work(
    num_anchor: int, block_len: float, num_passing: int, anchor_visible: bool = True
) -> tuple[float, float]:
    """(tokens run through the decoder, visible (query, key) pairs) of one host. Anchor rows see the anchor
    causally; block rows see the passing keys, the whole anchor (unless `anchor_visible` is False: host 0's
    probe anchor, `HostView.anchor_visible`) and the block causally."""
    a, b = num_anchor, block_len
    seen = num_passing + (a if anchor_visible else 0)
    return a + b, a * (a + 1) / 2 + b * seen + b * (b + 1) / 2


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Calibration:
    """What `CostModel.fit` made of measured host times (`APBModel.calibrate`)."""

    cost: CostModel
    """The cost model with the fitted `attention_weight`."""
    linear_tflops: float
    """Effective rate of the token-linear work: the GEMMs and everything per token around them."""
    attention_tflops: float
    """Effective rate of the attention work."""
    fixed_seconds: float
    """Per-host time that grows with neither (the same on every host, so no part of the split)."""
    max_error: float
    """Largest |predicted - measured| / measured over the samples."""
    samples: tuple[tuple[float, float, float], ...]
    """(tokens, pairs, seconds) of every timed host."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (for logs and benchmark records)."""
        return {
            "attention_weight": self.cost.attention_weight,
            "linear_tflops": self.linear_tflops,
            "attention_tflops": self.attention_tflops,
            "fixed_seconds": self.fixed_seconds,
            "max_error": self.max_error,
            "samples": [list(sample) for sample in self.samples],
        }


class HostPlan:
    """Every host's view of one APB prefill (module docstring). Raises `ValueError` for inputs that do
    not fit: a context shorter than the hosts, an anchor larger than host 0's block, a query that does
    not fit in the anchor."""

    def __init__(
        self,
        config: APBConfig,
        num_context: int,
        num_query: int,
        num_hosts: int,
        cost: CostModel | None = None,
    ):
        for name, value, low in (("num_context", num_context, 1), ("num_query", num_query, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(num_hosts, int) or isinstance(num_hosts, bool) or num_hosts < 1:
            raise ValueError(f"num_hosts must be an int >= 1, got {num_hosts!r}")
        if num_context < num_hosts:
            raise ValueError(
                f"context of {num_context} tokens is too short for {num_hosts} hosts: "
                f"need at least {num_hosts} (one token per host)"
            )
        self.config = config
        self.num_context = num_context
        self.num_query = num_query
        self.num_hosts = num_hosts
        self.anchor_len = config.anchor_len if num_hosts > 1 else 0
        self.shares_anchor = (
            config.share_anchor
            and self.anchor_len > 0
            and not (config.selector == "query_attention" and config.needs_selection)
        )
        """Host 0 computes the anchor for every host (`APBConfig.share_anchor`; not with the
        "query_attention" selector, which needs the question's queries on every host)."""
        self._check_query()
        if num_hosts > 1 and self.anchor_len:
            # the anchor must fit in host 0's block, and every other host needs a token
            need = self.anchor_len * num_hosts if config.split == "equal" else self.anchor_len + num_hosts - 1
            if num_context < need:
                raise ValueError(
                    f"context of {num_context} tokens is too short for anchor_len={config.anchor_len} with "
                    f"{num_hosts} hosts: the anchor must fit in host 0's block ({config.split} split); need at "
                    f"least {need} tokens or a smaller anchor"
                )
        if config.split == "balanced" and num_hosts > 1:
            if cost is None:
                raise ValueError(
                    "split='balanced' (the default) sizes the blocks from the model's costs: pass "
                    "cost=CostModel.from_model_config(model.config), or build the plan with "
                    "APBModel.plan(...), which passes its model's, or use split='equal'"
                )
            sizes = self._balanced_sizes(cost)
        else:
            sizes = equal_sizes(num_context, num_hosts)
        assert min(sizes) >= 1 and sizes[0] >= self.anchor_len, sizes
        self.hosts: tuple[HostView, ...] = self._views(sizes)

    # ------------------------------------------------------------------ views

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return [v.block for v in self.hosts]

    @property
    def counts(self) -> list[int]:
        """Passing-block entries per KV head of every host (what the all-gather carries)."""
        return [v.passing_count for v in self.hosts]

    @property
    def num_excluded(self) -> list[int]:
        return [v.num_excluded for v in self.hosts]

    @property
    def shared_anchor_len(self) -> int:
        """Anchor tokens host 0 sends to the others at every layer (0 when every host runs its own)."""
        return self.anchor_len if self.shares_anchor else 0

    def num_passing_keys(self, host: int) -> int:
        """Passing keys host `host` attends to (the sum of the earlier hosts' counts)."""
        return sum(self.hosts[j].passing_count for j in self.hosts[host].reads)

    def attention_shape(self, host: int) -> tuple[int, int, int]:
        """(num_passing, num_anchor, num_local) of host `host`'s attention call (`apb.kernels`): an anchor
        received from host 0 sits among the keys in front of the block like a passing block."""
        view = self.hosts[host]
        return self.num_passing_keys(host) + view.received_anchor, view.num_anchor, view.block_len

    def anchor_ids(self, context: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """The anchor every host h > 0 puts in front of its block: [batch, anchor_len].

        context: [batch, n]; query: [batch, q] (the tokens spliced in when ``query_in_anchor``)."""
        return splice_anchor(context, query, self.config, self.anchor_len)

    def host_inputs(
        self, host: int, context: torch.Tensor, anchor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Host `host`'s decoder input: (ids [batch, tokens], position ids [tokens])."""
        view = self.hosts[host]
        return view.input_ids(context, anchor), view.position_ids(context.device)

    def work(self) -> list[tuple[float, float]]:
        """Every host's (tokens, visible (query, key) pairs) under this plan (`host_work`)."""
        work = []
        for view in self.hosts:
            keys_before, rows, block = self.attention_shape(view.host)
            work.append(host_work(rows, block, keys_before, view.anchor_visible))
        return work

    def predicted_costs(self, cost: CostModel) -> list[float]:
        """Every host's `CostModel.host_cost` under this plan."""
        return [cost.work_cost(tokens, pairs) for tokens, pairs in self.work()]

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (block sizes, anchor, passing counts) for logs and benchmark records."""
        return {
            "split": self.config.split,
            "blocks": [v.block_len for v in self.hosts],
            "anchor_len": self.anchor_len,
            "shared_anchor": self.shares_anchor,
            "passing_counts": self.counts,
        }

    # ------------------------------------------------------------------ construction

    def _check_query(self) -> None:
        cfg = self.config
        if cfg.query_in_anchor and self.num_hosts > 1 and self.num_query + cfg.query_offset > cfg.anchor_len:
            raise ValueError(
                f"query of {self.num_query} tokens does not fit in the anchor: anchor_len={cfg.anchor_len} "
                f"holds at most {max(0, cfg.anchor_len - cfg.query_offset)} query tokens after "
                f"query_offset={cfg.query_offset}"
            )

    def _count(self, host: int, block_len: int) -> tuple[int, int]:
        """(num_excluded, passing_count) of host `host` holding `block_len` tokens."""
        excluded = min(self.anchor_len, block_len) if host == 0 else 0
        available = block_len - excluded
        if host == self.num_hosts - 1:
            return excluded, 0
        if self.config.passing_len is None:
            return excluded, available
        return excluded, min(self.config.passing_len, available)

    @property
    def question_rows(self) -> tuple[int, int] | None:
        """[start, end) of the query tokens among the anchor rows (None when none are spliced in)."""
        if not (self.config.query_in_anchor and self.anchor_len):
            return None
        return self.config.query_offset, self.config.query_offset + self.num_query

    def _views(self, sizes: list[int]) -> tuple[HostView, ...]:
        views, start, passers = [], 0, []
        for host, size in enumerate(sizes):
            excluded, count = self._count(host, size)
            rows, visible, received = self._anchor_layout(host, count > 0)
            views.append(
                HostView(
                    host=host,
                    block=(start, start + size),
                    num_anchor=rows,
                    num_excluded=excluded,
                    passing_count=count,
                    reads=tuple(passers),
                    anchor_visible=visible,
                    received_anchor=received,
                    serves_anchor=host == 0 and self.shares_anchor,
                )
            )
            if count:
                passers.append(host)
            start += size
        assert start == self.num_context, (sizes, self.num_context)
        return tuple(views)

    def _anchor_layout(self, host: int, host0_passes: bool) -> tuple[int, bool, int]:
        """(anchor rows host `host` runs, whether its block sees them, anchor keys it receives)."""
        a = self.anchor_len
        if host > 0:
            return (0, True, a) if self.shares_anchor else (a, True, 0)
        if self._host0_probe(host0_passes) or (self.shares_anchor and self.config.query_in_anchor):
            return a, False, 0  # rows its block does not see: a probe, or the anchor run for the others
        return 0, True, 0

    def _host0_probe(self, host0_passes: bool) -> bool:
        """Whether host 0 runs the anchor as a probe: when its selector reads the question's attention
        and it passes anything."""
        selects = self.config.selector == "query_attention" and self.config.needs_selection
        return selects and host0_passes and self.anchor_len > 0

    def _balanced_sizes(self, cost: CostModel) -> list[int]:
        """Block sizes that give every host the same predicted cost (bisection on that cost)."""
        n, hosts = self.num_context, self.num_hosts

        host0_passes = self.config.passing_len != 0

        def fill(budget: float) -> list[float]:
            sizes, passing = [], 0
            for host in range(hosts):
                rows, visible, received = self._anchor_layout(host, host0_passes)
                size = cost.max_block(budget, rows, passing + received, anchor_visible=visible)
                sizes.append(size)
                passing += self._count(host, int(size))[1]
            return sizes

        low, high = 0.0, cost.host_cost(self.anchor_len, n, n)  # one host holding and reading everything
        for _ in range(100):
            mid = (low + high) / 2
            if sum(fill(mid)) >= n:
                high = mid
            else:
                low = mid
            if high - low <= 1e-9 * high:
                break
        return _round_sizes(fill(high), n, minimum=[max(1, self.anchor_len)] + [1] * (hosts - 1))


def equal_sizes(num_context: int, num_hosts: int) -> list[int]:
    """n // H tokens a host; the remainder one token each to the last hosts (so host 0, whose block
    holds the anchor, is never the longest)."""
    base, remainder = divmod(num_context, num_hosts)
    return [base + (1 if host >= num_hosts - remainder else 0) for host in range(num_hosts)]


def _round_sizes(sizes: list[float], total: int, minimum: list[int]) -> list[int]:
    """Integer sizes summing to `total`, each >= its minimum, rounding the boundaries (cumulative sums)
    of the real-valued `sizes` scaled to `total`."""
    scale = total / sum(sizes)
    bounds, acc = [0], 0.0
    for size in sizes[:-1]:
        acc += size * scale
        bounds.append(round(acc))
    bounds.append(total)
    out = [max(bounds[i + 1] - bounds[i], 0) for i in range(len(sizes))]
    for i, low in enumerate(minimum):  # a block below its minimum borrows from the largest
        while out[i] < low:
            donor = max(range(len(out)), key=lambda j: out[j] - minimum[j])
            if out[donor] - minimum[donor] <= 0:
                break
            take = min(low - out[i], out[donor] - minimum[donor])
            out[i] += take
            out[donor] -= take
    return out


def splice_anchor(
    context: torch.Tensor, query: torch.Tensor, config: APBConfig, anchor_len: int
) -> torch.Tensor:
    """The anchor: ``context[:anchor_len]``, or with ``query_in_anchor`` the first `query_offset`
    context tokens, the query, then context tokens up to `anchor_len` in all. [batch, anchor_len]."""
    if not config.query_in_anchor or anchor_len == 0:
        return context[:, :anchor_len]
    offset, num_query = config.query_offset, query.shape[1]
    rest = anchor_len - offset - num_query
    return torch.cat([context[:, :offset], query, context[:, offset : offset + rest]], dim=1)
