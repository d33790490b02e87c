"""Sparse APB: the mask, the passing-block selection, Star, presets and refusals.

The end-to-end checks compare APB with an independent oracle: one plain forward of the unmodified
model over all hosts' inputs laid side by side ([anchor_1 | local_1] ... | query) with a hand-built
4-D visibility mask and explicit position ids. When every layer and KV head passes the same tokens
(planted head scores that depend only on the position), that single mask is exactly APB. fp32,
atol=1e-5 (reassociation only, see test_apb_oracle.py).
"""

from __future__ import annotations

import pytest
import torch
from apb.kernels.reference import apb_attention_ref, apb_mask, decode_attention_ref
from conftest import tiny_model

from apb import APBConfig, APBModel, build_heads
from apb.attention import select_passing
from apb.backends import apb_mask_mod, decomposed_apb_attention, get_backend
from apb.plan import CostModel, equal_sizes

ATOL = 1e-5


def _ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- mask and attention pieces


def test_mask_builder_hand_written_case():
    # 2 passing keys, 2 anchor tokens, 3 local tokens; rows = [a0 a1 l0 l1 l2], cols = [p0 p1 a0 a1 l0 l1 l2]
    expected = torch.tensor(
        [
            [0, 0, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(apb_mask(2, 2, 3), expected)


def test_flex_mask_mod_matches_mask_builder():
    from torch.nn.attention.flex_attention import create_mask

    for num_passing, num_anchor, num_local in [(2, 2, 3), (0, 0, 5), (7, 0, 4), (0, 3, 6), (5, 4, 1)]:
        rows, cols = num_anchor + num_local, num_passing + num_anchor + num_local
        flex = create_mask(apb_mask_mod(num_passing, num_anchor), None, None, rows, cols, device="cpu")
        assert torch.equal(flex[0, 0], apb_mask(num_passing, num_anchor, num_local))


def test_decomposed_backend_matches_reference():
    """The flash-attn backend's decomposition (anchor causal; local = full prefix + causal local)."""

    def attend(q, k, v, causal, scale):  # same-length causal, as flash_attn_func does
        return decode_attention_ref(q, k, v, num_prefix=0 if causal else None, softmax_scale=scale)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 14, 8, generator=g), torch.randn(2, 2, 14, 8, generator=g)
    out, lse = decomposed_apb_attention(attend, q, k, v, num_passing=5, num_anchor=3, softmax_scale=0.3)
    ref_out, ref_lse = apb_attention_ref(q, k, v, num_passing=5, num_anchor=3, softmax_scale=0.3)
    assert (out - ref_out).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5


def test_backend_registry():
    assert get_backend("auto", "cpu") is get_backend("sdpa", "cpu")  # the fused CPU path, not the reference
    with pytest.raises(ValueError, match="unknown APB attention backend 'nope'"):
        get_backend("nope", "cpu")


def test_select_passing_planted_peaks():
    scores = torch.full((1, 20, 2), -1.0)
    scores[0, 10, 0] = 5.0  # head 0: one peak -> pooled plateau 8..12 (kernel 5)
    scores[0, 3, 1], scores[0, 15, 1] = 4.0, 3.0  # head 1: plateaus 1..5 and 13..17
    idx = select_passing(scores, 5, pool_kernel=5)
    assert idx[0, 0].tolist() == [8, 9, 10, 11, 12]
    assert idx[0, 1].tolist() == [1, 2, 3, 4, 5]
    # excluded (anchor) positions are never chosen, even when they score highest
    idx = select_passing(scores, 5, pool_kernel=1, num_excluded=4)
    assert 3 not in idx[0, 1].tolist() and 15 in idx[0, 1].tolist()
    assert min(idx[0, 1].tolist()) >= 4


# ---------------------------------------------------------------- end-to-end against the 4-D mask oracle


def _pooled(scores: list[float], kernel: int) -> list[float]:
    """Independent sliding max (plain python), stride 1, same length."""
    left = (kernel - 1) // 2
    return [max(scores[max(0, i - left) : i - left + kernel]) for i in range(len(scores))]


def _oracle_logits(model, context, query, anchor, blocks, passed):
    """One plain forward over [seg_0 | seg_1 | ... | query] with APB's visibility as a 4-D mask.
    passed[j]: global positions host j passes to later hosts (same for every layer and head)."""
    tokens = []  # (host, kind, position, token id)
    for host, (start, end) in enumerate(blocks):
        if host > 0:
            tokens += [(host, "anchor", i, int(t)) for i, t in enumerate(anchor)]
        tokens += [(host, "local", p, int(context[p])) for p in range(start, end)]
    n = len(context)
    tokens += [(len(blocks), "query", n + i, int(t)) for i, t in enumerate(query)]

    def visible(a, b):
        (ha, ka, pa, _), (hb, kb, pb, _) = a, b
        if ka == "query":
            return kb == "local" or (kb == "query" and pb <= pa)
        if ka == "anchor":
            return hb == ha and kb == "anchor" and pb <= pa
        own = hb == ha and (kb == "anchor" or (kb == "local" and pb <= pa))
        return own or (hb < ha and kb == "local" and pb in passed[hb])

    mask = torch.tensor([[visible(a, b) for b in tokens] for a in tokens])[None, None]
    ids = torch.tensor([[t[3] for t in tokens]])
    positions = torch.tensor([[t[2] for t in tokens]])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, attention_mask=mask).logits
    return logits[:, -len(query) :]


def _planted_heads(monkeypatch, heads, blocks, num_layers, planted):
    """Make the heads score each local token by `planted[global position]`, on every head and layer.
    Hosts run in order and call the heads once per layer but the last (where a host only stores its K/V),
    so the call count names the host."""
    calls = {"n": 0}

    def forward(layer_idx, q, k, v):
        host = calls["n"] // (num_layers - 1)
        calls["n"] += 1
        start, end = blocks[host]
        assert q.shape[1] == end - start
        return planted[start:end].view(1, -1, 1).expand(q.shape[0], -1, heads.shape.num_kv_heads).clone()

    monkeypatch.setattr(heads, "forward", forward)


@pytest.mark.parametrize(
    ("family", "query_in_anchor", "pool_kernel", "split", "share_anchor"),
    [
        ("llama", False, 5, "equal", True),
        ("qwen3", True, 3, "balanced", True),
        ("mistral", True, 1, "equal", True),
        ("llama", False, 5, "equal", False),
        ("qwen3", True, 3, "balanced", False),
    ],
)
def test_sparse_apb_matches_mask_oracle(
    monkeypatch, family, query_in_anchor, pool_kernel, split, share_anchor
):
    """The oracle gives every host its own anchor; with share_anchor, host 0 computes it for all."""
    model = tiny_model(family)
    torch.manual_seed(0)
    heads = build_heads(model, hidden_size=16)
    apbm = APBModel(model, heads)
    apbm.cost_model = CostModel(flops_per_token=1.0, flops_per_pair=1.0)  # clearly uneven when balanced
    num_context, num_hosts, passing = 49, 4, 3
    context, query = _ids(11, num_context), _ids(12, 3)
    config = APBConfig(
        anchor_len=7,
        passing_len=passing,
        query_in_anchor=query_in_anchor,
        query_offset=2,
        pool_kernel=pool_kernel,
        split=split,
        share_anchor=share_anchor,
    )
    plan = apbm.plan(num_context, 3, num_hosts, config)
    assert plan.shares_anchor == share_anchor
    blocks = plan.blocks
    assert (len({e - s for s, e in blocks}) > 2) == (split == "balanced")
    planted = torch.randn(num_context, generator=torch.Generator().manual_seed(3))
    _planted_heads(monkeypatch, heads, blocks, model.config.num_hidden_layers, planted)
    with apbm.recording() as record:
        logits = apbm.prefill(context, query, config=config, num_hosts=num_hosts)
    assert record.plan.blocks == blocks and set(record.host_seconds) == set(range(num_hosts))

    passed = []
    for host, (start, end) in enumerate(blocks):
        if host == num_hosts - 1:
            passed.append(set())
            continue
        chosen = {tuple(idx[0, h].tolist()) for idx in record.passing[host].values() for h in range(2)}
        assert len(chosen) == 1, f"host {host}: layers/heads chose different tokens {chosen}"
        (local,) = chosen
        # a valid top-k of the pooled planted scores (pooling makes plateaus, so ties are legitimate)
        excluded = config.anchor_len if host == 0 else 0
        pooled = _pooled(planted[start:end].tolist(), pool_kernel)
        rest = [pooled[i] for i in range(excluded, end - start) if i not in local]
        assert len(local) == plan.counts[host] and min(local) >= excluded
        assert min(pooled[i] for i in local) >= max(rest, default=float("-inf"))
        passed.append({start + i for i in local})
    assert {h for h, per_layer in record.passing.items() if per_layer} == {
        0,
        1,
        2,
    }  # last sends nothing
    anchor = torch.cat([context[:2], query, context[2 : 7 - 3]]) if query_in_anchor else context[:7]
    expected = _oracle_logits(model, context, query, anchor, blocks, passed)
    assert (logits[0] - expected[0]).abs().max().item() < ATOL
    # and the sparse result really differs from full attention (the test could fail)
    with torch.no_grad():
        full = model(torch.cat([context, query])[None]).logits[:, -3:]
    assert (logits - full).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    ("num_hosts", "num_context", "query_in_anchor", "passing_len"),
    [(2, 41, True, 3), (3, 50, False, 4), (5, 63, True, 2), (4, 45, True, None)],
)
def test_shared_anchor_gives_what_every_host_running_its_own_gives(
    num_hosts, num_context, query_in_anchor, passing_len
):
    """Host 0 computing the anchor for everyone (share_anchor) and every host computing its own: the same
    passing blocks chosen by the (random) heads at every layer, the same logits, the same generation;
    lengths the host count does not divide. One split for both: the balanced split gives them different
    blocks (a host running its own anchor has more work)."""
    model = tiny_model("qwen2")
    torch.manual_seed(2)
    apbm = APBModel(model, build_heads(model, hidden_size=16))
    context, query = _ids(21, num_context), _ids(22, 3)
    base = {
        "anchor_len": 8,
        "passing_len": passing_len,
        "query_in_anchor": query_in_anchor,
        "query_offset": 2,
        "split": "equal",
    }
    results = {}
    for share in (True, False):
        config = APBConfig(**base, share_anchor=share)
        with apbm.recording() as record:
            logits = apbm.prefill(context, query, config=config, num_hosts=num_hosts)
        assert record.plan.shares_anchor == share
        ids = apbm.generate(context, query, config=config, num_hosts=num_hosts, max_new_tokens=4)
        results[share] = (logits, record.passing, ids, record.plan)
    (shared, shared_passing, shared_ids, plan), (own, own_passing, own_ids, _) = results[True], results[False]
    assert [v.num_anchor for v in plan.hosts[1:]] == [0] * (num_hosts - 1)
    assert (shared - own).abs().max().item() < ATOL
    assert torch.equal(shared_ids, own_ids)
    for host, layers in own_passing.items():
        for layer, idx in layers.items():
            assert torch.equal(shared_passing[host][layer], idx), (host, layer)
    # and the anchor matters: without it the logits differ (the comparison could fail)
    no_anchor = apbm.prefill(context, query, config=APBConfig(passing_len=passing_len), num_hosts=num_hosts)
    assert (no_anchor - own).abs().max().item() > 1e-3


