"""Real processes (gloo on the CPU, spawned from pytest) give the same numbers as the simulation.

One spawn of 3 ranks runs every scenario (each spawn costs seconds of interpreter start-up); the
in-process simulation with num_hosts=3 runs the same scenarios and the results are compared:
logits to atol=1e-5 (fp32; the two paths run the same ops in the same order, differences can only
come from BLAS threading), token ids exactly, and every rank must hold the same ids and stop step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, steps_from_graph_inputs, tiny_model

import apb.attention
import apb.model
from apb import APBConfig, APBModel, build_heads, compile_layers
from apb.decode import StopCriteria, sample_next_token

NUM_HOSTS = 3
ATOL = 1e-5
TIMEOUT_S = 300  # the spawn takes ~10-20 s; past this a rank is stuck (a collective one rank missed)


class _DigitTokenizer:
    """Decodes ids as space-separated numbers: enough for stop strings."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


class _RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value)

    def end(self):
        self.ended += 1


def _ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _scenarios(num_hosts: int | None) -> dict[str, torch.Tensor]:
    """Everything compared between 1 and N processes; num_hosts=None inside a process group."""
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    context, query = _ids(1, 1, 37), _ids(2, 1, 4)
    exact = APBConfig.exact()

    llama = APBModel(tiny_model("llama"))
    out["exact_logits"] = llama.prefill(context, query, config=exact, num_hosts=num_hosts)
    out["greedy"] = llama.generate(context, query, config=exact, num_hosts=num_hosts, max_new_tokens=6)
    # two rows at once: the gathered partials are laid out [hosts x batch, ...] and must come apart per row
    rows, row_queries = _ids(3, 2, 29), _ids(4, 2, 3)
    out["batch_logits"] = llama.prefill(rows, row_queries, config=exact, num_hosts=num_hosts)
    out["batch_greedy"] = llama.generate(
        rows, row_queries, config=exact, num_hosts=num_hosts, max_new_tokens=4
    )
    out["row1_logits"] = llama.prefill(rows[1:], row_queries[1:], config=exact, num_hosts=num_hosts)
    sampled = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=123, max_new_tokens=8)
    out["sampled"] = llama.generate(context, query, config=exact, num_hosts=num_hosts, **sampled)
    eos = int(out["greedy"][0, 2])  # greedy hits this at step 2 (or earlier)
    out["eos"] = llama.generate(
        context, query, config=exact, num_hosts=num_hosts, max_new_tokens=6, eos_token_id=eos
    )
    streamer = _RecordingStreamer()
    llama.generate(context, query, config=exact, num_hosts=num_hosts, max_new_tokens=6, streamer=streamer)
    out["streamed"] = torch.tensor([streamer.ended, *(int(p.numel()) for p in streamer.puts[:1])])
    out["streamed_ids"] = torch.stack(streamer.puts[1:], dim=1) if streamer.puts else torch.empty(0)
    stop = " ".join(str(i) for i in out["greedy"][0, 1:3].tolist())
    out["stop"] = llama.generate(
        context,
        query,
        config=exact,
        num_hosts=num_hosts,
        max_new_tokens=6,
        stop_strings=[stop],
        tokenizer=_DigitTokenizer(),
    )

    model = tiny_model("qwen3")
    torch.manual_seed(5)
    qwen = APBModel(model, build_heads(model, hidden_size=16))
    # host 0 sends the anchor (shared, the default) or every host runs its own: the same logits under one
    # split (the balanced split sizes the blocks differently for the two, as their work differs)
    sparse = APBConfig(anchor_len=8, passing_len=3, query_in_anchor=True, query_offset=2, split="equal")
    out["sparse_logits"] = qwen.prefill(context, query, config=sparse, num_hosts=num_hosts)
    own = dataclasses.replace(sparse, share_anchor=False)
    out["own_anchor_logits"] = qwen.prefill(context, query, config=own, num_hosts=num_hosts)
    no_splice = APBConfig(anchor_len=8, passing_len=3)  # host 0's first block tokens are the anchor; balanced
    out["block_anchor_logits"] = qwen.prefill(context, query, config=no_splice, num_hosts=num_hosts)
    out["star_logits"] = qwen.prefill(
        context, query, config=APBConfig.star(37, NUM_HOSTS), num_hosts=num_hosts
    )
    # the same model and heads with compiled layers (attention modules included): APB's attention, its
    # collectives and the heads' hooks run outside the graphs, on every rank alike
    compiled = tiny_model("qwen3")
    torch.manual_seed(5)
    compiled_heads = build_heads(compiled, hidden_size=16)
    compile_layers(compiled, backend="aot_eager")
    out["compiled_sparse_logits"] = APBModel(compiled, compiled_heads).prefill(
        context, query, config=sparse, num_hosts=num_hosts
    )
    return out


