"""Passing-block selectors (apb.selectors) and the passing-block recall metric (apb.recall).

Tolerances: fp32 tiny models; two APB runs that must agree differ only by float reassociation (atol 1e-5,
as in test_apb_oracle); hand-computed scores and masses are compared at 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_config, tiny_model

import apb
from apb import APBConfig, APBModel
from apb.plan import HostPlan
from apb.recall import attention_mass, passing_recall
from apb.selectors import SelectionInputs, available_selectors, get_selector

ATOL = 1e-5


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def test_registry_names_every_selector():
    assert available_selectors() == ["heads", "oracle", "query_attention", "random"]
    with pytest.raises(ValueError, match="unknown passing-block selector 'nope'; available: heads, oracle"):
        get_selector("nope")
    with pytest.raises(ValueError, match="query_attention.*needs query_in_anchor=True"):
        APBConfig(anchor_len=8, passing_len=2, selector="query_attention")


def test_query_attention_scores_by_hand():
    g = torch.Generator().manual_seed(0)
    num_anchor, block, head_dim = 6, 5, 4
    query = torch.randn(1, 4, num_anchor + block, head_dim, generator=g)  # 4 query heads
    key = torch.randn(1, 2, num_anchor + block, head_dim, generator=g)  # 2 KV heads: groups of 2
    inputs = SelectionInputs(
        layer_idx=0, host=1, query=query, key=key, num_anchor=num_anchor, question_rows=(2, 4),
        block_start=30, scaling=0.5,
    )  # fmt: skip
    scores = get_selector("query_attention")(inputs)
    assert scores.shape == (1, block, 2)
    for kv in range(2):
        for j in range(block):
            expected = 0.0
            for head in (2 * kv, 2 * kv + 1):
                for row in (2, 3):
                    logits = [
                        float(query[0, head, row] @ key[0, kv, num_anchor + m]) * 0.5 for m in range(block)
                    ]
                    expected += torch.tensor(logits).softmax(0)[j].item()
            assert scores[0, j, kv].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_without_adapter_runs_query_attention(family):
    """apb.load(model) needs no adapter: the default config selects with the question's attention."""
    model = tiny_model(family)
    apbm = apb.load(model)
    context, query = _ids(1, 400), _ids(2, 3)
    with apbm.recording() as record:
        logits = apbm.prefill(context, query, num_hosts=4)
    config = record.plan.config
    assert config.selector == "query_attention" and config.query_in_anchor and config.passing_len == 12
    assert torch.isfinite(logits).all() and logits.shape == (1, 3, model.config.vocab_size)
    assert sorted(record.passing) == [0, 1, 2, 3] and not record.passing[3]
    assert record.passing[0][0].shape == (1, model.config.num_key_value_heads, 12)
    assert record.plan.hosts[0].num_anchor == config.anchor_len and not record.plan.hosts[0].anchor_visible
    # the choice depends on the question: another question passes other tokens somewhere
    with apbm.recording() as other:
        apbm.prefill(context, _ids(3, 3), num_hosts=4)
    assert any(
        not torch.equal(record.passing[h][layer], other.passing[h][layer])
        for h in (0, 1, 2)
        for layer in record.passing[h]
    )
    ids = apbm.generate(context, query, num_hosts=4, max_new_tokens=3)
    assert ids.shape == (1, 3)


def test_query_attention_passing_everything_is_exact_and_the_probe_anchor_changes_nothing():
    """With a budget that keeps every candidate, the query_attention path (host 0 running the anchor as a
    probe its block does not see) gives what passing everything gives."""
    model = tiny_model("qwen2")
    apbm = APBModel(model)
    context, query = _ids(4, 90), _ids(5, 3)
    base = {"anchor_len": 10, "query_in_anchor": True, "query_offset": 2, "split": "equal"}
    selected = APBConfig(**base, passing_len=1000, selector="query_attention")
    everything = APBConfig(**base, passing_len=None, share_anchor=False)
    a = apbm.prefill(context, query, config=selected, num_hosts=3)
    assert apbm.last_plan.hosts[0].num_anchor == 10  # the probe ran
    b = apbm.prefill(context, query, config=everything, num_hosts=3)
    assert apbm.last_plan.hosts[0].num_anchor == 0
    assert (a - b).abs().max().item() < ATOL