def test_star_matches_mask_oracle_and_apb_with_no_passing():
    model = tiny_model("qwen2")
    apbm = APBModel(model)
    context, query = _ids(13, 30), _ids(14, 2)
    blocks = _equal_blocks(30, 3)
    star = apbm.prefill(context, query, config=APBConfig.star(30, 3), num_hosts=3)
    expected = _oracle_logits(model, context, query, context[:10], blocks, [set(), set(), set()])
    assert (star[0] - expected[0]).abs().max().item() < ATOL
    star_like = {"anchor_len": 10, "passing_len": 0, "split": "equal"}
    same = apbm.prefill(context, query, config=APBConfig(**star_like, share_anchor=False), num_hosts=3)
    assert torch.equal(star, same)
    # host 0's first block is the anchor: sent to the others instead of recomputed, same logits
    shared = apbm.prefill(context, query, config=APBConfig(**star_like), num_hosts=3)
    assert apbm.last_plan.shares_anchor and (shared - star).abs().max().item() < ATOL


def test_keep_all_with_anchor_matches_mask_oracle():
    """passing_len=None with an anchor: every non-anchor token of earlier hosts is passed, no heads."""
    model = tiny_model("llama")
    apbm = APBModel(model)
    context, query = _ids(15, 26), _ids(16, 2)
    blocks = _equal_blocks(26, 3)
    logits = apbm.prefill(context, query, config=APBConfig(anchor_len=4, split="equal"), num_hosts=3)
    passed = [set(range(4, 8)), set(range(8, 17)), set()]
    expected = _oracle_logits(model, context, query, context[:4], blocks, passed)
    assert (logits[0] - expected[0]).abs().max().item() < ATOL


