"""Reliability of inference: every bad input is one clear error before the prefill, never a silent wrong answer;
ranks given different inputs stop together with the differing rank and field named; loading heads twice onto
one model keeps one set of hooks.
"""

from __future__ import annotations

import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model

import apb
from apb import APBConfig, APBModel, build_heads
from apb.adapter import save_adapter
from apb.backends import get_backend

VOCAB = 128  # tiny_model's vocab_size
SPAWN_TIMEOUT_S = 120  # two ranks of a 2-layer model finish in ~10 s; more is a hang


def _ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llama() -> APBModel:
    return APBModel(tiny_model("llama"))


def _no_prefill(monkeypatch, apbm: APBModel) -> None:
    """Any decoder run fails the test: the error must come before the heavy work."""

    def run_decoder(*args, **kwargs):
        raise AssertionError("the prefill ran before the bad argument was refused")

    monkeypatch.setattr(apbm, "_run_decoder", run_decoder)


# ------------------------------------------------------------------------------------------ token ids


@pytest.mark.parametrize("argument", ["context_ids", "query_ids", "anchor_query_ids"])
@pytest.mark.parametrize(
    "make",
    [
        lambda ids: ids.float(),
        lambda ids: ids.double() + 0.5,
        lambda ids: ids > 3,
        lambda ids: [float(i) for i in ids.tolist()],
        lambda ids: [[True, False] * 3],
    ],
    ids=["float32", "float64", "bool", "float list", "bool list"],
)
def test_non_integer_token_ids_are_refused_naming_the_argument(monkeypatch, llama, argument, make):
    _no_prefill(monkeypatch, llama)
    inputs = {"context_ids": _ids(0, 20), "query_ids": _ids(1, 6), "anchor_query_ids": _ids(1, 6)}
    inputs[argument] = make(inputs[argument])
    with pytest.raises(TypeError, match=rf"^{argument} must .*integer token ids"):
        llama.prefill(config=APBConfig.exact(), num_hosts=2, **inputs)
    with pytest.raises(TypeError, match=rf"^{argument} must .*integer token ids"):
        llama.generate(config=APBConfig.exact(), num_hosts=2, max_new_tokens=2, **inputs)


@pytest.mark.parametrize("argument", ["context_ids", "query_ids", "anchor_query_ids"])
@pytest.mark.parametrize("bad", [-1, VOCAB, 10**6])
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_argument(monkeypatch, llama, argument, bad):
    _no_prefill(monkeypatch, llama)
    inputs = {"context_ids": _ids(0, 20), "query_ids": _ids(1, 6), "anchor_query_ids": _ids(1, 6)}
    inputs[argument] = inputs[argument].clone()
    inputs[argument][3] = bad
    with pytest.raises(ValueError, match=rf"^{argument} holds token id {bad}, outside .*\[0, {VOCAB}\)"):
        llama.prefill(config=APBConfig.exact(), **inputs)


def test_text_instead_of_ids_is_refused(llama):
    with pytest.raises(TypeError, match="context_ids must be token ids, got text.*tokenize"):
        llama.prefill("Once upon a time", [1, 2], config=APBConfig.exact())


def test_integer_ids_of_every_form_give_the_same_logits(llama):
    """The checks refuse nothing valid: int32 tensors, lists, numpy ints, the edges of the vocabulary."""
    import numpy as np

    context = _ids(0, 20)
    context[0], context[1] = 0, VOCAB - 1
    query = _ids(1, 4)
    expected = llama.prefill(context, query, config=APBConfig.exact(), num_hosts=2)
    forms = [
        (context.int(), query.short()),
        (context.tolist(), query.tolist()),
        ([np.int64(i) for i in context.tolist()], np.asarray(query.tolist(), dtype=np.int32)),
        ([context.tolist()], [query.tolist()]),
    ]
    for c, q in forms:
        assert torch.equal(llama.prefill(c, q, config=APBConfig.exact(), num_hosts=2), expected)


