"""`APBModel.recording(regions=True)`: the timing regions the prefill marks itself (the benchmarks'
instrumentation hook), on a tiny CPU model with simulated hosts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from apb import APBConfig, APBModel, build_heads
from apb.attention import PREFILL_REGIONS


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def apbm() -> APBModel:
    model = tiny_model("llama")
    return APBModel(model, build_heads(model, hidden_size=16))


def test_regions_mark_every_step_of_every_host_and_layer(apbm):
    num_layers, num_hosts = apbm.model.config.num_hidden_layers, 3
    config = APBConfig(anchor_len=8, passing_len=5)  # heads choose; the last host passes nothing
    with apbm.recording(regions=True) as record:
        apbm.prefill(_ids(0, 120), _ids(1, 3), config=config, num_hosts=num_hosts)
    names = {(r.host, r.name) for r in record.regions}
    assert {name for _, name in names} == set(PREFILL_REGIONS)
    for host in range(num_hosts):
        selects = host < num_hosts - 1  # the last host's block is read by nobody
        expected = {"step", "exchange", "attention"} | ({"score", "top_k", "gather"} if selects else set())
        assert {name for h, name in names if h == host} == expected
        for name in expected:  # at the last layer a host only stores its K/V: a step, no other region
            layers = [r.layer for r in record.regions if r.host == host and r.name == name]
            assert layers == list(range(num_layers if name == "step" else num_layers - 1)), (host, name)
    assert all(isinstance(r.start, float) and r.end >= r.start for r in record.regions)
    # every region of a layer lies inside that layer's step, which lies inside the host's prefill
    for step in (r for r in record.regions if r.name == "step"):
        inner = [r for r in record.regions if (r.host, r.layer) == (step.host, step.layer) and r is not step]
        assert all(step.start <= r.start <= r.end <= step.end for r in inner)
    totals = record.region_times()
    assert set(totals) == set(range(num_hosts))
    for host, seconds in totals.items():
        parts = sum(v for k, v in seconds.items() if k != "step")
        assert 0 < parts <= seconds["step"] <= record.host_seconds[host]
    # the exchange regions are the exchange marks
    assert [(r.start, r.end) for r in record.regions if r.name == "exchange"] == record.exchange_marks


def test_regions_use_the_recording_clock(apbm):
    ticks = iter(range(100_000))
    with apbm.recording(clock=lambda: next(ticks), regions=True) as record:
        apbm.prefill(_ids(2, 60), _ids(3, 2), config=APBConfig(anchor_len=4, passing_len=3), num_hosts=2)
    marks = [mark for r in record.regions for mark in (r.start, r.end)]
    assert all(isinstance(m, int) for m in marks) and len(set(marks)) == len(marks)  # one tick per mark
    elapsed = record.region_times(lambda start, end: 10 * (end - start))
    assert all(v > 0 and v % 10 == 0 for seconds in elapsed.values() for v in seconds.values())


def test_no_regions_unless_asked(apbm):
    calls = []

    def clock():
        calls.append(1)
        return 0.0

    config = APBConfig(anchor_len=8, passing_len=5)
    with apbm.recording(clock=clock) as record:
        apbm.prefill(_ids(0, 120), _ids(1, 3), config=config, num_hosts=3)
    assert record.regions is None
    assert len(calls) == 2 * len(record.exchange_marks)  # the exchange marks only
    with pytest.raises(ValueError, match="recording\\(regions=True\\)"):
        record.region_times()
    # outside a recording the prefill marks nothing and its logits are the same
    with apbm.recording(regions=True):
        timed = apbm.prefill(_ids(0, 120), _ids(1, 3), config=config, num_hosts=3)
    plain = apbm.prefill(_ids(0, 120), _ids(1, 3), config=config, num_hosts=3)
    assert torch.equal(timed, plain)