def test_anchor_query_ids_splice_only_the_question():
    """query_ids = question + more tokens (an answer prefix); only the question goes into the anchor."""
    model = tiny_model("llama")
    apbm = APBModel(model)
    context, question, more = _ids(17, 36), _ids(18, 3), _ids(19, 4)
    query = torch.cat([question, more])
    config = APBConfig(anchor_len=10, passing_len=0, query_in_anchor=True, query_offset=2, split="equal")
    blocks = _equal_blocks(36, 3)
    logits = apbm.prefill(context, query, config=config, num_hosts=3, anchor_query_ids=question)
    anchor = torch.cat([context[:2], question, context[2:7]])
    expected = _oracle_logits(model, context, query, anchor, blocks, [set(), set(), set()])
    assert (logits[0] - expected[0]).abs().max().item() < ATOL
    # the default splices all of query_ids, which here is a different anchor (the test could fail)
    default = apbm.prefill(context, query, config=config, num_hosts=3)
    assert (default - logits).abs().max().item() > 1e-3
    assert torch.equal(
        default, apbm.prefill(context, query, config=config, num_hosts=3, anchor_query_ids=query)
    )
    # generate splices the same anchor: its first step is the prefill's last row
    ids, step_logits = apbm.generate(
        context,
        query,
        config=config,
        num_hosts=3,
        max_new_tokens=1,
        anchor_query_ids=question,
        return_logits=True,
    )
    assert (step_logits[0, 0] - logits[0, -1]).abs().max().item() < ATOL
    with pytest.raises(ValueError, match="anchor_query_ids is empty"):
        apbm.prefill(context, query, config=config, num_hosts=3, anchor_query_ids=[])
    with pytest.raises(ValueError, match="anchor_query_ids batch 2 != query batch 1"):
        apbm.prefill(context, query, config=config, num_hosts=3, anchor_query_ids=[[1, 2], [3, 4]])