# -------------------------------------------------------------------------------- generation arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"eos_token_id": "</s>"},
            TypeError,
            r"eos_token_id must be an int .*string '</s>'.*tokenizer\.eos_token_id",
        ),
        ({"eos_token_id": ["</s>", 2]}, TypeError, r"eos_token_id must be an int or a sequence of ints"),
        ({"eos_token_id": 2.0}, TypeError, r"eos_token_id must be an int"),
        ({"eos_token_id": -1}, ValueError, r"eos_token_id must be ids >= 0"),
        ({"max_new_tokens": 2.5}, TypeError, r"max_new_tokens must be an int >= 1, got 2\.5"),
        ({"max_new_tokens": "8"}, TypeError, r"max_new_tokens must be an int"),
        ({"max_new_tokens": True}, TypeError, r"max_new_tokens must be an int"),
        ({"max_new_tokens": 0}, ValueError, r"max_new_tokens must be >= 1"),
        ({"seed": 1.5}, TypeError, r"seed must be an int or None"),
        ({"temperature": "0.7"}, TypeError, r"temperature must be a number"),
        ({"temperature": float("nan"), "do_sample": True}, ValueError, r"temperature must be finite"),
        ({"temperature": 0.0, "do_sample": True}, ValueError, r"temperature must be > 0 when sampling"),
        ({"top_p": 1.5, "do_sample": True}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"top_p": None}, TypeError, r"top_p must be a number"),
        ({"top_k": 2.0}, TypeError, r"top_k must be an int"),
        ({"top_k": -1, "do_sample": True}, ValueError, r"top_k must be >= 0"),
        ({"do_sample": "yes"}, TypeError, r"do_sample must be a bool"),
        ({"stop_strings": ["ok", 3], "tokenizer": object()}, TypeError, r"stop_strings must be"),
    ],
)
def test_generation_arguments_are_refused_before_the_prefill(monkeypatch, llama, kwargs, error, match):
    _no_prefill(monkeypatch, llama)
    with pytest.raises(error, match=match):
        llama.generate(_ids(0, 20), _ids(1, 4), config=APBConfig.exact(), **kwargs)


def test_eos_ids_as_a_list_or_tensor_stop_generation(llama):
    context, query = _ids(0, 20), _ids(1, 4)
    greedy = llama.generate(context, query, config=APBConfig.exact(), max_new_tokens=6)[0].tolist()
    eos = greedy[1]
    stop_at = greedy.index(eos)
    for form in (eos, [eos, VOCAB - 1], (eos,), torch.tensor(eos), torch.tensor([eos])):
        ids = llama.generate(context, query, config=APBConfig.exact(), max_new_tokens=6, eos_token_id=form)
        assert ids[0].tolist() == greedy[: stop_at + 1], form
    # greedy decoding ignores out-of-range sampling settings, as transformers does (temperature=0 is common)
    ids = llama.generate(context, query, config=APBConfig.exact(), max_new_tokens=6, temperature=0, top_p=0.0)
    assert ids[0].tolist() == greedy


# ---------------------------------------------------------------------------------------- backends


def test_flex_on_the_cpu_is_refused_at_config_resolution(monkeypatch, llama):
    _no_prefill(monkeypatch, llama)
    with pytest.raises(
        ValueError, match=r"backend 'flex' needs CUDA.*on cpu; usable on cpu: auto, .*reference, sdpa"
    ):
        llama.prefill(_ids(0, 300), _ids(1, 4), config=APBConfig.exact(backend="flex"), num_hosts=2)
    with pytest.raises(ValueError, match=r"'flex' needs CUDA"):
        get_backend("flex", "cpu")
    assert get_backend("sdpa", "cpu") is get_backend("auto", "cpu")


# -------------------------------------------------------------------------------------------- heads


def test_nan_or_inf_in_heads_given_directly_is_refused_naming_the_tensor():
    model = tiny_model("qwen3")
    heads = build_heads(model, hidden_size=16)
    with torch.no_grad():
        heads.layers[1].fc1.weight[0, 0] = float("inf")
        heads.layers[1].fc1.weight[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"tensor layers\.1\.fc1\.weight holds 2 NaN/inf"):
        APBModel(model, heads)
    with torch.no_grad():
        heads.layers[1].fc1.weight.nan_to_num_(posinf=0.0)
    APBModel(model, heads)  # finite again: accepted