def test_random_selector_is_seeded_per_host_and_layer():
    model = tiny_model("llama", num_hidden_layers=3)  # two layers that select (the last only stores)
    apbm = APBModel(model)
    context, query = _ids(6, 120), _ids(7, 2)
    config = APBConfig(anchor_len=8, passing_len=5, selector="random")
    with apbm.recording() as first:
        apbm.prefill(context, query, config=config, num_hosts=3)
    with apbm.recording() as second:
        apbm.prefill(context, query, config=config, num_hosts=3)
    assert all(torch.equal(first.passing[h][0], second.passing[h][0]) for h in (0, 1))
    assert not torch.equal(first.passing[0][0], first.passing[0][1])  # layers differ
    # one passing exchange per host and layer but the last, marked by the record's clock
    num_layers = model.config.num_hidden_layers
    assert len(first.exchange_marks) == 3 * (num_layers - 1)
    assert all(isinstance(a, float) and b >= a for a, b in first.exchange_marks)
    ticks = iter(range(1000))
    with apbm.recording(clock=lambda: next(ticks)) as counted:
        apbm.prefill(context, query, config=config, num_hosts=3)
    assert counted.exchange_marks == [(2 * i, 2 * i + 1) for i in range(3 * (num_layers - 1))]


def test_attention_mass_equals_eager_attention_weights():
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    APBModel(model)  # installs APB's attention
    eager = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    context, query = _ids(8, 30), _ids(9, 4)
    mass = attention_mass(model, context, query)
    with torch.no_grad():
        weights = eager(torch.cat([context, query])[None], output_attentions=True).attentions
    kv, group = (
        model.config.num_key_value_heads,
        model.config.num_attention_heads // model.config.num_key_value_heads,
    )
    for layer, w in enumerate(weights):  # [1, heads, 34, 34]
        expected = w[:, :, -4:, :30].reshape(1, kv, group, 4, 30).sum(dim=(2, 3))
        assert torch.allclose(mass[layer], expected, rtol=1e-5, atol=1e-6)


def test_passing_recall_by_hand():
    from apb.plan import CostModel

    config = APBConfig(anchor_len=2, passing_len=2, split="equal")
    plan = HostPlan(config, 12, 1, 2, cost=CostModel(flops_per_token=1.0, flops_per_pair=1.0))
    # host 0: block [0, 6), positions 0-1 excluded (anchor); one KV head
    mass = {0: torch.tensor([[[9.0, 9.0, 1.0, 4.0, 2.0, 3.0, 0, 0, 0, 0, 0, 0]]])}
    idx = torch.tensor([[[2, 4]]])  # passed masses 1 + 2 = 3; the oracle's best two of [1, 4, 2, 3]: 7
    summary = passing_recall(mass, plan, {0: {0: idx}, 1: {}})
    assert summary.mean == pytest.approx(3 / 7) and summary.per_host == {0: pytest.approx(3 / 7)}


def test_oracle_selector_reaches_recall_one_and_is_refused_without_scores():
    model = tiny_model("mistral")
    apbm = APBModel(model)
    context, query = _ids(10, 160), _ids(11, 3)
    mass = attention_mass(model, context, query)
    results = {}
    for selector in ("oracle", "random"):
        config = APBConfig(anchor_len=8, passing_len=6, pool_kernel=1, selector=selector)
        with apbm.recording() as record:
            apbm.prefill(context, query, config=config, num_hosts=4, oracle_scores=mass)
        results[selector] = passing_recall(mass, record.plan, record.passing).mean
    assert results["oracle"] == pytest.approx(1.0, abs=1e-6)
    assert results["random"] < 1 - 1e-3  # random-weight attention is near uniform: close, but below
    with pytest.raises(ValueError, match="selector='oracle' is for evaluation only"):
        apbm.prefill(
            context, query, config=APBConfig(anchor_len=8, passing_len=6, selector="oracle"), num_hosts=4
        )


