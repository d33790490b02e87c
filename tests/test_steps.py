"""Decoding steps (`apb.steps`): graphed steps compute what eager steps compute.

On the CPU, `GraphedSteps(record_graph=False)` runs every step from the graph's input tensors (the token
ids, the position, the store slot and the count of valid entries), which is what a CUDA graph replays;
it must give eager generation's tokens and logits. On a GPU the graph is recorded and replayed for real.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, steps_from_graph_inputs, tiny_model

import apb.attention
import apb.model
from apb import APBConfig, APBModel
from apb.comm import Communicator
from apb.steps import GraphedSteps

VOCAB = 128  # tiny_model's vocab_size

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _ids(seed: int, *shape: int, device="cpu") -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("num_hosts", [1, 3])
def test_steps_from_device_tensors_match_eager_steps(monkeypatch, family, num_hosts):
    """Greedy and sampled, a batch of two, hosts 1 and 3, exact and sparse: same tokens, same logits. The
    room kept after the last host's store, and what it grows by, are cut to 2 tokens, so the steps grow it
    (`reserve`) every other token."""
    monkeypatch.setattr(apb.model, "DECODE_ROOM", 2)
    monkeypatch.setattr(apb.attention, "DECODE_ROOM", 2)
    apbm = APBModel(tiny_model(family))
    context, query = _ids(0, 2, 61), _ids(1, 2, 5)
    cases = [
        dict(config=APBConfig.exact()),
        dict(config=APBConfig(selector="random", anchor_len=8, passing_len=6, query_in_anchor=False)),
        dict(config=APBConfig.exact(), do_sample=True, temperature=0.8, top_k=20, seed=3),
    ]
    eager = [
        apbm.generate(context, query, num_hosts=num_hosts, max_new_tokens=9, return_logits=True, **case)
        for case in cases
    ]
    made = steps_from_graph_inputs(monkeypatch)
    for case, (ids, logits) in zip(cases, eager, strict=True):
        got_ids, got_logits = apbm.generate(
            context, query, num_hosts=num_hosts, max_new_tokens=9, return_logits=True, **case
        )
        assert torch.equal(got_ids, ids)
        torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
    assert len(made) == len(cases)


def test_static_steps_write_the_store_where_eager_steps_do(monkeypatch):
    """After the same tokens, the last host's store holds the same K/V in the same entries, and the state's
    count of appended tokens agrees (an eager step after graphed ones writes after them)."""
    apbm = APBModel(tiny_model("llama"))
    context, query = _ids(0, 1, 40), _ids(1, 1, 4)
    config = APBConfig.exact()
    stores = {}
    for static in (False, True):
        decode = apbm._prefill_context(
            context, query, config, apb.model.make_comm(2, apbm.device), query=query, max_new_tokens=6
        )
        apbm._run_tokens(decode, query, start=context.shape[1])
        steps = apbm._steps(decode, batch=1, max_steps=5, graphed=False)
        if static:
            steps = GraphedSteps(
                steps._step, decode, batch=1, max_steps=5, device=apbm.device, record_graph=False
            )
        for i, token in enumerate(_ids(2, 5).tolist()):
            steps(torch.tensor([token]), context.shape[1] + query.shape[1] + i)
        steps.close()
        assert decode.slot is None and decode.valid is None  # eager from here on
        assert decode.filled == decode.context_len + query.shape[1] + 5
        stores[static] = [(k[:, :, : decode.filled], v[:, :, : decode.filled]) for k, v in decode.stores[1]]
    for (k0, v0), (k1, v1) in zip(stores[False], stores[True], strict=True):
        torch.testing.assert_close(k1, k0, rtol=0, atol=0)
        torch.testing.assert_close(v1, v0, rtol=0, atol=0)


def test_the_store_grows_by_its_room_not_by_max_new_tokens():
    """A generous max_new_tokens reserves nothing up front: the store grows by `room` tokens when full."""
    apbm = APBModel(tiny_model("llama"))
    context, query = _ids(0, 1, 40), _ids(1, 1, 4)
    decode = apbm._prefill_context(
        context, query, APBConfig.exact(), apb.model.make_comm(2, apbm.device), query=query, max_new_tokens=3
    )
    apbm._run_tokens(decode, query, start=context.shape[1])
    step = apbm._steps(decode, batch=1, max_steps=1, graphed=False)._step
    steps = GraphedSteps(
        step, decode, batch=1, max_steps=100_000, device=apbm.device, record_graph=False, room=3
    )
    capacities = []
    for i in range(9):
        steps(torch.tensor([i]), context.shape[1] + query.shape[1] + i)
        capacities.append(decode.stores[1][0][0].shape[2])
    steps.close()
    start = decode.context_len + query.shape[1]
    # room after the prefill: the query and min(3, DECODE_ROOM) tokens; then 3 more each time it is full
    assert capacities == [start + 3] * 3 + [start + 6] * 3 + [start + 9] * 3


def test_cuda_graphs_argument_is_checked_before_the_prefill(monkeypatch):
    apbm = APBModel(tiny_model("llama"))
    monkeypatch.setattr(APBModel, "_prefill_context", lambda *a, **k: pytest.fail("prefill ran"))
    with pytest.raises(TypeError, match=r"cuda_graphs must be True, False or None \(auto\), got 'yes'"):
        apbm.generate(_ids(0, 20), _ids(1, 4), cuda_graphs="yes")
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a GPU, but it is on the CPU"):
        apbm.generate(_ids(0, 20), _ids(1, 4), cuda_graphs=True)


def test_graphed_steps_refuse_the_cpu_when_recording():
    apbm = APBModel(tiny_model("llama"))
    decode = apbm._prefill_context(
        _ids(0, 1, 20), _ids(1, 1, 4), APBConfig.exact(), apb.model.make_comm(1, "cpu")
    )
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        GraphedSteps(lambda ids, pos: ids, decode, batch=1, max_steps=3, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ GPU


def _count_replays(monkeypatch) -> list[int]:
    replays = [0]
    replay = torch.cuda.CUDAGraph.replay

    def counted(self):
        replays[0] += 1
        return replay(self)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)
    return replays


@pytest.mark.single_gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_hosts", [1, 4])
@pytest.mark.parametrize(("room", "replays"), [(None, 12 - 2), (3, 7)])
def test_cuda_graph_steps_match_eager_steps_on_the_gpu(monkeypatch, caplog, dtype, num_hosts, room, replays):
    """Recorded, replayed per token: the eager steps' tokens and logits (bf16 runs the Triton kernels, fp32
    the torch reference, both inside the graph); no fallback warning. The room after the prefill's store is
    cut to 3 tokens, so the steps grow it. Growing by the default room, once: one recording, then a replay
    per step. Growing by 3 tokens at a time: a new recording at each growth (steps 1, 4, 7 and 10 of 11)."""
    monkeypatch.setattr(apb.model, "DECODE_ROOM", 3)
    if room is not None:
        monkeypatch.setattr(apb.attention, "DECODE_ROOM", room)
    apbm = APBModel(tiny_model("llama").to("cuda", dtype))
    context, query = _ids(0, 2, 300, device="cuda"), _ids(1, 2, 6, device="cuda")
    config = APBConfig(selector="random", anchor_len=32, passing_len=16, query_in_anchor=False)
    kwargs = dict(config=config, num_hosts=num_hosts, max_new_tokens=12, return_logits=True)
    ids, logits = apbm.generate(context, query, cuda_graphs=False, **kwargs)
    replayed = _count_replays(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="apb.steps"):
        got_ids, got_logits = apbm.generate(context, query, **kwargs)  # auto: on for a GPU model
    assert not caplog.records
    assert replayed[0] == replays
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got_logits.float(), logits.float(), rtol=tol, atol=tol)
    assert torch.equal(got_ids, ids)


@pytest.mark.single_gpu
@needs_cuda
@pytest.mark.parametrize("family", ["qwen3", "mistral", "qwen2"])
def test_cuda_graph_steps_of_every_family_sample_as_eager_steps_do(family):
    """The other families' decoders (Qwen3's q/k norms included; Llama: the test above) record and replay;
    sampling, seeded, draws the same tokens as eager steps (the draw itself runs outside the graph)."""
    apbm = APBModel(tiny_model(family).to("cuda"))
    context, query = _ids(0, 1, 200, device="cuda"), _ids(1, 1, 5, device="cuda")
    kwargs = dict(config=APBConfig.exact(), num_hosts=3, max_new_tokens=10, do_sample=True, top_p=0.9, seed=5)
    expected = apbm.generate(context, query, cuda_graphs=False, **kwargs)
    assert torch.equal(apbm.generate(context, query, cuda_graphs=True, **kwargs), expected)


@pytest.mark.single_gpu
@needs_cuda
def test_a_step_that_cannot_be_recorded_falls_back_to_eager_steps(monkeypatch, caplog):
    """A model whose forward syncs with the CPU (here: a hook reading a value) cannot be recorded: one
    warning, then the same tokens as eager steps."""
    apbm = APBModel(tiny_model("llama").to("cuda"))
    context, query = _ids(0, 1, 100, device="cuda"), _ids(1, 1, 4, device="cuda")
    kwargs = dict(config=APBConfig.exact(), num_hosts=2, max_new_tokens=6)
    expected = apbm.generate(context, query, cuda_graphs=False, **kwargs)
    apbm.model.model.norm.register_forward_hook(lambda module, args, out: float(out[0, 0, 0]) and None)
    with caplog.at_level(logging.WARNING, logger="apb.steps"):
        got = apbm.generate(context, query, cuda_graphs=True, **kwargs)
    assert torch.equal(got, expected)
    assert len(caplog.records) == 1 and "could not be recorded as a CUDA graph" in caplog.records[0].message
    torch.randn(4, device="cuda")  # the failed capture left the random generators usable
    assert torch.equal(apbm.generate(context, query, cuda_graphs=True, **kwargs), expected)


class _ProcessGroupComm(Communicator):
    """Stands for a `DistributedComm` over a process group with this backend (no group needed)."""

    def __init__(self, backend: str):
        self.backend = backend


def test_cuda_graphs_argument_under_torch_distributed_on_the_cpu():
    apbm = APBModel(tiny_model("llama"))
    assert apbm._graphed_steps(None, _ProcessGroupComm("gloo")) is False
    with pytest.raises(ValueError, match="on the CPU"):
        apbm._graphed_steps(True, _ProcessGroupComm("gloo"))


@pytest.mark.single_gpu
@needs_cuda
def test_cuda_graphs_under_torch_distributed_need_nccl_and_asking():
    """Auto stays eager under torch.distributed; True is taken with NCCL and refused with gloo."""
    apbm = APBModel(tiny_model("llama").to("cuda"))
    assert apbm._graphed_steps(None, _ProcessGroupComm("nccl")) is False
    assert apbm._graphed_steps(True, _ProcessGroupComm("nccl")) is True
    with pytest.raises(ValueError, match="needs the NCCL backend"):
        apbm._graphed_steps(True, _ProcessGroupComm("gloo"))


@pytest.mark.single_gpu
@needs_cuda
def test_cuda_graph_steps_record_nccl_collectives(monkeypatch, caplog):
    """One rank of an NCCL process group: the step's collectives (the gather of partials) are recorded
    with it and replayed; recorded again at each growth of the store (room 3); eager steps' tokens."""
    monkeypatch.setattr(apb.model, "DECODE_ROOM", 3)
    monkeypatch.setattr(apb.attention, "DECODE_ROOM", 3)
    apbm = APBModel(tiny_model("llama").to("cuda"))
    context, query = _ids(0, 1, 120, device="cuda"), _ids(1, 1, 5, device="cuda")
    kwargs = dict(config=APBConfig.exact(), max_new_tokens=12, return_logits=True)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ids, logits = apbm.generate(context, query, cuda_graphs=False, **kwargs)
        replayed = _count_replays(monkeypatch)
        with caplog.at_level(logging.WARNING, logger="apb.steps"):
            got_ids, got_logits = apbm.generate(context, query, cuda_graphs=True, **kwargs)
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    assert not caplog.records
    assert replayed[0] == 7  # 11 steps, recorded at steps 1, 4, 7 and 10
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_ids, ids)


def test_generation_benchmark_runs_on_the_cpu(tmp_path):
    """scripts/bench_generate.py --tiny: transformers' loop and APB's eager steps timed, the graphed steps
    recorded as skipped without a GPU, the JSON's command without the output path."""
    import json

    from apb.bench.generate import main

    path = tmp_path / "gen.json"
    argv = ["--tiny", "--repeats", "1", "--methods", "full", "apb-eager", "apb-graphs", "--json", str(path)]
    main([*argv, "--plot", str(tmp_path / "run.png")])
    results = json.loads(path.read_text())
    runs = {run["method"]: run for run in results["runs"]}
    for method in ("full", "apb-eager"):
        assert runs[method]["tokens"] == 8
        assert runs[method]["step_ms_median"] > 0 and runs[method]["first_token_s"] > 0
    assert runs["apb-graphs"]["status"] == "skipped: CUDA graphs need a GPU"
    assert "--json" not in results["command"] and str(tmp_path) not in results["command"]
    assert "--plot" not in results["command"] and str(tmp_path) not in json.dumps(results["settings"])
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
    # the plot from saved results: one file or several
    png = tmp_path / "gen.png"
    main(["--from-json", str(path), str(path), "--plot", str(png)])
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["--from-json", str(path)])  # no --plot
