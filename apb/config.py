"""APB run-time settings: anchor and passing sizes, the query splice, the attention backend."""

from __future__ import annotations

import dataclasses

# APB's anchor cap (DESIGN.md table: 256K and 512K both use 8192).
MAX_DEFAULT_ANCHOR = 8192


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
    """Attention backend name (see `apb.backends.available_backends()`); "auto" = flex on CUDA,
    reference on the CPU."""

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

    @property
    def needs_heads(self) -> bool:
        """True when passing blocks are chosen by retaining heads (0 < passing_len < all)."""
        return self.passing_len is not None and self.passing_len > 0

    @property
    def is_exact(self) -> bool:
        """True for the configuration that must reproduce full causal attention."""
        return self.anchor_len == 0 and self.passing_len is None and not self.query_in_anchor

    @classmethod
    def exact(cls, **overrides) -> APBConfig:
        """No anchor, pass everything: APB == causal attention (the exactness oracle)."""
        return cls(**{"anchor_len": 0, "passing_len": None, "query_in_anchor": False, **overrides})

    @classmethod
    def for_length(cls, num_context_tokens: int, num_hosts: int, **overrides) -> APBConfig:
        """The paper's defaults: block = n/H, anchor = block/4 capped at 8192, passing = block/8,
        query spliced into the anchor. For H = 8 this gives DESIGN.md's table (32K: 1024/512 ...
        512K: 8192/8192)."""
        block = _block_size(num_context_tokens, num_hosts)
        anchor = min(block // 4, MAX_DEFAULT_ANCHOR)
        kwargs = {"anchor_len": anchor, "passing_len": block // 8, "query_in_anchor": anchor > 0}
        return cls(**{**kwargs, **overrides})

    @classmethod
    def star(cls, num_context_tokens: int, num_hosts: int, **overrides) -> APBConfig:
        """Star Attention: the anchor is the whole first block, nothing is passed."""
        block = _block_size(num_context_tokens, num_hosts)
        return cls(**{"anchor_len": block, "passing_len": 0, "query_in_anchor": False, **overrides})


def _block_size(num_context_tokens: int, num_hosts: int) -> int:
    if num_hosts < 1:
        raise ValueError(f"num_hosts must be >= 1, got {num_hosts}")
    if num_context_tokens < num_hosts:
        raise ValueError(
            f"context of {num_context_tokens} tokens is too short for {num_hosts} hosts: "
            f"need at least {num_hosts} (one token per host)"
        )
    return num_context_tokens // num_hosts


def split_blocks(num_context_tokens: int, num_hosts: int) -> list[tuple[int, int]]:
    """Near-equal host blocks ``[(start, end), ...]``: each n // H tokens, the remainder one token
    each to the last hosts (so host 0, whose block holds the anchor, is never the longest)."""
    base = _block_size(num_context_tokens, num_hosts)
    remainder = num_context_tokens - base * num_hosts
    blocks, start = [], 0
    for host in range(num_hosts):
        size = base + (1 if host >= num_hosts - remainder else 0)
        blocks.append((start, start + size))
        start += size
    return blocks


def passing_counts(num_context_tokens: int, num_hosts: int, config: APBConfig) -> tuple[list[int], list[int]]:
    """Per host: how many leading local tokens are never passed (host 0: the anchor's positions, which
    every later host already holds) and how many tokens it passes on (``config.passing_len`` capped at
    what it has, all of them for ``passing_len=None``, 0 for the last host, whose block nobody reads).

    Returns ``(num_excluded, counts)``, each of length `num_hosts`.
    """
    num_anchor = config.anchor_len if num_hosts > 1 else 0
    num_excluded, counts = [], []
    for host, (start, end) in enumerate(split_blocks(num_context_tokens, num_hosts)):
        excluded = min(num_anchor, end - start) if host == 0 else 0
        available = end - start - excluded
        num_excluded.append(excluded)
        if host == num_hosts - 1:
            counts.append(0)
        elif config.passing_len is None:
            counts.append(available)
        else:
            counts.append(min(config.passing_len, available))
    return num_excluded, counts
