"""`apb.fusion.compile_layers`: the norms, MLPs and attention modules compiled around APB's attention
function, which runs eagerly (or the attention modules left eager, `attention=False`); APB's prefill (exact
and sparse, with the q/k/v hooks of the retaining heads) and decoding give the logits and tokens of the
uncompiled model; the benchmarks' --compile-layers.

CPU, tiny random models, backend aot_eager (traced and run through AOTAutograd like inductor, without a C++
compiler). Tolerance: fp32; exact APB only regroups the same dot products (the oracle's ATOL, see
tests/test_apb_oracle.py) and the compiled graphs run the same ops, so the compiled model's logits stay
within it of the uncompiled model's.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch._dynamo
from conftest import tiny_model
from torch import nn

import apb.bench.dist as dist_bench
import apb.bench.prefill as bench
from apb import APBConfig, APBModel, build_heads, compile_layers

ATOL = 1e-5
NUM_QUERY = 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled graphs and recompile counts are process-wide: every test starts and ends without them."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """aot_eager that counts the graphs it compiles and the calls into them: proof the compiled graphs ran
    (and, through `num_graphs`, that new lengths did not recompile)."""

    def __init__(self):
        self.aot_eager = torch._dynamo.lookup_backend("aot_eager")
        self.num_graphs = 0
        self.num_calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.num_graphs += 1
        compiled = self.aot_eager(gm, example_inputs)

        def run(*args):
            self.num_calls += 1
            return compiled(*args)

        run._boxed_call = getattr(compiled, "_boxed_call", False)  # same calling convention as aot_eager's
        return run


def _ids(seed: int, length: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _plain_query_logits(model: nn.Module, context: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.cat([context, query], dim=1)).logits[:, -query.shape[1] :]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_exact_apb_on_compiled_layers_equals_the_plain_model(family):
    model = tiny_model(family)
    plain = copy.deepcopy(model)  # before compiling: a copy made after would call the original's graphs
    backend = CountingBackend()
    num_layers = model.config.num_hidden_layers
    # input_layernorm, self_attn, post_attention_layernorm and mlp per layer, and the final norm
    assert compile_layers(model, backend=backend) == 4 * num_layers + 1
    assert all(layer.self_attn._compiled_call_impl is not None for layer in model.model.layers)
    apbm = APBModel(model)
    graphs = []
    for num_context in (37, 53):  # two lengths, host blocks of several sizes: dynamic shapes
        context, query = _ids(num_context, num_context), _ids(1, NUM_QUERY)
        expected = _plain_query_logits(plain, context, query)
        for num_hosts in (2, 3):
            calls_before = backend.num_calls
            logits = apbm.prefill(context, query, config=APBConfig.exact(), num_hosts=num_hosts)
            err = (logits - expected).abs().max().item()
            assert err < ATOL, (
                f"{family} n={num_context} H={num_hosts}: max |compiled APB - plain| = {err:.2e}"
            )
            # every host's decoder call and the query pass went through the compiled graphs: per layer the
            # two norms, the MLP and the attention module's two graphs (before and after APB's attention),
            # then the final norm; a host stops at its last layer's attention (input norm, graph before it)
            host_calls = 5 * (num_layers - 1) + 2
            assert backend.num_calls - calls_before == num_hosts * host_calls + 5 * num_layers + 1
        graphs.append(backend.num_graphs)
    # a second length compiles nothing new (dynamic=True), and APB's host-by-host work reaches no guard
    assert graphs[0] == graphs[1] <= 6, graphs


def test_attention_can_stay_eager():
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    assert (
        compile_layers(model, attention=False, backend="aot_eager") == 3 * model.config.num_hidden_layers + 1
    )
    assert all(getattr(layer.self_attn, "_compiled_call_impl", None) is None for layer in model.model.layers)
    context, query = _ids(2, 41), _ids(1, NUM_QUERY)
    logits = APBModel(model).prefill(context, query, config=APBConfig.exact(), num_hosts=3)
    assert (logits - _plain_query_logits(plain, context, query)).abs().max().item() < ATOL


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sparse_apb_with_heads_on_compiled_layers_equals_uncompiled(family):
    """The retaining heads read q/k/v (Qwen3: the q/k norms) through forward hooks inside the compiled
    attention modules: same passing choices, logits and generated tokens as an uncompiled copy of the same
    model and heads, over several prefills without new graphs. Ten layers, more than Dynamo's recompile
    limit (8): graphs guarded on a layer's hooks would recompile per layer and then fall back to eager."""
    model = tiny_model(family, num_hidden_layers=10)
    torch.manual_seed(0)
    heads = build_heads(model, hidden_size=16)
    plain, plain_heads = copy.deepcopy(model), copy.deepcopy(heads)
    backend = CountingBackend()
    compile_layers(model, backend=backend)
    config = APBConfig(anchor_len=6, passing_len=4, query_in_anchor=True, query_offset=1)
    num_layers = model.config.num_hidden_layers
    compiled, uncompiled = APBModel(model, heads), APBModel(plain, plain_heads)
    graphs = []
    for seed, num_context in ((3, 61), (5, 80), (6, 67)):
        context, query = _ids(seed, num_context), _ids(seed + 1, NUM_QUERY)
        runs = []
        for apbm in (compiled, uncompiled):
            with apbm.recording() as record:
                logits = apbm.prefill(context, query, config=config, num_hosts=3)
            runs.append((logits, record.passing))
        (logits, passing), (expected, expected_passing) = runs
        # hosts 0 and 1 each pass 4 tokens per KV head and layer (but the last, where hosts only store their
        # K/V), chosen by their heads; the last host passes none
        assert [len(passing[host]) for host in range(3)] == [num_layers - 1, num_layers - 1, 0]
        assert passing.keys() == expected_passing.keys()
        for host, layers in expected_passing.items():
            for layer, indices in layers.items():
                assert indices.shape[-1] == 4
                assert torch.equal(passing[host][layer], indices), f"host {host} layer {layer}"
        assert (logits - expected).abs().max().item() < ATOL
        graphs.append(backend.num_graphs)
    # as many graphs for ten layers as for one (the heads' hooks split the attention module's graph at the
    # projections), and new lengths and inputs add none
    assert graphs[0] == graphs[-1] <= 12, graphs
    kwargs = dict(config=config, num_hosts=3, max_new_tokens=6)
    context, query = _ids(3, 61), _ids(4, NUM_QUERY)
    assert torch.equal(
        compiled.generate(context, query, **kwargs), uncompiled.generate(context, query, **kwargs)
    )


