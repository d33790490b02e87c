"""APB's per-layer maths, plugged into an unmodified transformers model through its attention registry.

`install(model)` registers an attention function and a mask function named "apb" and switches the
model to them. While no APB state is active (plain `model(...)`, `model.generate(...)`) both delegate
to the model's original implementation (sdpa or eager), so the wrapped model behaves as before. While
a state is active (inside `APBModel.prefill` / `generate`), the mask function returns None (no
[seq, seq] mask is ever built) and the attention function runs one of two phases:

- :class:`PrefillState`: one host's context prefill. Input ``[anchor | local]``; per layer select the
  passing block, exchange it, attend over ``[passing | anchor | local]`` with the APB mask, keep the
  local block's post-RoPE K/V in the host's store. At the last layer only the K/V are kept: nothing
  reads the context rows' output there (the query and generated tokens run afterwards), so the host's
  forward stops (:class:`ContextStored`) before that layer's attention, output projection and MLP.
- :class:`DecodeState`: query / generated tokens. Every host attends with its store (all visible), the
  last host also over the new tokens' own K/V causally; partials are merged exactly by log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from apb.comm import Communicator
from apb.heads import ProjectionCapture, RetainingHeads
from apb.kernels import decode_attention, merge_partials
from apb.selectors import SelectionInputs

ATTN_NAME = "apb"

PREFILL_REGIONS: dict[str, str] = {
    "step": "APB's whole attention step of one layer: the regions below, plus concatenating the keys "
    "[passing | anchor | local] and keeping the local K/V in the host's store (at the last layer only the "
    "latter)",
    "score": "the passing-block selector scoring the local block (the retaining heads' MLP, or a "
    "training-free selector)",
    "top_k": "max-pooling the scores and choosing the top-k per KV head (`select_passing`)",
    "gather": "gathering the chosen tokens' K/V",
    "exchange": "the passing exchange (under torch.distributed, the all-gather, waiting for the other "
    "ranks included)",
    "attention": "the attention backend over [passing | anchor | local]",
}
"""Names of the timing regions the prefill marks when `APBModel.recording(regions=True)` is active, and
what each covers; `score`, `top_k` and `gather` only on hosts that select a passing block."""

# KV store of one host: per layer (k, v), each [batch, num_kv_heads, tokens, head_dim], post-RoPE.
LayerKV = tuple[torch.Tensor, torch.Tensor]

DECODE_ROOM = 1024
"""Generated tokens the last host's store has room for after the prefill (beside the query). Past it eager
steps double the store (`DecodeState`); graphed steps (`apb.steps`) grow it by this many tokens at a time."""


class ContextStored(Exception):
    """Raised by `PrefillState` once the last layer's K/V are in the host's store, to end the host's
    decoder forward there (caught by `APBModel`). The context rows' output of the last layer would go
    only to the final norm, which nothing reads; skipping that layer's attention, output projection and
    MLP saves about 1/num_layers of every host's prefill."""


# ---------------------------------------------------------------- maths


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool along the sequence, stride 1, same length. scores: [batch, seq, heads] -> same."""
    if kernel == 1:
        return scores
    left = (kernel - 1) // 2
    x = F.pad(scores.transpose(1, 2).float(), (left, kernel - 1 - left), value=float("-inf"))
    return F.max_pool1d(x, kernel_size=kernel, stride=1).transpose(1, 2)


def select_passing(scores: torch.Tensor, count: int, pool_kernel: int, num_excluded: int = 0) -> torch.Tensor:
    """Indices of the passing block: top-`count` pooled scores per KV head, in sequence order.

    scores: [batch, seq, num_kv_heads] raw head scores of the local block; the first `num_excluded`
    positions (anchor tokens, which every later host already has) are never chosen.
    Returns idx: [batch, num_kv_heads, count] (long, ascending).
    """
    pooled = pool_scores(scores, pool_kernel).transpose(1, 2)  # [batch, heads, seq]
    if num_excluded:
        pooled = pooled.clone()
        pooled[:, :, :num_excluded] = float("-inf")
    idx = pooled.topk(count, dim=-1).indices
    return idx.sort(dim=-1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim], idx: [batch, heads, count] -> [batch, heads, count, head_dim]."""
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