def test_default_config_fits_the_question():
    """Without a config the anchor grows to hold a question longer than block/4 allows, and a context
    too short for that passes everything (exact)."""
    model = tiny_model("llama")
    apbm = apb.load(model)
    plan = apbm.plan(180, 13, num_hosts=2)  # block 90: the paper's anchor 22 < query_offset 16 + 13
    assert plan.config.anchor_len == 29 and plan.config.selector == "query_attention"
    assert apbm.plan(40, 13, num_hosts=2).config.is_exact  # 16 + 13 > one block of 20
    assert apbm.plan(6, 2, num_hosts=2).config.is_exact  # no anchor at all
    logits = apbm.prefill(_ids(20, 180), _ids(21, 13), num_hosts=2)
    assert torch.isfinite(logits).all()


@pytest.mark.single_gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_query_attention_on_cuda_backends(family):
    """The training-free path on the CUDA backends in bf16: host 0's probe anchor (an anchor-only backend
    call) and a budget that keeps everything give what passing everything gives; apb.load(model)'s default
    runs. Tolerance: both sides make the same backend calls on the same bf16 inputs, apart from host 0's
    anchor rows running apart from its block, which changes no row the outputs depend on; 2e-2 covers bf16
    reassociation should a backend tile the two calls differently."""
    from apb.backends import available_backends

    model = tiny_model(family).cuda().to(torch.bfloat16)
    context, query = _ids(30, 901).cuda(), _ids(31, 5).cuda()
    base = {"anchor_len": 40, "query_in_anchor": True, "query_offset": 3}
    # the backends the evaluation and the default run (flex and flash are tested with their kernels)
    for backend in [b for b in ("triton", "sdpa", "reference") if b in available_backends("cuda")]:
        apbm = APBModel(model)
        selected = APBConfig(**base, passing_len=10_000, selector="query_attention", backend=backend)
        everything = APBConfig(**base, passing_len=None, backend=backend)
        a = apbm.prefill(context, query, config=selected, num_hosts=3)
        b = apbm.prefill(context, query, config=everything, num_hosts=3)
        assert (a.float() - b.float()).abs().max().item() < 2e-2, backend
        small = APBConfig(**base, passing_len=7, selector="query_attention", backend=backend)
        with apbm.recording() as record:
            logits = apbm.prefill(context, query, config=small, num_hosts=4)
        assert torch.isfinite(logits).all(), backend
        assert record.passing[0][0].shape == (1, model.config.num_key_value_heads, 7)
    default = apb.load(model).prefill(context, query, num_hosts=4)  # backend "auto"
    assert torch.isfinite(default).all()


def test_bench_selectors_mode_smoke(tmp_path):
    """scripts/bench_apb_prefill.py --selectors on a tiny shape on the CPU: every selector's regions per
    host, the last host selecting nothing, and the markdown table."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out, md = tmp_path / "sel.json", tmp_path / "sel.md"
    cmd = [
        sys.executable,
        str(root / "scripts" / "bench_apb_prefill.py"),
        "--shape",
        "tiny",
        "--device",
        "cpu",
    ]
    cmd += ["--backend", "auto", "--tokens", "1024", "--hosts", "4", "--query", "8", "--head-hidden", "16"]
    cmd += ["--selectors", "heads", "query_attention", "random", "--out", str(out), "--markdown", str(md)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["selector"] for r in runs] == ["heads", "query_attention", "random"]
    for run in runs:
        hosts = run["hosts"]
        assert [h["host"] for h in hosts] == [0, 1, 2, 3] and hosts[3]["selection_ms"] == 0
        assert all(h["score_ms"] > 0 and h["passing"] == 256 // 8 for h in hosts[:3])
    by_selector = {r["selector"]: r["hosts"][0] for r in runs}
    # host 0 runs the anchor: for the later hosts (heads: shared anchor) or as the probe (query_attention)
    assert by_selector["heads"]["anchor"] == 64 and by_selector["query_attention"]["anchor"] == 64
    assert "| query_attention | 0 | 256 | 64 | 32 |" in md.read_text()