def test_second_call_compiles_nothing():
    model = tiny_model("mistral")
    assert compile_layers(model, backend="aot_eager") == 4 * model.config.num_hidden_layers + 1
    assert compile_layers(model, backend="aot_eager") == 0


class _NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(4, 4)

    def get_decoder(self) -> nn.Module:
        return self.decoder


class _NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])

    def get_decoder(self) -> nn.Module:
        return self


def test_models_without_decoder_layers_or_attention_are_refused():
    with pytest.raises(ValueError, match=r"_NoLayers has no `get_decoder\(\).layers`"):
        compile_layers(_NoLayers())
    with pytest.raises(ValueError, match=r"layer 0 \(Sequential\) of _NoAttention has no `self_attn`"):
        compile_layers(_NoAttention())


def test_bench_flag_parses_and_is_checked():
    assert bench.parse_args([]).compile_layers is None
    assert bench.parse_args(["--compile-layers"]).compile_layers == "inductor"
    cfg = bench.config_from_args(bench.parse_args(["--tiny", "--compile-layers", "aot_eager"]))
    assert cfg.compile_layers == "aot_eager"
    args = dist_bench.parse_args(["--tiny", "--compile-layers"])
    assert dist_bench.config_from_args(args, 2).compile_layers == "inductor"
    assert dist_bench.config_from_args(dist_bench.parse_args(["--tiny"]), 2).compile_layers is None
    with pytest.raises(ValueError, match="compile_layers must be a torch.compile backend"):
        bench.BenchConfig(compile_layers="no-such-backend")


def test_tiny_bench_with_compiled_layers(tmp_path):
    """Full attention, APB and the per-block breakdown (hooks on the compiled MLPs) on the same compiled
    layers; the JSON and the table say so."""
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["--tiny", "--lengths", "1024", "--hosts", "2", "--methods", "full", "apb"]
    bench.main([*argv, "--compile-layers", "aot_eager", "--out", str(out), "--markdown", str(md)])
    saved = json.loads(out.read_text())
    assert saved["meta"]["compile_layers"] == saved["meta"]["config"]["compile_layers"] == "aot_eager"
    runs = {r["method"]: r for r in saved["runs"]}
    assert set(runs) == {"full", "apb"} and all(r["status"] == "ok" and r["finite"] for r in runs.values())
    assert {b["method"] for b in saved["breakdown"]} == {"full", "apb"}
    for entry in saved["breakdown"]:
        assert all(host["ms"]["ffn"] > 0 for host in entry["per_host"])
    assert "compiled (`torch.compile`, backend `aot_eager`)" in md.read_text()
    header = dist_bench.markdown(
        {"meta": {**saved["meta"], "world_size": 2, "backend_dist": "gloo"}, "runs": []}
    )
    assert "backend `aot_eager`" in header
