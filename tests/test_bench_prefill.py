"""The simulated prefill benchmark (`apb.bench.prefill`, scripts/bench_prefill.py) end to end on the CPU
(tiny model, simulated hosts), its comm model and full attention's choice of SDPA kernel."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import clean_env, dear_attention_host_times, run_or_fail

import apb.attention
import apb.bench.prefill as bench
from apb import APBConfig, CostModel
from apb.bench.common import (
    FULL_KERNELS,
    SDPA_KERNELS,
    build_model,
    first_working_kernel,
    full_attention_kernel,
    full_attention_label,
)

ROOT = Path(__file__).resolve().parents[1]


def test_comm_model_matches_the_stated_formula():
    # Llama-3.1-8B, 128K, 8 hosts: passing 2048 per KV head, K+V in bf16 -> 8 MiB per host per layer;
    # each GPU receives 7 of the 8 pieces per layer at 450 GB/s, in 31 of the 32 layers (the last only
    # stores the hosts' K/V).
    ms = bench.comm_ms(
        num_layers=32,
        num_hosts=8,
        max_passing=2048,
        num_kv_heads=8,
        head_dim=128,
        bytes_per_element=2,
        bandwidth_gbps=450.0,
    )
    assert ms == pytest.approx(31 * 7 * 2048 * 8 * 128 * 2 * 2 / 450e9 * 1000)
    assert ms == pytest.approx(4.045, abs=1e-3)
    assert (
        bench.comm_ms(
            num_layers=32,
            num_hosts=8,
            max_passing=0,
            num_kv_heads=8,
            head_dim=128,
            bytes_per_element=2,
            bandwidth_gbps=450.0,
        )
        == 0.0
    )
    # host 0's anchor broadcast (4096 tokens) adds its bytes and one more latency per layer
    shape = dict(num_layers=32, num_kv_heads=8, head_dim=128, bytes_per_element=2, bandwidth_gbps=450.0)
    with_anchor = bench.comm_ms(num_hosts=8, max_passing=2048, latency_us=10.0, shared_anchor=4096, **shape)
    plain = bench.comm_ms(num_hosts=8, max_passing=2048, latency_us=10.0, **shape)
    assert with_anchor - plain == pytest.approx(31 * (4096 * 8 * 128 * 2 * 2 / 450e9 + 10e-6) * 1000)
    assert bench.comm_ms(num_hosts=8, max_passing=0, shared_anchor=4096, **shape) > 0


def test_passing_counts_follow_the_apb_config():
    from transformers import LlamaConfig

    from apb import APBConfig, CostModel, HostPlan

    cost = CostModel.from_model_config(LlamaConfig())
    config = APBConfig.for_length(131072, 8)
    assert (config.anchor_len, config.passing_len) == (4096, 2048)
    for split in ("balanced", "equal"):
        plan = HostPlan(APBConfig.for_length(131072, 8, split=split), 131072, 64, 8, cost=cost)
        assert plan.counts == [2048] * 7 + [0]
    assert HostPlan(APBConfig.star(131072, 8), 131072, 64, 8).counts == [0] * 8


def test_full_attention_takes_the_first_sdpa_kernel_that_runs():
    """cuDNN first, then FlashAttention-2, then memory-efficient (FA4 only with a model and flash-attn-4
    installed); a failure is recorded, an OOM is not taken for a missing kernel. (On the CPU the kernel
    restriction itself is a no-op.)"""
    assert ("fa4", *SDPA_KERNELS) == FULL_KERNELS and SDPA_KERNELS == ("cudnn", "flash", "efficient")
    assert first_working_kernel(lambda: 7, cuda=True) == (7, "cudnn", [])
    calls = []

    def cudnn_fails():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("No available kernel. Aborting execution.")
        return "logits"

    result, kernel, failed = first_working_kernel(cudnn_fails, cuda=True)
    assert (result, kernel) == ("logits", "flash") and failed == [
        "cudnn: No available kernel. Aborting execution."
    ]

    def never():
        raise RuntimeError("No available kernel")

    with pytest.raises(RuntimeError):  # none of them, then torch's own choice: it fails too
        first_working_kernel(never, cuda=True)

    def oom():
        raise __import__("torch").cuda.OutOfMemoryError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        first_working_kernel(oom, cuda=True)
    assert first_working_kernel(lambda: 1, cuda=False) == (1, None, [])
    assert full_attention_label("cudnn", True) == "sdpa cuDNN"
    assert full_attention_label("fa4", True) == "FlashAttention-4"
    assert full_attention_label(None, False) == "sdpa, CPU"


def _causal_reference(q, k, v, *, softmax_scale=None):
    """Stands in for FA4's dense causal call on the CPU: same shapes in and out."""
    import torch

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
    return out, None