# ---------------------------------------------------------------- phase states


@dataclasses.dataclass(frozen=True, slots=True)
class TimedRegion:
    """One marked region of a host's prefill (see `PREFILL_REGIONS`); `start` and `end` are whatever
    the recording's clock returned (seconds from `time.perf_counter`, or a benchmark's CUDA events)."""

    host: int
    layer: int
    name: str
    start: Any
    end: Any


@dataclasses.dataclass(kw_only=True, slots=True)
class PrefillState:
    """One host's context prefill (see module docstring)."""

    host: int
    """This host's index."""
    num_anchor: int
    """Anchor tokens at the front of this host's input (0 on host 0)."""
    counts: list[int]
    """Passing-block size of every host (0 for the last host, whose block nobody reads)."""
    passing_all: bool
    """Pass every non-excluded local token (passing_len=None) instead of the heads' top-k."""
    num_excluded: int
    """Leading local tokens never passed (host 0: the anchor's positions)."""
    pool_kernel: int
    comm: Communicator
    backend: Callable
    selector: Callable | None = None
    """Scores the local block for the passing block (`apb.selectors`); None when passing all or none."""
    anchor_visible: bool = True
    """False: the anchor rows run but the local rows do not attend to them (host 0's probe anchor, or the
    anchor it runs for the later hosts)."""
    shared_anchor: int = 0
    """Anchor length host 0 sends to the later hosts at every layer (`APBConfig.share_anchor`; 0: none).
    Host 0 sends the K/V of its first `shared_anchor` rows; the others attend to them in front of their
    block and run no anchor rows."""
    question_rows: tuple[int, int] | None = None
    """[start, end) of the question among the anchor rows."""
    block_start: int = 0
    """Context position of the local block's first token."""
    heads: RetainingHeads | None = None
    capture: ProjectionCapture | None = None
    oracle_scores: dict[int, torch.Tensor] | None = None
    seed: int = 0
    room: int = 0
    """Free entries kept after the local K/V in the store (the last host: the query and generated tokens
    are appended there while decoding, see `DecodeState`)."""
    last_layer: int = -1
    """The decoder's last layer: there the local K/V are stored and `ContextStored` is raised before any
    selection, exchange or attention (-1: run every layer to its end)."""
    store: list[LayerKV | None] = dataclasses.field(default_factory=list)
    """Output: post-RoPE local K/V per layer ([batch, kv_heads, num_stored + room, head_dim])."""
    num_stored: int = 0
    """Output: how many of the store's entries per layer hold the local block."""
    passing_indices: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Output when recorded: layer -> indices (local coordinates) this host passed on."""
    record_indices: bool = False
    exchange_marks: list[tuple[Any, Any]] | None = None
    """When recorded: (start, end) `clock` marks around each passing exchange are appended here."""
    regions: list[TimedRegion] | None = None
    """When recorded with regions: a `TimedRegion` per marked region (`PREFILL_REGIONS`) is appended here."""
    clock: Callable[[], Any] | None = None

    def _mark(self) -> Any:
        return self.clock() if self.regions is not None else None

    def _region(self, name: str, layer_idx: int, start: Any) -> None:
        if self.regions is not None:
            self.regions.append(TimedRegion(self.host, layer_idx, name, start, self.clock()))

    def attend(self, module: nn.Module, query, key, value, scaling: float):
        if self.regions is None:
            return self._attend(module, query, key, value, scaling)
        start = self.clock()
        try:
            return self._attend(module, query, key, value, scaling)
        finally:  # the last layer's step too, which only stores the K/V and raises `ContextStored`
            self._region("step", module.layer_idx, start)

    def _attend(self, module: nn.Module, query, key, value, scaling: float):
        layer_idx = module.layer_idx
        a = self.num_anchor
        k_local, v_local = key[:, :, a:], value[:, :, a:]
        if layer_idx == self.last_layer:  # every rank stops here, before the layer's collectives
            self._keep(layer_idx, k_local, v_local)
            raise ContextStored
        earlier: list[LayerKV] = []
        anchor_kv = None
        if self.shared_anchor:  # started now, waited for at the exchange: it travels during the selection
            a_len = self.shared_anchor
            if self.host == 0:  # K and V of its first rows, one contiguous message
                kv = torch.stack([key[:, :, :a_len], value[:, :, :a_len]])
            else:  # where they arrive
                kv = key.new_empty(2, *key.shape[:2], a_len, key.shape[3])
            anchor_kv = self.comm.share_anchor(layer_idx, self.host, kv)
        marked = self.exchange_marks is not None or self.regions is not None
        if any(self.counts):
            count = self.counts[self.host]
            if count == 0:
                k_pass = key.new_zeros(*key.shape[:2], 0, key.shape[3])
                v_pass = k_pass
            elif self.passing_all:
                k_pass, v_pass = k_local[:, :, self.num_excluded :], v_local[:, :, self.num_excluded :]
            else:
                start = self._mark()
                scores = self.selector(
                    SelectionInputs(
                        layer_idx=layer_idx,
                        host=self.host,
                        query=query,
                        key=key,
                        num_anchor=a,
                        question_rows=self.question_rows,
                        block_start=self.block_start,
                        scaling=scaling,
                        heads=self.heads,
                        capture=self.capture,
                        oracle_scores=self.oracle_scores,
                        seed=self.seed,
                    )
                )
                self._region("score", layer_idx, start)
                start = self._mark()
                idx = select_passing(scores, count, self.pool_kernel, self.num_excluded)
                self._region("top_k", layer_idx, start)
                if self.record_indices:
                    self.passing_indices[layer_idx] = idx
                start = self._mark()
                k_pass, v_pass = gather_tokens(k_local, idx), gather_tokens(v_local, idx)
                self._region("gather", layer_idx, start)
        if any(self.counts) or anchor_kv is not None:
            start = self.clock() if marked else None
            if any(self.counts):
                earlier = self.comm.exchange_passing(layer_idx, self.host, k_pass, v_pass, self.counts)
            if anchor_kv is not None:
                received = anchor_kv()
                if self.host > 0:  # in front of the block, where its own anchor rows' keys would be
                    earlier.append((received[0], received[1]))
            if marked:
                end = self.clock()
                if self.exchange_marks is not None:
                    self.exchange_marks.append((start, end))
                if self.regions is not None:
                    self.regions.append(TimedRegion(self.host, layer_idx, "exchange", start, end))
        num_passing = sum(k.shape[2] for k, _ in earlier)
        if a and not self.anchor_visible:  # a probe anchor: its rows and the block's, apart
            assert not num_passing, "only host 0, which reads no passing block, has a probe anchor"
            start = self._mark()
            anchor_out, _ = self.backend(
                query[:, :, :a],
                key[:, :, :a],
                value[:, :, :a],
                num_passing=0,
                num_anchor=a,
                softmax_scale=scaling,
            )
            local_out, _ = self.backend(
                query[:, :, a:], k_local, v_local, num_passing=0, num_anchor=0, softmax_scale=scaling
            )
            out = torch.cat([anchor_out, local_out], dim=2)
            self._region("attention", layer_idx, start)
        else:
            if num_passing:
                keys = torch.cat([k for k, _ in earlier] + [key], dim=2)
                values = torch.cat([v for _, v in earlier] + [value], dim=2)
            else:
                keys, values = key, value
            start = self._mark()
            out, _ = self.backend(
                query, keys, values, num_passing=num_passing, num_anchor=a, softmax_scale=scaling
            )
            self._region("attention", layer_idx, start)
        self._keep(layer_idx, k_local, v_local)
        return out

    def _keep(self, layer_idx: int, k_local: torch.Tensor, v_local: torch.Tensor) -> None:
        """Put the local block's K/V of layer `layer_idx` into the store."""
        self.num_stored = k_local.shape[2]
        if self.room:  # the last host's store, with room after it for the tokens that follow
            k_local, v_local = with_room(k_local, self.room), with_room(v_local, self.room)
        else:  # one copy now, not one per decoding step; and no view keeping the anchor's storage alive
            k_local, v_local = k_local.contiguous(), v_local.contiguous()
        while len(self.store) <= layer_idx:
            self.store.append(None)
        self.store[layer_idx] = (k_local, v_local)