def test_a_context_past_the_models_positions_is_run_with_one_warning(caplog):
    """Positions past max_position_embeddings run as the model itself would run them (RoPE has no table to
    overflow), with one warning per model saying the answers may suffer."""
    apbm = APBModel(tiny_model("llama", max_position_embeddings=64))
    context, query = torch.randint(0, 128, (1, 70)), torch.randint(0, 128, (1, 4))
    exact = APBConfig.exact()
    with caplog.at_level("WARNING", logger="apb.model"):
        apbm.prefill(context[:, :50], query, config=exact, num_hosts=2)
        assert not caplog.records  # 54 tokens: within the model's positions
        logits = apbm.prefill(context, query, config=exact, num_hosts=2)
        apbm.prefill(context, query, config=exact, num_hosts=2)
    assert torch.isfinite(logits).all()
    (record,) = caplog.records
    assert "74 tokens runs positions past the model's max_position_embeddings (64)" in record.getMessage()
    with torch.no_grad():  # the same logits as the model itself at those positions
        expected = apbm.model(torch.cat([context, query], dim=1)).logits[:, -4:]
    assert (logits - expected).abs().max().item() < 1e-5


def _num_projection_hooks(model) -> int:
    attn = model.model.layers
    return sum(len(m._forward_hooks) for layer in attn for m in layer.self_attn.modules())


def test_loading_heads_twice_keeps_one_set_of_hooks_and_right_results(tmp_path):
    sparse = APBConfig(anchor_len=8, passing_len=3, query_in_anchor=True, query_offset=2)
    context, query = _ids(0, 40), _ids(1, 4)
    model = tiny_model("llama")
    first_heads, second_heads = build_heads(model, hidden_size=16), build_heads(model, hidden_size=16)
    with torch.no_grad():  # heads that pass other tokens, so a mix-up would show in the logits
        second_heads.layers[0].fc2.weight.mul_(-1)
        second_heads.layers[1].fc2.weight.mul_(-1)
    first_dir = save_adapter(first_heads, tmp_path / "first")
    second_dir = save_adapter(second_heads, tmp_path / "second")

    # each adapter on a model of its own: the expected logits
    expected = {
        name: apb.load(tiny_model("llama"), folder).prefill(context, query, config=sparse, num_hosts=3)
        for name, folder in (("first", first_dir), ("second", second_dir))
    }
    assert not torch.equal(expected["first"], expected["second"])

    first = apb.load(model, first_dir)
    hooks = _num_projection_hooks(model)
    assert hooks == 3 * model.config.num_hidden_layers
    second = apb.load(model, second_dir)
    third = apb.load(model, first_dir)
    assert _num_projection_hooks(model) == hooks
    for apbm, name in ((first, "first"), (second, "second"), (third, "first"), (second, "second")):
        logits = apbm.prefill(context, query, config=sparse, num_hosts=3)
        assert torch.allclose(logits, expected[name], atol=1e-6), name  # same ops, same order
    # the plain model is untouched by the hooks
    plain = tiny_model("llama")
    with torch.no_grad():
        full = torch.cat([context, query])[None]
        assert _num_projection_hooks(plain) == 0
        assert torch.equal(model(full).logits, plain(full).logits)


def test_unload_gives_the_model_back_and_stops_every_apb_model_on_it(tmp_path):
    """`unload`: the original attention implementation and no q/k/v hooks, the plain model's logits; this and
    every other APBModel of the model then refuse to run, with a message saying what to do; loading again
    works as the first load did."""
    sparse = APBConfig(anchor_len=8, passing_len=3, query_in_anchor=True, query_offset=2)
    context, query = _ids(0, 40), _ids(1, 4)
    model = tiny_model("llama")
    folder = save_adapter(build_heads(model, hidden_size=16), tmp_path / "heads")
    first, second = apb.load(model, folder), apb.load(model, folder)
    expected = first.prefill(context, query, config=sparse, num_hosts=3)
    assert first.unload() is model
    assert model.config._attn_implementation == "sdpa" and _num_projection_hooks(model) == 0
    plain = tiny_model("llama")
    full = torch.cat([context, query])[None]
    with torch.no_grad():
        assert torch.equal(model(full).logits, plain(full).logits)
    for apbm in (first, second):
        with pytest.raises(RuntimeError, match=r"APB attention was removed \(APBModel.unload.*apb.load"):
            apbm.generate(context, query, config=sparse, num_hosts=3, max_new_tokens=2)
    again = apb.load(model, folder)
    assert _num_projection_hooks(model) == 3 * model.config.num_hidden_layers
    assert torch.equal(again.prefill(context, query, config=sparse, num_hosts=3), expected)


# ------------------------------------------------------------------------------ distributed agreement

NUM_RANKS = 2


