"""Plain torch reference for APB attention: fp32 math, explicit mask, chunked over query rows.

The key layout is ``[passing | anchor | local]`` (DESIGN.md): anchor queries see the anchor causally;
local queries see every passing key, the whole anchor, and the local block causally.
"""

from __future__ import annotations

import math

import torch


def apb_mask(
    num_passing: int, num_anchor: int, num_local: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean visibility mask: [num_anchor + num_local, num_passing + num_anchor + num_local], True = visible."""
    num_queries = num_anchor + num_local
    q_idx = torch.arange(num_queries, device=device)[:, None]
    k_idx = torch.arange(num_passing + num_anchor + num_local, device=device)[None, :]
    is_anchor_q = q_idx < num_anchor
    k_local = k_idx - num_passing  # position in [anchor | local] coordinates; < 0 for passing keys
    anchor_rows = (k_local >= 0) & (k_local <= q_idx)
    local_rows = (k_local < num_anchor) | (k_local <= q_idx)
    return torch.where(is_anchor_q, anchor_rows, local_rows)


def check_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_passing: int, num_anchor: int
) -> None:
    """`ValueError` unless q [batch, heads, anchor + local, dim] and k, v
    [batch, kv_heads, passing + anchor + local, dim] fit together (GQA: heads a multiple of kv_heads)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"need q [batch, heads, queries, dim] and k, v of one shape [batch, kv_heads, keys, dim]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    batch, num_heads, num_queries, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if num_heads % k.shape[1]:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={k.shape[1]}")
    if num_passing < 0 or num_anchor < 0:
        raise ValueError(f"num_passing={num_passing} and num_anchor={num_anchor} must be >= 0")
    num_local = num_queries - num_anchor
    if num_local < 0 or k.shape[2] != num_passing + num_queries:
        raise ValueError(
            f"shapes do not fit: {num_queries} queries, {k.shape[2]} keys, num_passing={num_passing}, "
            f"num_anchor={num_anchor} (need keys = passing + queries, queries >= anchor)"
        )


def apb_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_passing: int,
    num_anchor: int,
    softmax_scale: float | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APB attention, plainly.

    q: [batch, num_heads, num_anchor + num_local, head_dim]
    k, v: [batch, num_kv_heads, num_passing + num_anchor + num_local, head_dim]
    Returns out: [batch, num_heads, num_anchor + num_local, head_dim] in q's dtype and
    lse: [batch, num_heads, num_anchor + num_local] (fp32, natural log).
    Query rows are processed `chunk_size` at a time so memory stays O(chunk * keys).
    """
    check_shapes(q, k, v, num_passing, num_anchor)
    batch, num_heads, num_queries, head_dim = q.shape
    num_local = num_queries - num_anchor
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = num_heads // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    mask = apb_mask(num_passing, num_anchor, num_local, device=q.device)
    outs, lses = [], []
    for start in range(0, num_queries, chunk_size):
        qc = q[:, :, start : start + chunk_size].float()
        scores = torch.einsum("bhqd,bhkd->bhqk", qc, kf) * scale
        scores = scores.masked_fill(~mask[start : start + chunk_size], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse[..., None]), vf))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_prefix: int | None,
    softmax_scale: float | None = None,
    max_elements: int = 1 << 27,
    valid_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A few query rows over a key set, plainly (fp32 math), with the log-sum-exp for merging partials.

    q: [batch, num_heads, t, head_dim]; k, v: [batch, num_kv_heads, S, head_dim].
    num_prefix None: every key is visible. Otherwise query i sees keys ``j <= num_prefix + i`` (the last
    t keys are the queries' own, causal). `valid_keys` (a one-element integer tensor): only keys
    ``j < valid_keys`` exist. GQA without repeating K/V. Query rows are chunked so the score tensor stays
    under `max_elements`.
    Returns out [batch, num_heads, t, head_dim] in q's dtype and lse [batch, num_heads, t] (fp32).
    """
    batch, num_heads, t, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    kf, vf = k.float(), v.float()
    exists = None
    if valid_keys is not None:  # the entries past them may hold anything (a store's uninitialised room)
        exists = torch.arange(num_keys, device=q.device) < valid_keys.reshape(())
        kf, vf = (x.masked_fill(~exists[:, None], 0.0) for x in (kf, vf))
    qg = q.float().reshape(batch, num_kv_heads, group, t, head_dim)
    chunk = max(1, min(t, max_elements // max(1, batch * num_heads * num_keys)))
    outs, lses = [], []
    for start in range(0, t, chunk):
        qc = qg[:, :, :, start : start + chunk]
        scores = torch.einsum("bkgtd,bksd->bkgts", qc, kf) * scale
        if num_prefix is not None:
            q_pos = torch.arange(start, start + qc.shape[3], device=q.device)[:, None] + num_prefix
            visible = torch.arange(num_keys, device=q.device)[None, :] <= q_pos
            scores = scores.masked_fill(~visible, float("-inf"))
        if exists is not None:
            scores = scores.masked_fill(~exists, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.einsum("bkgts,bksd->bkgtd", torch.exp(scores - lse.unsqueeze(-1)), vf))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(batch, num_heads, t, head_dim)
    return out.to(q.dtype), torch.cat(lses, dim=3).reshape(batch, num_heads, t)
