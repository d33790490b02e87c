"""HostPlan: the one host view that the prefill, the benchmarks and the training samples share."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from apb.data.layout import LayoutParams, build_host_layout
from conftest import tiny_model

from apb import APBConfig, APBModel, HostPlan, build_heads, save_adapter
from apb.plan import CostModel, equal_sizes

LLAMA8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


def _llama8b_cost() -> CostModel:
    from transformers import LlamaConfig

    return CostModel.from_model_config(LlamaConfig(**LLAMA8B), attention_weight=1.0)  # FLOPs alone


def _spread(costs: list[float]) -> float:
    return max(costs) / min(costs)


def test_cost_model_counts_llama8b_flops():
    cost = _llama8b_cost()
    # q,o 4096x4096, k,v 4096x1024, MLP 3 x 4096x14336 = 218.1M weights a layer, 2 FLOPs each, 31 layers;
    # the last layer only computes the context's K and V (2 x 4096x1024)
    assert cost.flops_per_token == pytest.approx(2 * (218_103_808 * 31 + 8_388_608))
    assert cost.flops_per_pair == 4 * 32 * 128 * 31
    # max_block inverts host_cost
    budget = cost.host_cost(4096, 30000, 6000)
    assert cost.max_block(budget, 4096, 6000) == pytest.approx(30000, rel=1e-9)
    assert cost.max_block(cost.host_cost(4096, 0, 0) * 0.5, 4096, 0) == 0.0
    # by default an attention FLOP weighs what it measured against a linear one (apb.plan)
    from transformers import LlamaConfig

    from apb.plan import MEASURED_ATTENTION_WEIGHT

    measured = CostModel.from_model_config(LlamaConfig(**LLAMA8B))
    assert measured.attention_weight == MEASURED_ATTENTION_WEIGHT < 1
    assert measured.host_cost(0, 100, 50) - measured.flops_per_token * 100 == pytest.approx(
        MEASURED_ATTENTION_WEIGHT * cost.flops_per_pair * (100 * 50 + 100 * 101 / 2)
    )
    assert measured.max_block(measured.host_cost(4096, 30000, 6000), 4096, 6000) == pytest.approx(
        30000, rel=1e-9
    )


@pytest.mark.parametrize(
    ("config", "n"),
    [
        (APBConfig.for_length(131072, 4, split="balanced"), 131072),
        (APBConfig.for_length(262144, 4, split="balanced"), 262144),
        (APBConfig.exact(), 131072),  # context parallelism: every earlier token passed
    ],
    ids=["apb-128k", "apb-256k", "exact-128k"],
)
def test_balanced_split_evens_predicted_work(config, n):
    cost = _llama8b_cost()
    equal = HostPlan(APBConfig.from_dict({**config.to_dict(), "split": "equal"}), n, 64, 4, cost=cost)
    balanced = HostPlan(config, n, 64, 4, cost=cost)
    sizes = [v.block_len for v in balanced.hosts]
    assert sum(sizes) == n and sizes == sorted(sizes, reverse=True) and sizes[-1] < n // 4 < sizes[0]
    assert [v.block_len for v in equal.hosts] == equal_sizes(n, 4)
    assert _spread(equal.predicted_costs(cost)) > 1.2  # the imbalance the split removes
    assert _spread(balanced.predicted_costs(cost)) < 1.001
    assert max(balanced.predicted_costs(cost)) < 0.9 * max(equal.predicted_costs(cost))


def test_balanced_split_counts_host0s_probe_anchor():
    """With the query_attention selector host 0 runs the anchor as a probe its block does not see: the
    balanced split charges host 0 the probe's tokens and causal pairs (not block x anchor pairs), so the
    predicted work stays even and host 0 gets a smaller block than with the heads."""
    cost = _llama8b_cost()
    n = 131072
    heads = HostPlan(APBConfig.for_length(n, 4, split="balanced", share_anchor=False), n, 64, 4, cost=cost)
    qattn = HostPlan(
        APBConfig.for_length(n, 4, split="balanced", selector="query_attention"), n, 64, 4, cost=cost
    )
    host0 = qattn.hosts[0]
    assert host0.num_anchor == qattn.anchor_len > 0 and not host0.anchor_visible
    assert not qattn.shares_anchor  # the later hosts read the question's queries in their own anchor
    assert heads.hosts[0].num_anchor == 0 and heads.hosts[0].anchor_visible
    assert _spread(qattn.predicted_costs(cost)) < 1.001
    assert host0.block_len < heads.hosts[0].block_len
    # a hidden anchor costs its own rows, not the block's rows over it
    a, b, p = 4096, 30000, 6000
    hidden = cost.host_cost(a, b, p, anchor_visible=False)
    assert cost.host_cost(a, b, p) - hidden == pytest.approx(cost.flops_per_pair * b * a)
    assert cost.max_block(hidden, a, p, anchor_visible=False) == pytest.approx(b, rel=1e-9)


def test_plan_views_are_consistent():
    cost = CostModel(flops_per_token=1.0, flops_per_pair=1.0)
    config = APBConfig(
        anchor_len=6,
        passing_len=4,
        query_in_anchor=True,
        query_offset=2,
        split="balanced",
        share_anchor=False,
    )
    plan = HostPlan(config, 101, 3, 4, cost=cost)
    assert plan.blocks[0][0] == 0 and plan.blocks[-1][1] == 101
    assert all(a[1] == b[0] for a, b in zip(plan.blocks, plan.blocks[1:], strict=False))
    assert plan.num_excluded == [6, 0, 0, 0] and plan.counts == [4, 4, 4, 0]
    assert plan.hosts[0].block_len > 25 > plan.hosts[3].block_len  # uneven: 101 / 4 hosts
    assert [v.reads for v in plan.hosts] == [(), (0,), (0, 1), (0, 1, 2)]
    assert [v.num_anchor for v in plan.hosts] == [0, 6, 6, 6]
    assert plan.num_passing_keys(3) == 12
    view = plan.hosts[2]
    assert view.position_ids().tolist() == list(range(6)) + list(range(*view.block))
    context, query = torch.arange(101)[None], torch.tensor([[900, 901, 902]])
    anchor = plan.anchor_ids(context, query)
    assert anchor.tolist() == [[0, 1, 900, 901, 902, 2]]
    ids, positions = plan.host_inputs(2, context, anchor)
    assert ids[0].tolist() == [0, 1, 900, 901, 902, 2] + list(range(*view.block))
    assert torch.equal(positions, view.position_ids())
    # a single host: no anchor, the whole context
    equal = HostPlan(APBConfig.from_dict({**config.to_dict(), "split": "equal"}), 101, 3, 4)
    assert equal.counts == [4, 4, 4, 0]
    single = HostPlan(config, 101, 3, 1, cost=cost)
    assert single.blocks == [(0, 101)] and single.counts == [0] and single.anchor_len == 0


@pytest.mark.parametrize("query_in_anchor", [True, False])
def test_shared_anchor_plan(query_in_anchor):
    """share_anchor: host 0 computes the anchor once; the later hosts run their block alone and read the
    anchor's keys in front of it. With the question spliced in, host 0 runs the anchor rows apart from
    its block; without, its first block tokens are the anchor and cost it nothing."""
    cost = CostModel(flops_per_token=1.0, flops_per_pair=1.0)
    base = {"anchor_len": 6, "passing_len": 4, "query_in_anchor": query_in_anchor, "query_offset": 2}
    base["split"] = "equal"
    shared = HostPlan(APBConfig(**base), 101, 3, 4)
    own = HostPlan(APBConfig(**base, share_anchor=False), 101, 3, 4)
    assert shared.shares_anchor and not own.shares_anchor
    assert shared.blocks == own.blocks and shared.counts == own.counts  # same split, same passing
    host0 = shared.hosts[0]
    assert host0.serves_anchor and host0.num_anchor == (6 if query_in_anchor else 0)
    assert not host0.anchor_visible if query_in_anchor else host0.anchor_visible
    assert [v.num_anchor for v in shared.hosts[1:]] == [0, 0, 0]
    assert [v.received_anchor for v in shared.hosts] == [0, 6, 6, 6]
    assert [v.received_anchor for v in own.hosts] == [0, 0, 0, 0]
    # host 3 attends over 12 passing keys and the 6 anchor keys, with no anchor rows of its own
    assert shared.attention_shape(3) == (18, 0, shared.hosts[3].block_len)
    assert own.attention_shape(3) == (12, 6, own.hosts[3].block_len)
    context, query = torch.arange(101)[None], torch.tensor([[900, 901, 902]])
    ids, positions = shared.host_inputs(2, context, shared.anchor_ids(context, query))
    assert ids[0].tolist() == list(range(*shared.hosts[2].block)) and positions.tolist() == ids[0].tolist()
    # the work of the anchor rows moves to host 0 (with a splice) or goes away (without)
    moved = sum(own.predicted_costs(cost)) - sum(shared.predicted_costs(cost))
    anchor_rows = 6 + 6 * 7 / 2  # six tokens and their causal pairs
    assert moved == pytest.approx(anchor_rows * (2 if query_in_anchor else 3))
    # the balanced split still evens the predicted work
    balanced = HostPlan(APBConfig(**{**base, "split": "balanced"}), 10_000, 3, 4, cost=cost)
    assert _spread(balanced.predicted_costs(cost)) < 1.01
    # the query_attention selector reads the question on every host: no sharing there
    qattn = HostPlan(APBConfig(**{**base, "query_in_anchor": True}, selector="query_attention"), 101, 3, 4)
    assert not qattn.shares_anchor and [v.num_anchor for v in qattn.hosts[1:]] == [6, 6, 6]
    assert not HostPlan(APBConfig.star(101, 4), 101, 3, 4).shares_anchor  # Star as published


def test_plan_rejects_bad_input():
    config = APBConfig(anchor_len=4, passing_len=2)  # the default split, balanced, needs the model's costs
    with pytest.raises(ValueError, match=r"pass cost=CostModel.from_model_config\(model.config\)"):
        HostPlan(config, 100, 2, 4)
    with pytest.raises(ValueError, match="num_hosts must be an int >= 1"):
        HostPlan(config, 100, 2, 0)
    with pytest.raises(ValueError, match="num_context must be an int >= 1"):
        HostPlan(config, 2.5, 2, 2)
    with pytest.raises(ValueError, match="split must be one of balanced, equal"):
        APBConfig(split="zigzag")
    with pytest.raises(ValueError, match=r"unknown APBConfig keys \['query_aware'\]"):
        APBConfig.from_dict({"query_aware": True})
    assert APBConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("share_anchor", [True, False], ids=["shared-anchor", "own-anchor"])
@pytest.mark.parametrize("split", ["equal", "balanced"])
def test_training_sample_is_what_the_inference_host_sees(split, share_anchor):
    """The training layout of a host's block and what the prefill runs for that host hold the same
    token ids at the same positions (anchor with the question spliced in, then the block). With a shared
    anchor the anchor rows run on host 0, in front of its block, and the host runs its block."""
    model = tiny_model("llama")
    apbm = APBModel(model)
    apbm.cost_model = CostModel(flops_per_token=1.0, flops_per_pair=1.0)
    g = torch.Generator().manual_seed(0)
    context, question = (
        torch.randint(0, 128, (1, 97), generator=g),
        torch.randint(0, 128, (1, 3), generator=g),
    )
    config = APBConfig(
        anchor_len=12, query_in_anchor=True, query_offset=2, split=split, share_anchor=share_anchor
    )
    seen: list[tuple[list[int], list[int]]] = []

    def record(_module, _args, kwargs):
        seen.append((kwargs["input_ids"][0].tolist(), kwargs["position_ids"][0].tolist()))

    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        apbm.prefill(context, question, config=config, num_hosts=4)
    finally:
        handle.remove()
    plan = apbm.last_plan
    assert len(seen) == 4 + 1  # four hosts, then the query pass
    for view in plan.hosts[1:]:
        start, end = view.block
        params = LayoutParams(
            anchor_len=config.anchor_len,
            block_start=start,
            block_len=end - start,
            query_offset=config.query_offset,
            query_in_anchor=config.query_in_anchor,
            min_block_len=1,
        )
        layout = build_host_layout(context[0], question[0], [5, 6], params)
        host_ids, host_positions = seen[view.host]
        if share_anchor:  # the anchor rows host 0 runs, then this host's rows
            assert view.num_anchor == 0 and view.received_anchor == config.anchor_len
            host_ids = seen[0][0][: config.anchor_len] + host_ids
            host_positions = seen[0][1][: config.anchor_len] + host_positions
        num = len(host_ids)
        assert layout.input_ids[:num].tolist() == host_ids
        assert layout.position_ids[:num].tolist() == host_positions
        assert layout.block == (config.anchor_len, num)


def test_load_defaults_to_the_layout_the_heads_were_trained_for(tmp_path):
    import apb

    model = tiny_model("llama")
    heads = build_heads(model, hidden_size=8)
    trained = APBConfig(anchor_len=64, query_in_anchor=False, query_offset=3, pool_kernel=3, split="equal")
    save_adapter(heads, tmp_path / "a", apb_defaults=trained.to_dict())
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["apb"]["split"] == "equal"
    apbm = apb.load(model, tmp_path / "a")
    config = apbm.default_config(4096, 4)
    expected = APBConfig.for_length(4096, 4)  # sizes follow the length
    assert (config.anchor_len, config.passing_len) == (expected.anchor_len, expected.passing_len)
    assert (config.query_in_anchor, config.query_offset, config.pool_kernel, config.split) == (
        False,
        3,
        3,
        "equal",
    )
    plan = apbm.plan(4096, 5, num_hosts=4)
    assert plan.config == config and plan.blocks == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]
    # the library's default split is the balanced one: an adapter that records none gets it
    assert APBConfig.for_length(4096, 4).split == "balanced" and APBConfig.exact().split == "balanced"
    save_adapter(heads, tmp_path / "b", apb_defaults={"anchor_len": 64, "query_in_anchor": False})
    balanced = apb.load(model, tmp_path / "b").plan(4096, 5, num_hosts=4)
    assert balanced.config.split == "balanced" and balanced.blocks[0][1] > 1024  # host 0 holds more


def _fit_samples(cost: CostModel, linear_tflops: float, attention_tflops: float, fixed: float):
    """Host times that the two-rate model gives exactly, for equal-split plans of two lengths."""
    samples = []
    for n in (131072, 65536):
        plan = HostPlan(APBConfig(anchor_len=n // 16, passing_len=n // 32, split="equal"), n, 64, 4)
        for tokens, pairs in plan.work():
            seconds = fixed + cost.flops_per_token * tokens / (linear_tflops * 1e12)
            samples.append((tokens, pairs, seconds + cost.flops_per_pair * pairs / (attention_tflops * 1e12)))
    return samples


def test_fit_recovers_the_rates_of_linear_and_attention_work():
    cost = _llama8b_cost()
    calibration = cost.fit(_fit_samples(cost, 536.0, 662.0, fixed=0.004))
    assert calibration.linear_tflops == pytest.approx(536.0, rel=1e-9)
    assert calibration.attention_tflops == pytest.approx(662.0, rel=1e-9)
    assert calibration.fixed_seconds == pytest.approx(0.004, rel=1e-6)
    assert calibration.cost.attention_weight == pytest.approx(536 / 662, rel=1e-9)
    assert calibration.max_error < 1e-9
    assert calibration.cost.flops_per_token == cost.flops_per_token  # only the weight is fitted
    assert json.loads(json.dumps(calibration.to_dict()))["attention_weight"] == pytest.approx(536 / 662)
    # 1% timing noise (the spread of repeated runs on a GPU) moves the weight by a few percent; the error
    # says how well the model fits
    rng = random.Random(0)
    noisy = [(n, p, t * rng.gauss(1.0, 0.01)) for n, p, t in _fit_samples(cost, 300, 150, fixed=0.004)]
    rough = cost.fit(noisy)
    assert rough.cost.attention_weight == pytest.approx(2.0, rel=0.15)
    assert 0.002 < rough.max_error < 0.05


def test_fit_refuses_samples_that_cannot_separate_the_rates():
    cost = _llama8b_cost()
    samples = _fit_samples(cost, 500, 600, 0.0)
    with pytest.raises(ValueError, match="at least 3"):
        cost.fit(samples[:2])
    with pytest.raises(ValueError, match="seconds > 0"):
        cost.fit([*samples[:3], (100, 10, 0.0)])
    with pytest.raises(ValueError, match="does not vary enough"):  # the same host timed again and again
        cost.fit([samples[1]] * 3 + [(2 * samples[1][0], 2 * samples[1][1], 2 * samples[1][2])])
    # times that fall as the work grows: fixed costs and noise dominate (too short a context)
    with pytest.raises(ValueError, match="longer context"):
        cost.fit([(n, p, 1.0 / (1 + p / 1e9)) for n, p, _ in samples])


def test_plan_work_is_what_the_cost_model_weighs():
    cost = CostModel.from_model_config(__import__("transformers").LlamaConfig(**LLAMA8B))
    plan = HostPlan(
        APBConfig(anchor_len=2048, passing_len=1024, query_in_anchor=True), 32768, 64, 4, cost=cost
    )
    for (tokens, pairs), predicted, view in zip(
        plan.work(), plan.predicted_costs(cost), plan.hosts, strict=True
    ):
        assert tokens == view.num_tokens
        assert predicted == pytest.approx(cost.work_cost(tokens, pairs))
    # the balanced split evens exactly that
    costs = plan.predicted_costs(cost)
    assert _spread(costs) < 1.01


def test_calibrate_times_every_host_and_moves_the_balanced_split(monkeypatch, capsys):
    apbm = APBModel(tiny_model("llama", max_position_embeddings=8192))
    apbm.prefill(torch.randint(0, 128, (1, 300)), torch.randint(0, 128, (1, 8)), num_hosts=2)
    users_plan = apbm.last_plan
    samples = apbm.host_times(512, 4, num_query=8, repeats=1, progress=True)
    assert apbm.last_plan is users_plan  # the timed prefills leave the user's last plan in place
    expected = []
    for n in (512, 256):
        config = dataclasses.replace(apbm.plan(n, 8, 4).config, split="equal")
        expected += HostPlan(config, n, 8, 4).work()
    assert [(n, p) for n, p, _ in samples] == expected
    assert "calibrate: 100%" in capsys.readouterr().err  # 2 lengths x (1 + 1) prefills, with a progress bar
    assert all(seconds > 0 for _, _, seconds in samples)

    before = apbm.plan(4096, 8, 4).blocks
    # timings of a device on which attention is three times slower than linear work, per FLOP
    cost = apbm.cost_model
    slow_attention = [
        (n, p, 1e-3 + cost.flops_per_token * n / 1e12 + 3 * cost.flops_per_pair * p / 1e12)
        for n, p, _ in samples
    ]
    monkeypatch.setattr(apbm, "host_times", lambda *args, **kwargs: slow_attention)
    calibration = apbm.calibrate(512, 4, apply=False)
    assert calibration.cost.attention_weight == pytest.approx(3.0, rel=1e-6)
    assert apbm.cost_model is cost and apbm.plan(4096, 8, 4).blocks == before  # apply=False: a dry run
    apbm.calibrate(512, 4)
    assert apbm.cost_model.attention_weight == pytest.approx(3.0, rel=1e-6)
    after = apbm.plan(4096, 8, 4).blocks
    # dearer attention: the early hosts, which attend least, take more of the context
    assert after[0][1] > before[0][1]
    with pytest.raises(ValueError, match="repeats"):
        APBModel(tiny_model("llama")).host_times(64, 2, repeats=0)
