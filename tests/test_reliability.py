"""Issue 14, the training side: nothing run from a run folder, nothing lost, nothing silently wrong.

- resume reads no pickle: DeepSpeed's files through `torch.load(weights_only=True)` (ZeRO 0, 2, 3),
  the project's own state as safetensors/JSON; a payload planted in every file of a checkpoint never runs;
- checkpoints are atomic; a damaged latest one is reported by file name and the one before is used;
  checkpoints none of which is complete stop the run instead of a silent restart over them;
- a rerun with a changed config is checked before anything in output_dir is written;
- a stale JIT build lock (a run killed while building DeepSpeed's CPU op) is removed, a live one is
  waited for with a bound;
- bad inputs get one ValueError naming the file/key/line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import clean_env, run_or_fail, script_module, tiny_model
from safetensors.torch import save_file

from apb.adapter import WEIGHTS_NAME, load_heads, save_adapter
from apb.heads import build_heads

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TIMEOUT_S = 300  # a tiny CPU run takes ~10 s once DeepSpeed's op is built; the build itself ~70 s


class Payload:
    """Unpickling this writes its marker file: what a planted checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "payload ran"))


def _plant(path: Path, marker: Path) -> None:
    """Replace `path` with a torch.save'd pickle whose loading runs the payload."""
    torch.save({"state": Payload(str(marker)), "weights": torch.zeros(2)}, path)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    # single processes: without launcher variables they take a free port (init_distributed)
    env = clean_env(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return run_or_fail(cmd, cwd=ROOT, env=env, timeout_s=TIMEOUT_S)


# ---------------------------------------------------------------------------------------- bad inputs


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    from apb.train.config import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: runs/x\nmodel:\n  name_or_path: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml line \d+.*not valid YAML"):
        load_config(bad)


def test_warmup_longer_than_the_run_is_refused(tmp_path):
    from apb.train.config import load_config

    with pytest.raises(ValueError, match=r"optim\.warmup_steps: 50 is more than optim\.max_steps \(30\)"):
        load_config(TINY, {"optim.warmup_steps": 50, "output_dir": str(tmp_path)})


@pytest.mark.parametrize(
    ("key", "value"),
    [("model.name_or_path", "./no/such/model"), ("model.tokenizer", "/nowhere/tokenizer")],
)
def test_dry_run_catches_a_model_or_tokenizer_path_that_does_not_exist(tmp_path, capsys, key, value):
    data = yaml.safe_load(TINY.read_text())
    data["output_dir"] = str(tmp_path / "run")
    if key == "model.name_or_path":
        data["model"] = {"name_or_path": value}
    else:
        data["model"]["tokenizer"] = value
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    with script_module(ROOT / "train" / "retain.py") as retain:
        assert retain.main(["--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert key in err and value in err and "not an existing file or folder" in err


def test_a_plausible_hub_id_passes_the_dry_run(tmp_path, capsys):
    from apb.train.config import load_config
    from apb.train.trainer import check_model_paths

    data = yaml.safe_load(TINY.read_text())
    data["model"] = {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    data["output_dir"] = str(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    check_model_paths(load_config(config))  # not looked up: the dry run stays offline


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("empty.jsonl", "\n  \n", r"empty\.jsonl is empty"),
        ("broken.jsonl", '{"context": "a", "question": "b", "answer": "c"}\n{"context": "a",\n', r"line 2"),
        (
            "list.jsonl",
            '{"context": "a", "question": "b", "answer": "c"}\n\n[1, 2]\n',
            r"line 3.*JSON object",
        ),
        ("broken.json", '[\n  {"context": "a"},\n  {oops}\n]\n', r"broken\.json: line 3"),
    ],
)
def test_empty_or_malformed_json_names_the_file_and_line(tmp_path, name, text, match):
    from apb.data.sources import load_local

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_local(path)


def test_editing_a_haystack_file_changes_the_sample_fingerprint(tmp_path):
    from apb.train import trainer
    from apb.train.config import load_config

    texts = tmp_path / "texts"
    texts.mkdir()
    play = texts / "play.txt"
    play.write_text("To be, or not to be, that is the question.\n" * 50)
    config = load_config(TINY, {"output_dir": str(tmp_path / "run"), "data.sources[0].haystack": str(texts)})
    tokenizer = trainer.build_tokenizer(config)
    before = trainer.data_fingerprint(config, tokenizer)
    stat = play.stat()
    play.write_text("To be, or not to be, that is the answer...\n" * 50)  # same size
    os.utime(play, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same time (cp -p, a restore)
    assert play.stat().st_size == stat.st_size
    assert trainer.data_fingerprint(config, tokenizer) != before
    (texts / "more.txt").write_text("Another act.\n")
    assert len({before, trainer.data_fingerprint(config, tokenizer)}) == 2


# ------------------------------------------------------------------------------------------- adapter


@pytest.fixture
def adapter(tmp_path):
    model = tiny_model("llama")
    heads = build_heads(model, hidden_size=16)
    return model, save_adapter(heads, tmp_path / "adapter")


def test_truncated_adapter_weights_name_their_path(adapter):
    model, folder = adapter
    weights = folder / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file.*truncated"):
        load_heads(model, folder)


def test_nan_or_inf_in_adapter_weights_is_refused_naming_the_tensor(adapter):
    model, folder = adapter
    from safetensors.torch import load_file

    state = load_file(str(folder / WEIGHTS_NAME))
    state["layers.1.fc2.weight"][0, 3] = float("nan")
    state["layers.1.fc2.weight"][1, 0] = float("inf")
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})  # same size as before
    with pytest.raises(ValueError, match=r"tensor layers\.1\.fc2\.weight holds 2 NaN/inf"):
        load_heads(model, folder)


# ------------------------------------------------------------------------------ checkpoints, no DS


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint folder with files and a manifest as `save_checkpoint` writes them (no engine)."""
    from apb.train.checkpoint import FORMAT, STATE_NAME, _manifest, save_rng_file

    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((4,), float(step))}}, folder / "mp_rank_00_model_states.pt")
    save_rng_file(folder / "rng_rank0.safetensors")
    state = {"format": FORMAT, "step": step, "tokens_seen": step, "files": _manifest(folder)}
    (folder / STATE_NAME).write_text(json.dumps(state))
    return folder


def test_rng_states_round_trip_through_safetensors(tmp_path):
    import random

    import numpy as np
    from apb.train.checkpoint import load_rng_file, save_rng_file

    path = save_rng_file(tmp_path / "rng.safetensors")
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    torch.rand(5), random.random(), np.random.rand(7)  # move every generator on
    load_rng_file(path)
    got = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and (got[2] == expected[2]).all()
    path.write_bytes(b"\x80\x04not safetensors")
    from apb.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="rng.safetensors: not a readable RNG state"):
        load_rng_file(path)


def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    from apb.train.checkpoint import checkpoint_root, find_resume_checkpoint

    root = checkpoint_root(tmp_path)
    _fake_checkpoint(root, 2)
    newest = _fake_checkpoint(root, 4)
    (root / ".tmp_step_00000006").mkdir()  # a run killed while saving: never a checkpoint
    damaged = newest / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path) == root / "step_00000002"
    assert (
        str(damaged) in caplog.text
        and "truncated" in caplog.text
        and "resuming from step_00000002" in caplog.text
    )

    same_size = root / "step_00000002" / "rng_rank0.safetensors"
    data = bytearray(same_size.read_bytes())
    data[-1] ^= 0xFF
    same_size.write_bytes(bytes(data))
    from apb.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="none is complete") as err:
        find_resume_checkpoint(tmp_path)
    assert str(damaged) in str(err.value) and "SHA-256" in str(err.value)


def test_no_checkpoints_is_a_fresh_run_and_a_planted_extra_file_is_damage(tmp_path):
    from apb.train.checkpoint import CheckpointError, checkpoint_root, find_resume_checkpoint

    assert find_resume_checkpoint(tmp_path) is None
    folder = _fake_checkpoint(checkpoint_root(tmp_path), 2)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    with pytest.raises(CheckpointError, match="optim_states.pt: not written by this checkpoint"):
        find_resume_checkpoint(tmp_path)


def test_a_checkpoint_from_before_manifests_is_used_with_a_warning(tmp_path, caplog):
    from apb.train.checkpoint import STATE_NAME, checkpoint_root, find_resume_checkpoint

    folder = checkpoint_root(tmp_path) / "step_00000010"
    folder.mkdir(parents=True)
    (folder / STATE_NAME).write_text(json.dumps({"step": 10, "tokens_seen": 5}))
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path) == folder
    assert "rng_rank*.pt (pickle) files are not read" in caplog.text


def test_export_script_names_a_damaged_checkpoint_file(tmp_path, capsys):
    from apb.train.checkpoint import checkpoint_root

    run = _saved_run(tmp_path)
    folder = _fake_checkpoint(checkpoint_root(run), 2)
    damaged = folder / "rng_rank0.safetensors"
    damaged.write_bytes(b"")
    with script_module(ROOT / "scripts" / "export_adapter.py") as export:
        assert export.main([str(run), "--checkpoint", "step_00000002"]) == 2
        assert export.main([str(run)]) == 2  # the newest complete one: there is none
    err = capsys.readouterr().err
    assert f"error: {damaged}: 0 bytes" in err and "no complete checkpoint" in err


def test_safe_torch_load_never_runs_a_payload(tmp_path):
    from apb.train.checkpoint import CheckpointError, safe_torch_load

    marker = tmp_path / "marker"
    planted = tmp_path / "mp_rank_00_model_states.pt"
    _plant(planted, marker)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: refused to load"):
        safe_torch_load(planted)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(b"cposix\nsystem\n(S'true'\ntR.")  # a bare (non-zip) pickle running a command
    with pytest.raises(CheckpointError, match="raw.pt"):
        safe_torch_load(raw)


# --------------------------------------------------------------------------------------- rerun safety


def _saved_run(tmp_path) -> Path:
    from apb.train.config import load_config, save_resolved

    run = tmp_path / "run"
    save_resolved(load_config(TINY, {"output_dir": str(run)}), run)
    return run


def test_rerun_refuses_what_resume_cannot_honour_naming_every_key(tmp_path):
    from apb.train.config import check_rerun, load_config

    run = _saved_run(tmp_path)
    changed = load_config(
        TINY,
        {
            "output_dir": str(run),
            "heads.hidden_size": 32,
            "data.sources[0].num_samples": 10,
            "seed": 3,
            "optim.lr": 1e-3,
        },
    )
    with pytest.raises(ValueError, match="cannot honour") as err:
        check_rerun(changed)
    message = str(err.value)
    for line in ("heads.hidden_size: 64 -> 32", "data.sources[0].num_samples: 64 -> 10", "seed: 0 -> 3"):
        assert line in message
    assert "optim.lr" not in message


def test_rerun_returns_the_changes_resume_applies_and_ignores_free_ones(tmp_path):
    from apb.train.config import check_rerun, load_config

    run = _saved_run(tmp_path)
    changed = load_config(
        TINY,
        {
            "output_dir": str(run),
            "optim.max_steps": 40,
            "optim.lr": 1e-3,
            "logging.every": 5,
            "checkpoint.keep_last": 4,
            "data.sources[0].workers": 2,
        },
    )
    assert check_rerun(changed) == {"optim.lr": (0.002, 0.001), "optim.max_steps": (30, 40)}
    assert check_rerun(load_config(TINY, {"output_dir": str(tmp_path / "new")})) == {}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["query_aware"] = saved["data"].pop("query_in_anchor")  # written before the rename
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert check_rerun(changed) == {"optim.lr": (0.002, 0.001), "optim.max_steps": (30, 40)}
    (run / "config.yaml").write_text("model: [broken\n")
    with pytest.raises(ValueError, match=r"run/config\.yaml line 2, column 1: not valid YAML"):
        check_rerun(changed)


# ---------------------------------------------------------------------------------------- JIT lock


def test_a_stale_build_lock_is_removed_and_a_live_one_waited_for_with_a_bound(tmp_path, caplog):
    import fcntl

    from apb.train.extensions import GUARD_NAME, build_guard, remove_stale_locks

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()  # what a run killed mid-build leaves
    holder = os.open(tmp_path / GUARD_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a live build elsewhere
    try:
        with (
            pytest.raises(
                RuntimeError, match=rf"waited 1 s for {tmp_path / GUARD_NAME}.*APB_JIT_LOCK_TIMEOUT"
            ),
            build_guard(tmp_path, timeout_s=1),
        ):
            pass
        assert lock.exists()  # a live holder's lock is not touched
    finally:
        os.close(holder)
    with caplog.at_level(logging.WARNING), build_guard(tmp_path, timeout_s=1) as guard:
        assert remove_stale_locks(tmp_path) == [lock]
        assert f"pid {os.getpid()}" in guard.read_text()
    assert not lock.exists() and "stale JIT build lock" in caplog.text


def test_the_default_extensions_folder_is_per_user_and_version(monkeypatch):
    import deepspeed
    from apb.train.extensions import default_extensions_dir, extensions_dir

    name = default_extensions_dir().name
    assert (
        f"torch{torch.__version__}".replace("+", "_") in name and f"deepspeed{deepspeed.__version__}" in name
    )
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert extensions_dir() == Path("/somewhere/else")  # the user's choice wins


@pytest.mark.slow
def test_a_run_killed_during_the_jit_build_does_not_hang_the_next(tmp_path):
    """The op's build folder with the lock a killed build leaves: loading it finishes (no rebuild)."""
    from apb.train.extensions import default_extensions_dir

    built = default_extensions_dir()
    load = "from apb.train.extensions import load_cpu_ops; load_cpu_ops()"
    if not list((built / "deepspeed_shm_comm").glob("*.so")):  # build it once (~70 s), as a run would
        env_cmd = [sys.executable, "-c", load]
        assert _run(env_cmd).returncode == 0
    folder = tmp_path / "ext"
    shutil.copytree(built / "deepspeed_shm_comm", folder / "deepspeed_shm_comm")
    (folder / "deepspeed_shm_comm" / "lock").touch()
    script = f"import logging, os; logging.basicConfig(); os.environ['TORCH_EXTENSIONS_DIR'] = {str(folder)!r}; {load}"
    proc = _run([sys.executable, "-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removing stale JIT build lock" in proc.stderr
    assert not (folder / "deepspeed_shm_comm" / "lock").exists()


# ------------------------------------------------------------------- DeepSpeed engines, one process

ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from apb.train.process_group import close_distributed, init_distributed
    from apb.train.checkpoint import (CheckpointError, STATE_NAME, _manifest, find_resume_checkpoint,
                                      load_checkpoint, save_checkpoint)
    import deepspeed

    stage, bf16, out, marker = int(sys.argv[1]), sys.argv[2] == "1", Path(sys.argv[3]), sys.argv[4]
    sys.path.insert(0, sys.argv[5])
    from test_reliability import Payload
    init_distributed()

    def engine(seed):
        torch.manual_seed(seed)
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "train_batch_size": 1, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
                  "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
        return deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config)[0]

    def train(e, steps):
        for i in range(steps):
            x = torch.randn(1, 8, dtype=torch.bfloat16 if bf16 else torch.float32)
            e.backward(e(x).float().square().sum())
            e.step()

    def params(e):
        return [p.detach().float().clone() for p in e.module.parameters()]

    first = engine(0)
    train(first, 3)
    save_checkpoint(first, out, 3, {"tokens_seen": 3}, keep_last=2)
    train(first, 2)
    after = params(first)

    second = engine(1)  # other initial weights, and the RNG moved on
    folder = find_resume_checkpoint(out)
    assert load_checkpoint(second, folder)["step"] == 3
    train(second, 2)  # the RNG state was restored too: the same inputs
    for a, b in zip(after, params(second)):
        assert torch.equal(a, b), (a, b)

    # An attacker who rewrites every file and the manifest: resuming refuses, nothing runs.
    for path in folder.iterdir():
        if path.name != STATE_NAME:
            torch.save({"x": Payload(marker)}, path)
    state = json.loads((folder / STATE_NAME).read_text())
    state["files"] = _manifest(folder)
    (folder / STATE_NAME).write_text(json.dumps(state))
    assert find_resume_checkpoint(out) == folder
    try:
        load_checkpoint(engine(2), folder)
    except CheckpointError as err:
        print("refused:", err)
    else:
        raise SystemExit("a planted checkpoint was loaded")
    close_distributed()
    print("OK")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "bf16"), [(0, False), (2, True), (3, False)])
def test_deepspeed_states_resume_exactly_without_pickle(tmp_path, stage, bf16):
    marker = tmp_path / "marker"
    cmd = [
        sys.executable,
        "-c",
        ENGINE_SCRIPT,
        str(stage),
        str(int(bf16)),
        str(tmp_path / "out"),
        str(marker),
    ]
    proc = _run([*cmd, str(Path(__file__).parent)])
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
    assert "refused:" in proc.stdout and "refused to load" in proc.stdout
    assert not marker.exists()


# ------------------------------------------------------------------------------ whole runs (retain.py)


def _retain(run: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train" / "retain.py"), "--config", str(TINY)]
    base = ("optim.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=3", "logging.tqdm=false")
    for item in (f"output_dir={run}", *base, *sets):
        cmd += ["--set", item]
    return _run(cmd)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 4-step tiny run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    proc = _retain(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resume_skips_a_damaged_latest_checkpoint_naming_the_file(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    damaged = run / "checkpoints" / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    proc = _retain(run)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert str(damaged) in log and "resuming from step_00000002" in log
    assert "resumed from" in log and "step_00000002 (step 2)" in log
    # the two steps are redone and step 4 is saved again, complete
    from apb.train.checkpoint import verify_checkpoint

    assert verify_checkpoint(run / "checkpoints" / "step_00000004")["step"] == 4


@pytest.mark.slow
def test_a_payload_in_every_checkpoint_file_never_runs_and_nothing_is_lost(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    marker = tmp_path / "marker"
    for folder in (run / "checkpoints").glob("step_*"):
        for path in folder.iterdir():
            _plant(path, marker)
    before = _snapshot(run)
    proc = _retain(run, "optim.max_steps=6")
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "none is complete" in proc.stderr and "trainer_state.json: not readable JSON" in proc.stderr
    assert not marker.exists()
    assert _snapshot(run) == before  # no restart over the old checkpoints: nothing written at all


@pytest.mark.slow
def test_a_refused_rerun_writes_nothing_in_the_run_folder(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    before = _snapshot(run)
    proc = _retain(run, "heads.hidden_size=32", "data.max_length=480")
    assert proc.returncode == 2
    assert "heads.hidden_size: 64 -> 32" in proc.stderr and "data.max_length: 512 -> 480" in proc.stderr
    assert _snapshot(run) == before
