"""APB run-time settings: anchor and passing sizes, the query splice, the attention backend."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# APB's anchor cap (DESIGN.md table: 256K and 512K both use 8192).
MAX_DEFAULT_ANCHOR = 8192

SPLITS = ("balanced", "equal")
"""Ways to cut the context into host blocks (`APBConfig.split`)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class APBConfig:
    """How one APB prefill compresses and passes context between hosts.

    ``APBConfig()`` (or :meth:`exact`) is the exact mode: no anchor and every token of the earlier
    hosts passed on, which equals causal attention over the whole context.
    """

    anchor_len: int = 0
    """Tokens in the anchor block every host h > 0 puts before its local block (the first context
    tokens, positions 0..anchor_len-1). 0 = no anchor."""
    passing_len: int | None = None
    """Passing-block entries per KV head each host sends to the later hosts (top scores of the
    retaining heads). None = keep every non-anchor token (no heads needed); 0 = pass nothing
    (Star Attention)."""
    query_in_anchor: bool = False
    """Splice the query into the anchor after `query_offset` context tokens (APB's query-aware
    anchor); the anchor keeps `anchor_len` tokens, so context tokens make room for the query."""
    pool_kernel: int = 5
    """Width of the max-pool (stride 1, same length) applied to head scores along the sequence before
    the top-k, so neighbours of an important token travel with it."""
    query_offset: int = 16
    """Context tokens kept before the spliced query (the reference uses 16: the prompt's preamble)."""
    backend: str = "auto"
    """Attention backend name (see `apb.backends.available_backends()`); "auto" = FlashAttention-4 on CUDA
    when installed and it takes the input, else triton, else flex; sdpa on the CPU (`apb.backends`)."""
    selector: str = "heads"
    """What scores a host's block to choose its passing block (`apb.selectors`): "heads" (the adapter's
    retaining heads), "query_attention" (training-free: the attention the question in the anchor gives
    each key; needs query_in_anchor), "random" (a control), "oracle" (evaluation only)."""
    split: str = "balanced"
    """How the context is cut into host blocks (`apb.plan`): "balanced" (the default) sizes the blocks so
    that every host's predicted work is the same (later hosts attend over more keys, so they get fewer
    tokens): 7-9% faster than the equal split at 128K with the shared anchor (4 and 8 simulated hosts on an
    H200), and on our small-model eval +0.5 +- 0.6 points (2 hosts) and +0.3 +- 0.7 (4 hosts) against the
    equal split on the same items (benchmarks/RESULTS.md: speed and accuracy). "equal" gives every host
    n // H tokens, as in the paper."""

    share_anchor: bool = True
    """Host 0 runs the anchor once and sends its K/V to the later hosts at every layer, instead of every
    host h > 0 running the same anchor rows itself (`apb.plan`). The anchor rows see only the anchor either
    way, so the attention is the same and the result equal up to rounding; hosts h > 0 save the anchor's
    share of their work (a fifth of it with the paper's anchor = block / 4). Not with the
    "query_attention" selector, which reads the question's queries on every host. False: every host runs
    its own anchor, as in the paper."""

    def __post_init__(self) -> None:
        if not isinstance(self.anchor_len, int) or self.anchor_len < 0:
            raise ValueError(f"anchor_len must be an int >= 0, got {self.anchor_len!r}")
        if self.passing_len is not None and (not isinstance(self.passing_len, int) or self.passing_len < 0):
            raise ValueError(f"passing_len must be None (keep all) or an int >= 0, got {self.passing_len!r}")
        if not isinstance(self.pool_kernel, int) or self.pool_kernel < 1:
            raise ValueError(f"pool_kernel must be an int >= 1, got {self.pool_kernel!r}")
        if not isinstance(self.query_offset, int) or self.query_offset < 0:
            raise ValueError(f"query_offset must be an int >= 0, got {self.query_offset!r}")
        if self.query_in_anchor and self.anchor_len == 0:
            raise ValueError(
                "query_in_anchor=True needs anchor_len > 0 (the query is spliced into the anchor)"
            )
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"backend must be a backend name, got {self.backend!r}")
        if not isinstance(self.selector, str) or not self.selector:
            raise ValueError(f"selector must be a selector name, got {self.selector!r}")
        if self.selector == "query_attention" and self.needs_selection and not self.query_in_anchor:
            raise ValueError(
                "selector='query_attention' scores keys by the attention of the question in the anchor: "
                "it needs query_in_anchor=True"
            )
        if not isinstance(self.share_anchor, bool):
            raise ValueError(f"share_anchor must be True or False, got {self.share_anchor!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")

    @property
    def needs_selection(self) -> bool:
        """True when passing blocks are chosen by a selector (0 < passing_len < all)."""
        return self.passing_len is not None and self.passing_len > 0

    @property
    def needs_heads(self) -> bool:
        """True when passing blocks are chosen by retaining heads."""
        return self.needs_selection and self.selector == "heads"

    @property
    def is_exact(self) -> bool:
        """True for the configuration that must reproduce full causal attention."""
        return self.anchor_len == 0 and self.passing_len is None and not self.query_in_anchor

    @classmethod
    def exact(cls, **overrides) -> APBConfig:
        """No anchor, pass everything: APB == causal attention (the exactness oracle). This is what
        all-gather context parallelism computes; exact under any split."""
        kwargs = {"anchor_len": 0, "passing_len": None, "query_in_anchor": False}
        return cls(**{**kwargs, **overrides})

    @classmethod
    def for_length(cls, num_context_tokens: int, num_hosts: int, **overrides) -> APBConfig:
        """The paper's sizes from the nominal block n/H: anchor = block/4 capped at 8192, passing =
        block/8, query spliced into the anchor. For H = 8 this gives DESIGN.md's table (32K: 1024/512 ...
        512K: 8192/8192). The blocks themselves follow `split` (balanced by default: around n/H)."""
        block = _block_size(num_context_tokens, num_hosts)
        anchor = min(block // 4, MAX_DEFAULT_ANCHOR)
        kwargs = {"anchor_len": anchor, "passing_len": block // 8, "query_in_anchor": anchor > 0}
        return cls(**{**kwargs, **overrides})

    @classmethod
    def star(cls, num_context_tokens: int, num_hosts: int, **overrides) -> APBConfig:
        """Star Attention: the anchor is the whole first block, nothing is passed; equal blocks and every
        host running its own anchor, as published."""
        block = _block_size(num_context_tokens, num_hosts)
        kwargs = {
            "anchor_len": block,
            "passing_len": 0,
            "query_in_anchor": False,
            "split": "equal",
            "share_anchor": False,
        }
        return cls(**{**kwargs, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (what an adapter's `apb` section stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> APBConfig:
        """Inverse of `to_dict`; unknown keys are a `ValueError` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown APBConfig keys {unknown}; known: {sorted(names)}")
        return cls(**dict(values))


def _block_size(num_context_tokens: int, num_hosts: int) -> int:
    if not isinstance(num_hosts, int) or num_hosts < 1:
        raise ValueError(f"num_hosts must be an int >= 1, got {num_hosts!r}")
    if num_context_tokens < num_hosts:
        raise ValueError(
            f"context of {num_context_tokens} tokens is too short for {num_hosts} hosts: "
            f"need at least {num_hosts} (one token per host)"
        )
    return num_context_tokens // num_hosts