def test_full_attention_on_fa4_is_the_plain_models_attention(monkeypatch):
    """The FA4 baseline swaps the model's attention implementation for the block only, feeds the kernel
    [batch, heads, seq, dim] tensors with the model's scale and gives transformers back [batch, seq, heads,
    dim]: with a causal reference in FA4's place, the logits equal the plain model's; FA4 is tried first
    when present, and a failing FA4 falls through to cuDNN."""
    import apb.kernels.flash4 as flash4
    import torch

    from apb.bench.common import build_model

    monkeypatch.setattr(flash4, "fa4_available", lambda: True)
    monkeypatch.setattr(flash4, "causal_attention_fa4", _causal_reference)
    model = build_model("tiny", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 37))
    before = model.config._attn_implementation
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with full_attention_kernel(model, "fa4"):
            assert model.config._attn_implementation != before
            on_fa4 = model(input_ids=ids).logits
    assert model.config._attn_implementation == before
    torch.testing.assert_close(on_fa4, plain, rtol=1e-5, atol=1e-5)  # fp32, same math in another order

    assert first_working_kernel(lambda: 3, cuda=True, model=model) == (3, "fa4", [])

    def fa4_fails(*args, **kwargs):
        raise RuntimeError("cutlass: no sm90 kernel")

    monkeypatch.setattr(flash4, "causal_attention_fa4", fa4_fails)

    def forward():
        return model(input_ids=ids).logits

    with torch.inference_mode():
        _, kernel, failed = first_working_kernel(forward, cuda=True, model=model)
    # the next SDPA kernel that runs this CPU model takes over (which one depends on the torch build:
    # cuDNN, or FA2 where the build refuses cuDNN for CPU tensors); every kernel before it is reported
    assert failed[0] == "fa4: cutlass: no sm90 kernel"
    assert kernel in SDPA_KERNELS and len(failed) == FULL_KERNELS.index(kernel)
    assert model.config._attn_implementation == before


def test_flop_bound_is_linear_work_at_the_matmul_rate_plus_attention_at_the_attention_rate():
    """By hand for two equal hosts of 100 tokens, anchor 10, host 1 reading 5 passing keys."""
    from apb import APBConfig, HostPlan
    from apb.bench.common import flop_bound_ms
    from apb.plan import CostModel

    cost = CostModel(flops_per_token=1e12, flops_per_pair=1e9)
    rates = {"matmul": 2.0, "attention": 0.5}

    def expected(tokens, pairs):
        return [(t * 1e12 / 2e12 + p * 1e9 / 0.5e12) * 1000 for t, p in zip(tokens, pairs, strict=True)]

    # every host runs its own anchor. Host 0: no anchor, 100 causal rows; host 1: anchor 10 (causal) + 100
    # rows over 5 + 10 + causal 100
    equal = {"anchor_len": 10, "passing_len": 5, "query_in_anchor": False, "split": "equal"}
    plan = HostPlan(APBConfig(**equal, share_anchor=False), 200, 0, 2)
    pairs = [100 * 101 / 2, 10 * 11 / 2 + 100 * (5 + 10) + 100 * 101 / 2]
    assert [v.num_anchor for v in plan.hosts] == [0, 10] and plan.num_passing_keys(1) == 5
    assert flop_bound_ms(plan, cost, rates) == pytest.approx(expected([100, 110], pairs))
    # the anchor shared by host 0 (its first 10 tokens): host 1 runs no anchor rows, still sees the keys
    plan = HostPlan(APBConfig(**equal), 200, 0, 2)
    pairs = [100 * 101 / 2, 100 * (5 + 10) + 100 * 101 / 2]
    assert flop_bound_ms(plan, cost, rates) == pytest.approx(expected([100, 100], pairs))