@dataclasses.dataclass(kw_only=True, slots=True)
class DecodeState:
    """Query / generated tokens attending to every host's store (Star Attention phase 2).

    Each host runs one attention per layer over its store: the last host's store has room after its
    block (`PrefillState.room`) where the new tokens' K/V are written, so its call covers the block (all
    visible) and the new tokens (causal) at once. The partials are gathered and merged in one launch
    (`apb.kernels.merge_partials`): decoding is bound by launches, not by the GPU."""

    stores: dict[int, list[LayerKV]]
    """host -> per-layer context K/V, for the hosts that live in this process."""
    last_host: int
    comm: Communicator
    context_len: int = 0
    """Entries of the last host's store that hold its block (the new tokens' K/V follow them)."""
    appended: dict[int, int] = dataclasses.field(default_factory=dict)
    """Last host only: layer -> query and generated tokens appended to its store so far."""
    slot: torch.Tensor | None = None
    """Graphed steps (`apb.steps`): the store index of this step's one token, a one-element device tensor
    that the step reads at run time (so a CUDA graph recorded once serves every step); None: eager steps,
    which append after `appended` and grow the store when it is full."""
    valid: torch.Tensor | None = None
    """Graphed steps: `slot` + 1, the entries of the last host's store its attention reads."""

    def attend(self, module: nn.Module, query, key, value, scaling: float):
        layer_idx = module.layer_idx
        outs, lses = [], []
        for host in sorted(self.stores):
            k_ctx, v_ctx = self.stores[host][layer_idx]
            num_prefix = valid = None
            if host == self.last_host and self.slot is not None:
                k_ctx.index_copy_(2, self.slot, key)  # the whole buffer; the kernel reads `valid` entries
                v_ctx.index_copy_(2, self.slot, value)
                valid = self.valid
            elif host == self.last_host:
                k_ctx, v_ctx, num_prefix = self._append(layer_idx, key, value)
            out, lse = decode_attention(
                query, k_ctx, v_ctx, num_prefix=num_prefix, softmax_scale=scaling, valid_keys=valid
            )
            outs.append(out)
            lses.append(lse)
        all_outs, all_lses = self.comm.gather_partials(outs, lses)
        out, _ = merge_partials(all_outs, all_lses, out_dtype=query.dtype)
        return out

    @property
    def filled(self) -> int:
        """Entries of the last host's store in use: its block, then the query and generated tokens (every
        layer has as many: each step runs them all)."""
        return self.context_len + max(self.appended.values(), default=0)

    def reserve(self, tokens: int) -> bool:
        """Room in the last host's store for `tokens` more at every layer, grown now where it lacks it
        (graphed steps write into the buffers they were recorded with, so those must not be replaced while
        they replay). Returns whether any buffer was replaced."""
        need = self.filled + tokens
        grown = False
        for layer_idx, (k_buf, _) in enumerate(self.stores.get(self.last_host, [])):
            if k_buf.shape[2] < need:
                self._grow(layer_idx, need)
                grown = True
        return grown

    def advance(self, tokens: int = 1) -> None:
        """Count `tokens` written at every layer by graphed steps (which run no Python per layer)."""
        for layer_idx in range(len(self.stores.get(self.last_host, ()))):
            self.appended[layer_idx] = self.appended.get(layer_idx, 0) + tokens

    def _append(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """Write the new tokens' K/V after the last host's block (growing the store when it has no room
        left); returns the filled part of its K and V and how many entries come before the new tokens."""
        k_buf = self.stores[self.last_host][layer_idx][0]
        filled = self.context_len + self.appended.get(layer_idx, 0)
        end = filled + key.shape[2]
        if end > k_buf.shape[2]:
            self._grow(layer_idx, max(end, 2 * k_buf.shape[2]))
        k_buf, v_buf = self.stores[self.last_host][layer_idx]
        k_buf[:, :, filled:end] = key
        v_buf[:, :, filled:end] = value
        self.appended[layer_idx] = end - self.context_len
        return k_buf[:, :, :end], v_buf[:, :, :end], filled

    def _grow(self, layer_idx: int, length: int) -> None:
        """Replace layer `layer_idx`'s buffers of the last host's store by ones of `length` entries holding
        its filled part (the rest left uninitialised)."""
        store = self.stores[self.last_host]
        filled = self.context_len + self.appended.get(layer_idx, 0)
        store[layer_idx] = tuple(with_room(buf[:, :, :filled], length - filled) for buf in store[layer_idx])


def with_room(x: torch.Tensor, room: int) -> torch.Tensor:
    """x [batch, heads, n, head_dim] copied into a new [batch, heads, n + room, head_dim] buffer (the room
    left uninitialised)."""
    buf = x.new_empty(*x.shape[:2], x.shape[2] + room, x.shape[3])
    buf[:, :, : x.shape[2]] = x
    return buf


# ---------------------------------------------------------------- transformers glue

_ORIGINAL_IMPL: dict[int, str] = {}  # id(model config) -> implementation before install
_ACTIVE: list[tuple[int, Any]] = []  # stack of (id(config), state)


@contextmanager
def activate(config: Any, state: PrefillState | DecodeState) -> Iterator[None]:
    """Route `config`'s model's attention through `state` for the duration."""
    _ACTIVE.append((id(config), state))
    try:
        yield
    finally:
        _ACTIVE.pop()


def _active_state(config: Any):
    if _ACTIVE and _ACTIVE[-1][0] == id(config):
        return _ACTIVE[-1][1]
    return None


def _original_attention(module: nn.Module) -> Callable:
    name = _ORIGINAL_IMPL.get(id(module.config), "sdpa")
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"no attention implementation {name!r} to delegate to for {type(module).__name__}")
    return eager