def _equal_blocks(num_context: int, num_hosts: int) -> list[tuple[int, int]]:
    bounds = [0]
    for size in equal_sizes(num_context, num_hosts):
        bounds.append(bounds[-1] + size)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


# ---------------------------------------------------------------- config presets and bad input


def test_for_length_matches_design_table():
    table = {32: (1024, 512), 64: (2048, 1024), 128: (4096, 2048), 256: (8192, 4096), 512: (8192, 8192)}
    for k_tokens, (anchor, passing) in table.items():
        cfg = APBConfig.for_length(k_tokens * 1024, 8)
        assert (cfg.anchor_len, cfg.passing_len, cfg.query_in_anchor) == (anchor, passing, True)
    star = APBConfig.star(1000, 4)
    assert (star.anchor_len, star.passing_len) == (250, 0)
    assert APBConfig.exact().is_exact and not APBConfig.exact().needs_heads


def test_passing_counts_per_host():
    from apb.plan import HostPlan

    def counts(n, hosts, config):
        plan = HostPlan(config, n, 0, hosts)
        return plan.num_excluded, plan.counts

    # equal blocks of 10, 10, 11 tokens; host 0 never passes its 4 anchor positions
    equal = {"split": "equal"}
    assert counts(31, 3, APBConfig(anchor_len=4, passing_len=8, **equal)) == ([4, 0, 0], [6, 8, 0])
    assert counts(31, 3, APBConfig(anchor_len=4, **equal)) == ([4, 0, 0], [6, 10, 0])  # pass everything
    assert counts(31, 3, APBConfig.star(31, 3)) == ([10, 0, 0], [0, 0, 0])
    assert counts(31, 1, APBConfig(anchor_len=4, passing_len=8)) == ([0], [0])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="anchor_len"):
        APBConfig(anchor_len=-1)
    with pytest.raises(ValueError, match="passing_len"):
        APBConfig(passing_len=-2)
    with pytest.raises(ValueError, match="pool_kernel"):
        APBConfig(pool_kernel=0)
    with pytest.raises(ValueError, match="query_in_anchor"):
        APBConfig(query_in_anchor=True)
    with pytest.raises(ValueError, match="share_anchor must be True or False"):
        APBConfig(share_anchor="yes")