def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    png = tmp_path / "r.png"
    argv = ["--tiny", "--lengths", "1024", "--hosts", "2", "--out", str(out), "--markdown", str(md)]
    results = bench.main([*argv, "--plot", str(png)])
    saved = json.loads(out.read_text())
    runs = {(r["method"], r["hosts"]): r for r in saved["runs"]}
    assert set(runs) == {("full", 1), ("star", 2), ("apb", 2), ("apb-balanced", 2)}
    assert all(r["status"] == "ok" and r["finite"] for r in runs.values())
    full = runs[("full", 1)]
    assert full["full_attention"] == "sdpa, CPU" and full["full_kernel"] is None
    assert "on the first of fa4, cudnn, flash, efficient" in saved["meta"]["full_attention"]
    for key in (("star", 2), ("apb", 2), ("apb-balanced", 2)):
        run = runs[key]
        assert run["total_ms"] == pytest.approx(run["compute_ms"] + run["comm_ms"] + run["query_ms"])
        assert run["compute_ms"] == max(run["host_ms"])
        assert run["speedup_vs_full"] == pytest.approx(full["total_ms"] / run["total_ms"])
        assert run["tokens_per_s"] == pytest.approx((1024 + 8) / (run["total_ms"] / 1000))
    assert runs[("star", 2)]["comm_ms"] == 0.0
    assert runs[("apb", 2)]["comm_ms"] > 0.0
    # every APB host against its FLOP bound at this machine's measured rates (none for Star's hosts)
    apb_run = runs[("apb", 2)]
    assert set(saved["meta"]["rates_tflops"]) == {"matmul", "attention", "backend"}
    assert len(apb_run["host_flop_bound_ms"]) == 2 and all(b > 0 for b in apb_run["host_flop_bound_ms"])
    assert apb_run["host_over_bound"] == pytest.approx(
        [t / b for t, b in zip(apb_run["host_ms"], apb_run["host_flop_bound_ms"], strict=True)]
    )
    assert "host_over_bound" not in runs[("star", 2)]
    assert runs[("apb", 2)]["speedup_vs_star"] == pytest.approx(
        runs[("star", 2)]["total_ms"] / runs[("apb", 2)]["total_ms"]
    )
    assert saved["backend"] == "reference"
    # breakdown: APB, Star and full; categories add up to the host's time (+ the modelled comm)
    assert {b["method"] for b in saved["breakdown"]} == {"apb", "apb-balanced", "star", "full"}
    for entry in saved["breakdown"]:
        for host in entry["per_host"]:
            cats = host["ms"]
            assert set(cats) == set(bench.CATEGORIES)
            assert all(v >= 0 for v in cats.values())
            assert sum(cats.values()) == pytest.approx(host["host_ms"] + cats["comm"], rel=1e-6)
            assert cats["ffn"] > 0 and cats["qkv"] > 0 and cats["attention"] > 0
    apb_entry = next(b for b in saved["breakdown"] if b["method"] == "apb")
    assert apb_entry["per_host"][0]["runs_heads"] and apb_entry["per_host"][0]["ms"]["heads"] > 0
    # the prefill's own regions (APBModel.recording(regions=True)) under the breakdown's raw names
    raw = apb_entry["per_host"][0]["raw_ms"]
    assert set(bench.REGION_RAW_NAMES.values()) <= set(raw) and all(raw[k] > 0 for k in raw)
    assert raw["attend"] >= raw["heads_score"] + raw["heads_select"] + raw["backend"]
    # nothing of apb was patched (the breakdown used to wrap these)
    assert apb.attention.select_passing.__module__ == "apb.attention"
    assert apb.attention.PrefillState.attend.__qualname__ == "PrefillState.attend"
    assert not apb_entry["per_host"][-1]["runs_heads"]
    assert "heads_share" in saved["targets"] and "apb_vs_star" in saved["targets"]
    table = md.read_text()
    assert "| apb | 1K | 2 |" in table and "| full (sdpa, CPU) | 1K | 1 |" in table
    assert "busy / FLOP bound" in table and "FLOP bound: a host's linear work" in table
    assert png.stat().st_size > 10_000
    # re-rendering from the JSON gives the same numbers
    again = bench.main(["--from-json", str(out)])
    assert again["runs"] == results["runs"]
    # the script is a thin entry point to the same code
    md2 = tmp_path / "again.md"
    command = [sys.executable, str(ROOT / "scripts" / "bench_prefill.py"), "--from-json", str(out)]
    done = run_or_fail([*command, "--markdown", str(md2)], cwd=tmp_path, env=clean_env(), timeout_s=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert md2.read_text() == table


def test_head_hidden_reaches_the_heads(tmp_path):
    """--head-hidden sets the retaining heads' hidden size (the heads-share measurement varies it)."""
    cfg = bench.config_from_args(bench.parse_args(["--tiny", "--head-hidden", "8"]))
    assert cfg.head_hidden == 8
    assert bench.config_from_args(bench.parse_args([])).head_hidden == 1024
    out = tmp_path / "r.json"
    argv = ["--tiny", "--lengths", "1024", "--hosts", "2", "--methods", "apb", "--no-breakdown"]
    bench.main([*argv, "--head-hidden", "8", "--out", str(out)])
    assert json.loads(out.read_text())["meta"]["head_hidden"] == 8


def test_best_time_keeps_the_fastest_trial():
    """`measure_rates` times each probe with `best_time`: one warm-up call, then the fastest of `trials`
    timings of `repeats` calls, so one slow timing (a busy or clocked-down GPU) cannot loosen the bound."""
    from apb.bench.common import best_time

    now = {"t": 0.0}
    costs = iter([99.0] + [50.0] * 4 + [2.0] * 4 + [1.0] * 4)  # warm-up, a slow trial, then faster ones

    class FakeClock:
        def mark(self):
            return now["t"]

        def ms(self, start, end):
            return end - start

        def sync(self):
            pass

    def call():
        now["t"] += next(costs)

    assert best_time(call, FakeClock(), repeats=4, trials=3) == pytest.approx(1.0 / 1000.0)
    with pytest.raises(StopIteration):  # exactly 1 + 3 x 4 calls were made
        call()


def test_every_method_runs_and_plots(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    methods = ["full", "star", "star-shared", "exact", "apb-paper", "apb", "apb-balanced"]
    argv = [
        "--tiny",
        "--lengths",
        "1024",
        "--hosts",
        "4",
        "--methods",
        *methods,
        "--no-breakdown",
        "--repeats",
        "2",
    ]
    bench.main([*argv, "--out", str(out), "--plot", str(png)])
    runs = {r["method"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == set(methods) and all(r["status"] == "ok" and r["finite"] for r in runs.values())
    # host 0 computes the anchor for the others, except as published and in Star
    shared = {m: runs[m]["shared_anchor"] for m in methods[1:]}
    assert shared == {
        "star": False,
        "star-shared": True,
        "exact": False,
        "apb-paper": False,
        "apb": True,
        "apb-balanced": True,
    }
    assert runs["apb-paper"]["blocks"] == runs["apb"]["blocks"]
    # Star with host 0's block sent as the anchor: the same blocks, the broadcast in the modelled comm
    assert runs["star-shared"]["blocks"] == runs["star"]["blocks"]
    assert runs["star"]["comm_ms"] == 0.0 and runs["star-shared"]["comm_ms"] > 0.0
    assert runs["apb-paper"]["speedup_vs_star"] and png.stat().st_size > 10_000


def test_calibrate_fits_the_split_before_timing(tmp_path, monkeypatch):
    """--calibrate N: the balanced split's cost model is fitted at N tokens (APBModel.calibrate) before any
    timing, recorded in the meta, and the balanced rows run the split it gives."""
    from apb import APBModel, HostPlan

    calls = []
    monkeypatch.setattr(APBModel, "host_times", dear_attention_host_times(calls))  # attention 3x dearer
    out = tmp_path / "r.json"
    argv = ["--tiny", "--lengths", "1024", "--hosts", "4", "--methods", "apb-balanced", "--no-breakdown"]
    bench.main([*argv, "--calibrate", "2048", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert calls == [(2048, 4, 8, "reference")]
    calibration = saved["meta"]["calibration"]
    assert calibration["length"] == 2048 and calibration["hosts"] == 4
    assert calibration["attention_weight"] == pytest.approx(3.0, rel=1e-6)
    assert saved["meta"]["calibrate_length"] == 2048
    (run,) = saved["runs"]
    cost = dataclasses.replace(
        CostModel.from_model_config(build_model("tiny", torch.device("cpu"), torch.float32).config),
        attention_weight=3.0,
    )
    config = APBConfig.for_length(1024, 4, backend="reference", split="balanced")
    assert run["blocks"] == HostPlan(config, 1024, 8, 4, cost=cost).describe()["blocks"]
    default = HostPlan(
        config,
        1024,
        8,
        4,
        cost=CostModel.from_model_config(build_model("tiny", torch.device("cpu"), torch.float32).config),
    )
    assert run["blocks"] != default.describe()["blocks"]  # the fit moved the split
    with pytest.raises(ValueError, match="calibrate_length"):
        bench.config_from_args(bench.parse_args(["--tiny", "--calibrate", "-1"]))