def apb_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function. query: [batch, heads, seq, head_dim], key/value:
    [batch, kv_heads, seq, head_dim] post-RoPE -> ([batch, seq, heads, head_dim], None)."""
    state = _active_state(module.config)
    if state is None:
        return _original_attention(module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = state.attend(module, query, key, value, scale)
    return out.transpose(1, 2), None


def apb_mask_function(*args: Any, **kwargs: Any):
    """transformers mask function: None while APB is active (no [seq, seq] mask), else the original's."""
    config = kwargs.get("config")
    if config is not None and _active_state(config) is not None:
        return None
    name = _ORIGINAL_IMPL.get(id(config), "sdpa")
    fn = ALL_MASK_ATTENTION_FUNCTIONS.get(name, sdpa_mask)
    return fn(*args, **kwargs)


_OPAQUE_ATTENTION = torch.compiler.disable(apb_attention_forward)
"""What is registered: `apb_attention_forward`, which `torch.compile` does not trace into. A compiled attention
module (`apb.compile_layers`) then runs APB's prefill and decoding steps eagerly, as they are, between a
compiled graph before them (projections, RoPE) and one after (the output projection); its host-by-host
blocks, passing sets and backends never reach a guard."""


def install(model: nn.Module) -> None:
    """Register the "apb" functions and switch `model` to them (idempotent)."""
    AttentionInterface.register(ATTN_NAME, _OPAQUE_ATTENTION)
    AttentionMaskInterface.register(ATTN_NAME, apb_mask_function)
    config = model.config
    current = config._attn_implementation
    if current == ATTN_NAME:
        return
    _ORIGINAL_IMPL[id(config)] = current or "sdpa"
    set_implementation(model, ATTN_NAME)


def uninstall(model: nn.Module) -> None:
    """Give `model` back its original attention implementation."""
    original = _ORIGINAL_IMPL.pop(id(model.config), None)
    if original is not None:
        set_implementation(model, original)


def set_implementation(model: nn.Module, name: str) -> None:
    """Switch `model` to the transformers attention implementation `name` (registered already):
    `set_attn_implementation` where the model takes it, else the config field directly (older
    transformers, or names it does not know)."""
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError, TypeError):
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        model.config._attn_implementation = name