def _scenarios(rank: int) -> dict[str, str]:
    """What each rank saw: "ok" or the error's type and message. Every scenario is one prefill on both
    ranks; the last is a good one, which shows the ranks' collectives are still in step after refusals."""
    torch.set_num_threads(1)
    out: dict[str, str] = {}
    model = tiny_model("qwen3")
    torch.manual_seed(5)
    apbm = APBModel(model, build_heads(model, hidden_size=16))
    sparse = APBConfig(anchor_len=8, passing_len=3, query_in_anchor=True, query_offset=2)
    context, query = _ids(1, 37), _ids(2, 4)
    other_context = context.clone()
    other_context[20] = (other_context[20] + 1) % VOCAB  # one token differs, same length

    def run(name: str, fn) -> None:
        try:
            fn()
            out[name] = "ok"
        except (TypeError, ValueError) as err:
            out[name] = f"{type(err).__name__}: {err}"

    run("other_context", lambda: apbm.prefill(context if rank == 0 else other_context, query, config=sparse))
    run("other_query_len", lambda: apbm.prefill(context, query[: 4 - rank], config=sparse))
    run(
        "other_passing_len",
        lambda: apbm.prefill(
            context, query, config=APBConfig(**{**sparse.to_dict(), "passing_len": 3 + rank})
        ),
    )
    run(
        "other_max_new_tokens",
        lambda: apbm.generate(context, query, config=sparse, max_new_tokens=3 + rank),
    )
    run(
        "float_ids_on_rank_1",
        lambda: apbm.prefill(context.float() if rank else context, query, config=sparse),
    )
    run(
        "flex_on_rank_0",
        lambda: apbm.prefill(
            context,
            query,
            config=APBConfig(**{**sparse.to_dict(), "backend": "flex" if rank == 0 else "reference"}),
        ),
    )
    logits = apbm.prefill(context, query, config=sparse)
    out["good_logits"] = logits
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = _scenarios(rank)
    except BaseException:
        results = {"crash": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def agreement(tmp_path_factory) -> list[dict]:
    out_dir = str(tmp_path_factory.mktemp("apb_agree"))
    context = mp.spawn(_worker, args=(NUM_RANKS, _free_port(), out_dir), nprocs=NUM_RANKS, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(
                f"the {NUM_RANKS} gloo ranks did not finish in {SPAWN_TIMEOUT_S} s: a rank hangs in a collective"
            )
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(NUM_RANKS)]
    for rank, result in enumerate(results):
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
    return results


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "field"),
    [
        ("other_context", "context_sha256"),
        ("other_query_len", "query_len"),
        ("other_passing_len", "config.passing_len"),
        ("other_max_new_tokens", "max_new_tokens"),
    ],
)
def test_ranks_given_different_inputs_all_refuse_naming_rank_and_field(agreement, scenario, field):
    for rank, results in enumerate(agreement):
        message = results[scenario]
        assert message.startswith("ValueError: the 2 ranks were not given the same inputs"), (rank, message)
        assert f"{field} differs on rank(s) 1" in message, (rank, message)


@pytest.mark.slow
def test_a_rank_that_refuses_its_inputs_stops_the_others(agreement):
    rank0, rank1 = agreement
    assert rank1["float_ids_on_rank_1"].startswith("TypeError: context_ids must hold integer token ids")
    assert rank0["float_ids_on_rank_1"].startswith("ValueError: another rank refused its inputs")
    assert "rank 1: TypeError: context_ids must hold integer token ids" in rank0["float_ids_on_rank_1"]
    assert rank0["flex_on_rank_0"].startswith("ValueError: APB attention backend 'flex' needs CUDA")
    assert "rank 0: ValueError: APB attention backend 'flex'" in rank1["flex_on_rank_0"]


@pytest.mark.slow
def test_agreeing_ranks_after_refusals_match_the_simulation(agreement):
    model = tiny_model("qwen3")
    torch.manual_seed(5)
    apbm = APBModel(model, build_heads(model, hidden_size=16))
    sparse = APBConfig(anchor_len=8, passing_len=3, query_in_anchor=True, query_offset=2)
    simulated = apbm.prefill(_ids(1, 37), _ids(2, 4), config=sparse, num_hosts=NUM_RANKS)
    for rank, results in enumerate(agreement):
        # fp32, the same ops in the same order as the simulation (tests/test_apb_distributed.py)
        err = (results["good_logits"] - simulated).abs().max().item()
        assert err < 1e-5, f"rank {rank}: max |dist - sim| = {err:.2e}"
