"""End to end on the CPU: `deepspeed --num_gpus 2 train/retain.py` (2 gloo ranks), export, kill-and-resume.

Slow (tens of seconds each), still run in CI. The DeepSpeed CPU accelerator JIT-builds its shared-memory
comm op once (~60 s); TORCH_EXTENSIONS_DIR points at a persistent cache so later runs reuse it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from apb.train.config import load_config
from conftest import clean_env, free_port, kill_group, run_or_fail
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import apb

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.slow

TIMEOUT_S = 600  # a tiny two-rank run takes ~30 s once DeepSpeed's CPU op is built (~70 s, first run only)


def _env() -> dict[str, str]:
    env = clean_env(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")  # the CPU path, also on a GPU machine
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "apb-retain" / "torch_extensions"))
    return env


def _losses(run: Path) -> dict[int, float]:
    """step -> loss; a resumed run rewrites the steps after its checkpoint, the last record wins."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def _tiny_base():
    config = load_config(TINY)
    kwargs = dict(config.model.from_config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))


def _two_ranks(run: Path, *sets: str) -> tuple[subprocess.CompletedProcess, str]:
    """`deepspeed --num_gpus 2 train/retain.py` on the tiny config (CPU ranks); returns the process and its log."""
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",  # the launcher's default, 29500, may belong to another job on this machine
        str(free_port()),
        str(ROOT / "train" / "retain.py"),
    ]
    cmd += ["--config", str(TINY), "--set", f"output_dir={run}", "--set", "logging.tqdm=false"]
    for item in sets:
        cmd += ["--set", item]
    proc = run_or_fail(cmd, cwd=ROOT, env=_env(), timeout_s=TIMEOUT_S)
    return proc, proc.stdout + proc.stderr


def test_deepspeed_two_ranks_trains_and_exports(tmp_path):
    run = tmp_path / "run"
    proc, log = _two_ranks(run)
    assert proc.returncode == 0, log[-4000:]
    assert log.count("exits successfully") == 2, log[-4000:]
    assert "terminate called" not in log

    losses = _losses(run)
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < 0.9 * first, (first, last)
    assert list((run / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events written"
    assert (run / "config.yaml").is_file() and (run / "deepspeed.json").is_file()
    assert len(list((run / "checkpoints").glob("step_*"))) == 2  # keep_last: 2

    adapter = run / "adapter"
    heads, adapter_config = apb.load_heads(_tiny_base(), adapter)
    assert adapter_config.training["steps"] == 30 and adapter_config.apb["query_in_anchor"] is True
    assert adapter_config.training["tokens_seen"] > 0 and "final loss" in (adapter / "README.md").read_text()
    final = load_file(str(run / "checkpoints" / "step_00000030" / "heads.safetensors"))
    for name, tensor in heads.state_dict().items():
        torch.testing.assert_close(tensor, final[name], rtol=0, atol=0)

    # Export from an earlier checkpoint with the script.
    out = tmp_path / "adapter20"
    export = [sys.executable, str(ROOT / "scripts" / "export_adapter.py"), str(run)]
    export += ["--checkpoint", "step_00000020", "--out", str(out)]
    proc = run_or_fail(export, cwd=ROOT, env=_env(), timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heads20, config20 = apb.load_heads(_tiny_base(), out)
    assert config20.training["steps"] == 20
    assert not torch.equal(heads20.layers[0].fc1.weight, heads.layers[0].fc1.weight)


def test_zero3_shards_the_base_over_two_ranks(tmp_path):
    run = tmp_path / "run"
    proc, log = _two_ranks(run, "deepspeed.zero_stage=3", "optim.max_steps=4")
    assert proc.returncode == 0, log[-4000:]
    assert log.count("exits successfully") == 2 and "terminate called" not in log
    match = re.search(r"base \(2 layers, ([\d.]+)M params, ([\d.]+)M held by this rank\)", log)
    assert match, log[-4000:]
    total, local = float(match.group(1)), float(match.group(2))
    assert local < 0.6 * total  # ZeRO-3: each rank holds about half of the frozen base
    heads, config = apb.load_heads(_tiny_base(), run / "adapter")  # gathered from the shards for export
    assert config.training["steps"] == 4 and heads.layers[0].fc1.weight.abs().sum() > 0


def test_kill_and_resume_continues_the_same_loss_curve(tmp_path):
    def command(run: Path) -> list[str]:
        cmd = [sys.executable, str(ROOT / "train" / "retain.py"), "--config", str(TINY)]
        for item in (f"output_dir={run}", "optim.max_steps=24", "checkpoint.every=6", "logging.tqdm=false"):
            cmd += ["--set", item]
        return cmd

    straight = tmp_path / "straight"
    proc = run_or_fail(command(straight), cwd=ROOT, env=_env(), timeout_s=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    victim = subprocess.Popen(
        command(killed),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step_00000012":
            break
        time.sleep(0.02)
    kill_group(victim)  # our own process group (start_new_session)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    steps_before = max(_losses(killed))
    assert 12 <= steps_before < 24

    proc = run_or_fail(command(killed), cwd=ROOT, env=_env(), timeout_s=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr

    expected, resumed = _losses(straight), _losses(killed)
    assert sorted(resumed) == sorted(expected) == list(range(1, 25))
    # Same data order, same optimizer/scheduler/RNG state, same fp32 CPU kernels: the curves agree to
    # fp32 rounding (observed: identical); 1e-6 relative leaves room for a reordered reduction.
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step