def _graphed_steps(num_hosts: int | None) -> dict[str, torch.Tensor]:
    """generate's steps as `GraphedSteps(record_graph=False)` (what a replay computes, from the graph's
    input tensors) with 2 tokens of room, so the last host's store grows every other step: only the last
    rank's store grows, yet every rank must record again at the same steps (a recording runs the step's
    collectives, as a replay does). The ids, and each GraphedSteps' recordings."""
    with pytest.MonkeyPatch.context() as patch:
        made = steps_from_graph_inputs(patch)
        patch.setattr(apb.model, "DECODE_ROOM", 2)
        patch.setattr(apb.attention, "DECODE_ROOM", 2)
        ids = APBModel(tiny_model("llama")).generate(
            _ids(1, 1, 37), _ids(2, 1, 4), config=APBConfig.exact(), num_hosts=num_hosts, max_new_tokens=9,
            do_sample=True, temperature=0.8, seed=11,
        )  # fmt: skip
    return {"graphed_ids": ids, "graphed_recordings": torch.tensor([steps.recordings for steps in made])}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # a collective that one rank never joins raises after this long instead of waiting 30 min
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        results = _scenarios(None)
        results.update(_graphed_steps(None))
        try:
            APBModel(tiny_model("llama")).prefill(
                _ids(1, 37), _ids(2, 4), config=APBConfig.exact(), num_hosts=2
            )
        except ValueError as err:
            results["mismatch_error"] = str(err)
        # every rank times the hosts itself; the ranks average, so that all fit the same cost model
        calibrating = APBModel(tiny_model("llama"))
        results["host_times"] = torch.tensor(calibrating.host_times(64, repeats=1), dtype=torch.float64)
        try:  # ranks asked for different calibrations stop together instead of waiting in a collective
            calibrating.host_times(64 + rank, repeats=1)
        except ValueError as err:
            results["calibrate_mismatch_error"] = str(err)
        # ranks whose cost models differ would split the context differently: refused on every rank
        if rank == 1:
            calibrating.cost_model = dataclasses.replace(calibrating.cost_model, attention_weight=50.0)
        try:
            calibrating.prefill(_ids(1, 37), _ids(2, 4), config=APBConfig(anchor_len=8, passing_len=None))
        except ValueError as err:
            results["cost_mismatch_error"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: gloo can abort a process whose peer tears the group down first
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> list[dict]:
    out_dir = str(tmp_path_factory.mktemp("apb_dist"))
    ranks = mp.spawn(_worker, args=(NUM_HOSTS, free_port(), out_dir), nprocs=NUM_HOSTS, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ranks.join(timeout=1):  # re-raises a rank's exception
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the {NUM_HOSTS} spawned ranks did not finish in {TIMEOUT_S} s (a hang?)")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(NUM_HOSTS)]


@pytest.fixture(scope="module")
def simulated() -> dict:
    threads = torch.get_num_threads()
    try:
        return {**_scenarios(NUM_HOSTS), **_graphed_steps(NUM_HOSTS)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_processes_match_simulation(spawned, simulated):
    for rank, results in enumerate(spawned):
        names = ("exact_logits", "sparse_logits", "own_anchor_logits", "block_anchor_logits", "star_logits")
        names += ("compiled_sparse_logits",)
        for name in (*names, "batch_logits", "row1_logits"):
            err = (results[name] - simulated[name]).abs().max().item()
            assert err < ATOL, f"rank {rank} {name}: max |dist - sim| = {err:.2e}"
        err = (results["sparse_logits"] - results["own_anchor_logits"]).abs().max().item()
        assert err < ATOL, f"rank {rank}: shared vs own anchor: {err:.2e}"
        err = (results["sparse_logits"] - results["compiled_sparse_logits"]).abs().max().item()
        assert err < ATOL, f"rank {rank}: compiled vs eager layers: {err:.2e}"
        # a row of a batch comes out as it does alone
        err = (results["batch_logits"][1:] - results["row1_logits"]).abs().max().item()
        assert err < ATOL, f"rank {rank}: batch row 1 vs alone: {err:.2e}"
        for name in ("greedy", "sampled", "eos", "stop", "batch_greedy"):
            assert torch.equal(results[name], simulated[name]), (rank, name, results[name], simulated[name])
        assert "world size 3" in results["mismatch_error"]


@pytest.mark.slow
def test_ranks_calibrate_alike_and_refuse_different_splits(spawned):
    times = [results["host_times"] for results in spawned]
    assert times[0].shape == (2 * NUM_HOSTS, 3)  # every host at 64 and 32 tokens: tokens, pairs, seconds
    assert (times[0][:, 2] > 0).all()
    for other in times[1:]:  # averaged over the ranks: bit-identical, so every rank fits the same weight
        assert torch.equal(other, times[0])
    for results in spawned:
        error = results["cost_mismatch_error"]
        assert "plan.blocks differs on rank(s) 1" in error, error
        error = results["calibrate_mismatch_error"]
        assert "calibrate.plan0 differs" in error and "calibrate.plan1" in error, error


@pytest.mark.slow
def test_graphed_steps_record_again_on_every_rank_together(spawned, simulated):
    """Steps from the graph's inputs over 3 ranks: the simulation's ids, and every rank recorded its step
    as often as the simulation did (at the first step and at each growth of the last host's store)."""
    expected = simulated["graphed_recordings"]
    assert expected.tolist() == [4]  # steps 0, 2, 4 and 6 of 8: the store grew by 2 at each
    for rank, results in enumerate(spawned):
        assert torch.equal(results["graphed_ids"], simulated["graphed_ids"]), rank
        assert torch.equal(results["graphed_recordings"], expected), (rank, results["graphed_recordings"])


@pytest.mark.slow
def test_eos_and_stop_strings_stop_every_host_together(spawned, simulated):
    greedy = simulated["greedy"][0].tolist()
    eos_step = greedy.index(greedy[2])
    assert simulated["eos"][0].tolist() == greedy[: eos_step + 1]
    assert simulated["stop"][0].tolist() == greedy[:3]
    for results in spawned:  # every rank stopped at the same step with the same tokens
        assert results["eos"].shape == simulated["eos"].shape
        assert results["stop"].shape == simulated["stop"].shape


@pytest.mark.slow
def test_streamer_runs_on_the_process_of_host_0(spawned, simulated):
    assert simulated["streamed"].tolist() == [1, 37 + 4]  # end() once; the prompt first
    assert torch.equal(simulated["streamed_ids"], simulated["greedy"])
    assert spawned[0]["streamed"].tolist() == [1, 37 + 4]
    assert torch.equal(spawned[0]["streamed_ids"], simulated["greedy"])
    for results in spawned[1:]:  # the other ranks never touch it
        assert results["streamed"].tolist() == [0] and results["streamed_ids"].numel() == 0


# ---------------------------------------------------------------- sampling (in process)


def test_sampling_is_reproducible_under_a_seed():
    apbm = APBModel(tiny_model("llama"))
    context, query = _ids(3, 1, 30), _ids(4, 1, 3)
    kwargs = dict(config=APBConfig.exact(), max_new_tokens=10, do_sample=True, temperature=1.5, seed=7)
    one_host = apbm.generate(context, query, num_hosts=1, **kwargs)
    assert torch.equal(one_host, apbm.generate(context, query, num_hosts=1, **kwargs))
    assert torch.equal(one_host, apbm.generate(context, query, num_hosts=3, **kwargs))
    others = [apbm.generate(context, query, num_hosts=1, **{**kwargs, "seed": s}) for s in (8, 9, 10)]
    assert any(not torch.equal(one_host, o) for o in others), "the seed changes nothing"


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits).item() == 1
    # top_k=1 and a tiny top_p both leave only the argmax
    assert {sample_next_token(logits, do_sample=True, top_k=1, generator=g).item() for _ in range(20)} == {1}
    assert {sample_next_token(logits, do_sample=True, top_p=0.01, generator=g).item() for _ in range(20)} == {
        1
    }
    # top_k=2 never leaves the two best
    assert {sample_next_token(logits, do_sample=True, top_k=2, generator=g).item() for _ in range(50)} == {
        1,
        2,
    }
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, do_sample=True, temperature=0.0)


def test_stop_criteria_rows():
    stop = StopCriteria(2, eos_token_id=[5, 6], stop_strings="7 8", tokenizer=_DigitTokenizer())
    assert not stop.update(torch.tensor([[1], [5]]))
    assert stop.finished == [False, True]
    assert stop.update(torch.tensor([[7, 8], [5, 0]]))
    with pytest.raises(ValueError, match="tokenizer"):
        StopCriteria(1, stop_strings=["x"])