def test_bad_input_errors():
    model = tiny_model("llama")
    apbm = APBModel(model)
    with pytest.raises(ValueError, match="context of 3 tokens is too short for 4 hosts: need at least 4"):
        apbm.prefill(_ids(0, 3), _ids(1, 2), config=APBConfig.exact(), num_hosts=4)
    with pytest.raises(ValueError, match="too short for anchor_len=8 with 4 hosts.*need at least 32"):
        cfg = APBConfig(anchor_len=8, passing_len=0, split="equal")
        apbm.prefill(_ids(0, 20), _ids(1, 2), config=cfg, num_hosts=4)
    with pytest.raises(ValueError, match="too short for anchor_len=8 with 4 hosts.*need at least 11"):
        cfg = APBConfig(anchor_len=8, passing_len=0, split="balanced")
        apbm.prefill(_ids(0, 10), _ids(1, 2), config=cfg, num_hosts=4)
    with pytest.raises(
        ValueError, match="query of 7 tokens does not fit in the anchor: anchor_len=8 holds at most 6"
    ):
        cfg = APBConfig(anchor_len=8, passing_len=0, query_in_anchor=True, query_offset=2)
        apbm.prefill(_ids(0, 40), _ids(1, 7), config=cfg, num_hosts=4)
    with pytest.raises(ValueError, match=r"batch sizes differ"):  # rows of different lengths run one by one
        apbm.prefill([[1, 2, 3], [4, 5]], [[1]], config=APBConfig.exact(), num_hosts=1)
    with pytest.raises(ValueError, match="passing_len=2 .* has none attached"):
        apbm.prefill(_ids(0, 20), _ids(1, 2), config=APBConfig(anchor_len=2, passing_len=2), num_hosts=2)
    with pytest.raises(ValueError, match="built for another model.*num_kv_heads: heads 1 vs model 2"):
        APBModel(model, build_heads(tiny_model("llama", num_key_value_heads=1)))


def test_flex_short_blocks_use_reference():
    """Blocks shorter than FLEX_MIN_LEN skip flex (no compile): the answer is the reference's."""
    from apb.backends import FLEX_MIN_LEN

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, FLEX_MIN_LEN - 28, 8, generator=g)
    k, v = (
        torch.randn(1, 2, FLEX_MIN_LEN - 8, 8, generator=g),
        torch.randn(1, 2, FLEX_MIN_LEN - 8, 8, generator=g),
    )
    # "cuda" only passes the registry's device check (flex is refused on the CPU); blocks this short never reach
    # flex itself, so the function runs on these CPU tensors
    out, lse = get_backend("flex", "cuda")(q, k, v, num_passing=20, num_anchor=10, softmax_scale=0.3)
    ref_out, ref_lse = apb_attention_ref(q, k, v, num_passing=20, num_anchor=10, softmax_scale=0.3)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize(
    ("num_passing", "num_anchor", "num_local"), [(0, 0, 37), (11, 7, 29), (5, 0, 13), (0, 9, 4)]
)
def test_sdpa_backend_matches_reference(num_passing, num_anchor, num_local):
    """The CPU default: torch's SDPA with the APB mask. fp32 on both sides: only float reassociation
    differs (atol 1e-5, as the oracle tests); no lse (the prefill does not use it)."""
    g = torch.Generator().manual_seed(num_passing + num_local)
    q = torch.randn(2, 6, num_anchor + num_local, 8, generator=g)
    k, v = (torch.randn(2, 3, num_passing + num_anchor + num_local, 8, generator=g) for _ in range(2))
    out, lse = get_backend("sdpa", "cpu")(
        q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=0.4
    )
    ref, _ = apb_attention_ref(q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=0.4)
    assert lse is None and (out - ref).abs().max().item() < ATOL
    assert get_backend("auto", "cpu") is get_backend("sdpa", "cpu")
