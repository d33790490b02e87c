"""Shared fixtures: tiny random-weight models of every supported family, built from configs; helpers
for tests that start processes (a free port, a run that fails with a message instead of hanging)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=4096,
)


def tiny_config(family: str, **overrides):
    """A 2-layer, 4-query/2-KV-head config of `family`; fp32, eager-safe, no sliding window."""
    kwargs = {**_COMMON, **overrides}
    if family == "llama":
        return LlamaConfig(**kwargs)
    if family == "qwen2":
        return Qwen2Config(**kwargs, use_sliding_window=False)
    if family == "qwen3":
        return Qwen3Config(**kwargs, head_dim=16, use_sliding_window=False)
    if family == "mistral":
        return MistralConfig(**kwargs, sliding_window=None)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="sdpa")
    return model.eval()


def dear_attention_host_times(calls: list, factor: float = 3.0) -> Callable:
    """A stand-in for `APBModel.host_times`, to monkeypatch onto the class: exact times of a device on which
    an attention FLOP costs `factor` linear ones (plus 1 ms a host), for the equal-split plans host_times
    would time. Each call's (num_context, num_hosts, num_query, config.backend) is appended to `calls`.
    (A tiny model's real CPU timings are refused by the fit as noise.)"""
    from apb import HostPlan

    def host_times(self, num_context, num_hosts=None, *, num_query=64, config=None, **kwargs):
        calls.append((num_context, num_hosts, num_query, config.backend))
        cost, samples = self.cost_model, []
        for n in (num_context, num_context // 2):
            plan = HostPlan(dataclasses.replace(config, split="equal"), n, num_query, num_hosts)
            samples += [
                (t, p, 1e-3 + cost.flops_per_token * t / 1e9 + factor * cost.flops_per_pair * p / 1e9)
                for t, p in plan.work()
            ]
        return samples

    return host_times


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@contextmanager
def script_module(path: str | Path) -> Iterator[ModuleType]:
    """A script file (scripts/x.py, train/retain.py) imported as a module for a test.

    It is registered in sys.modules under ``<stem>_script`` (dataclasses look their module up by name),
    with its folder first on sys.path (scripts import their neighbours); both are undone on exit.
    """
    path = Path(path)
    folder = str(path.parent)
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(folder)


# Variables of an enclosing launcher (torchrun, deepspeed, a SLURM job) that would make a child process
# join that launcher's group or port instead of its own.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for a test's own process group: a fixed port
    such as 29500 fails or hangs when another job on the machine holds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without launcher variables, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(overrides)
    return env


def run_or_fail(cmd: list[str], *, timeout_s: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, **kwargs)` in a session of its own; past
    `timeout_s` the whole process group (a launcher and its ranks) is killed and the test fails with the
    command and the end of its output, instead of hanging or leaving ranks behind."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(map(str, cmd))} did not finish in {timeout_s:.0f} s (a hang?); "
            f"last output:\n{(out + err)[-3000:]}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of `proc` (started with start_new_session=True, not yet reaped, so the
    group id is still ours); quiet if the group is gone."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_under_interpreter(script: str, *args: str, cwd: str | Path, timeout_s: float = 300) -> None:
    """Run `script` (python -c) with TRITON_INTERPRET=1 in `cwd`, a folder outside the checkout: from the
    repo root the top-level `kernels/` folder would import as a package of its own. Fails the test with
    the end of stderr when the script fails."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = run_or_fail([sys.executable, "-c", script, *args], timeout_s=timeout_s, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]


def steps_from_graph_inputs(monkeypatch: pytest.MonkeyPatch) -> list:
    """`APBModel.generate`'s decoding steps become `GraphedSteps(record_graph=False)` on any device: every
    step runs eagerly from the graph's input tensors, which is what a replay computes. Returns the
    `GraphedSteps` made, in order."""
    import apb.model
    from apb.steps import GraphedSteps

    made: list[GraphedSteps] = []

    def make(*args, **kwargs):
        made.append(GraphedSteps(*args, **{**kwargs, "record_graph": False}))
        return made[-1]

    monkeypatch.setattr(apb.model, "GraphedSteps", make)
    monkeypatch.setattr(apb.model.APBModel, "_graphed_steps", lambda self, cuda_graphs, comm: True)
    return made
