"""The Hub path, offline: loading through the real `snapshot_download` from a cache in the standard
layout, and `push_to_hub` checked through a stand-in for `HfApi` (the server is unreachable here)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import script_module, tiny_model
from huggingface_hub import constants

import apb
from apb.adapter import CONFIG_NAME, WEIGHTS_NAME, load_heads, save_adapter
from apb.heads import build_heads

REPO = "user/tiny-llama-heads"
MAIN_REV = "a" * 40
V2_REV = "b" * 40
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "push_to_hub.py"


def _put_in_cache(hub_cache: Path, repo_id: str, revision: str, folder: Path, refs: tuple[str, ...]) -> None:
    """Lay `folder`'s files out as huggingface_hub does: blobs/<hash>, snapshots/<rev>/<file> -> blob
    symlinks, refs/<name> holding the commit hash."""
    repo_dir = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(revision)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A temporary HF_HOME with HF_HUB_OFFLINE=1. huggingface_hub reads both variables into
    `huggingface_hub.constants` when it is imported (long before this test), so setting the environment
    alone would not reach `snapshot_download`: the constants are patched too."""
    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


@pytest.fixture
def two_revisions(tmp_path, offline_hub):
    """REPO in the cache: `main` -> MAIN_REV holds heads A, tag `v2` -> V2_REV holds heads B."""
    model = tiny_model("llama")
    heads = {}
    for name, rev, refs in (("a", MAIN_REV, ("main",)), ("b", V2_REV, ("v2",))):
        torch.manual_seed(ord(name))
        heads[name] = build_heads(model, hidden_size=16)
        _put_in_cache(offline_hub, REPO, rev, save_adapter(heads[name], tmp_path / name), refs)
    return model, heads


def _equal(a, b) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_hub_id_resolves_from_cache_offline(two_revisions, offline_hub):
    model, heads = two_revisions
    loaded, config = load_heads(model, REPO)
    assert _equal(loaded, heads["a"]) and not _equal(loaded, heads["b"])
    assert config.head_hidden_size == 16
    # The files came from the cache snapshot that refs/main points at.
    folder = huggingface_hub.snapshot_download(REPO, local_files_only=True)
    assert Path(folder) == offline_hub / "models--user--tiny-llama-heads" / "snapshots" / MAIN_REV


def test_revision_picks_another_snapshot(two_revisions):
    model, heads = two_revisions
    by_tag, _ = load_heads(model, REPO, revision="v2")
    by_hash, _ = load_heads(model, REPO, revision=V2_REV)
    assert _equal(by_tag, heads["b"]) and _equal(by_hash, heads["b"])


def test_uncached_repo_offline_is_a_clear_error(two_revisions):
    model, _ = two_revisions
    with pytest.raises(
        FileNotFoundError, match=r"'user/not-there'.*not in the Hub cache \(HF_HUB_OFFLINE is set\)"
    ):
        load_heads(model, "user/not-there")
    with pytest.raises(FileNotFoundError, match="revision v9"):
        load_heads(model, REPO, revision="v9")


def test_strict_checks_apply_to_hub_adapters(two_revisions):
    _, _ = two_revisions
    with pytest.raises(ValueError, match=r"model_type: expected 'qwen2' \(the model\), found 'llama'"):
        load_heads(tiny_model("qwen2"), REPO)


# ---------------------------------------------------------------------------------------------- push


class RecordingHfApi:
    """Stand-in for `huggingface_hub.HfApi`: the only stand-in in the tests, because the Hub server is
    unreachable from CI. It records the calls and what the uploaded folder held at upload time."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None, **kwargs):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return "commit-info"


@pytest.fixture
def recording_api(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi.calls


def test_push_folder(recording_api, tmp_path):
    folder = save_adapter(build_heads(tiny_model("llama"), hidden_size=16), tmp_path / "adapter")
    result = apb.push_to_hub(folder, "user/heads", private=True, token="hf_x", commit_message="first")
    assert result == "commit-info"
    names = [name for name, _ in recording_api]
    assert names == ["init", "create_repo", "upload_folder"]
    assert recording_api[0][1] == {"token": "hf_x"}
    assert recording_api[1][1] == {
        "repo_id": "user/heads",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    upload = recording_api[2][1]
    assert upload["repo_id"] == "user/heads" and Path(upload["folder_path"]) == folder
    assert upload["commit_message"] == "first" and upload["revision"] is None
    assert upload["files"][WEIGHTS_NAME] == (folder / WEIGHTS_NAME).read_bytes()


def test_push_heads_saves_a_temporary_adapter_first(recording_api):
    heads = build_heads(tiny_model("llama"), hidden_size=16)
    apb.push_to_hub(heads, "user/heads", revision="v2", training={"steps": 1})
    names = [name for name, _ in recording_api]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    assert recording_api[1][1]["private"] is False
    assert recording_api[2][1] == {
        "repo_id": "user/heads",
        "branch": "v2",
        "exist_ok": True,
        "repo_type": "model",
    }
    upload = recording_api[3][1]
    assert upload["revision"] == "v2"
    assert sorted(upload["files"]) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert b'"steps": 1' in upload["files"][CONFIG_NAME]
    assert not Path(upload["folder_path"]).exists()  # the temporary folder is cleaned up


def test_push_refuses_a_folder_that_is_not_an_adapter(recording_api, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"missing {CONFIG_NAME}, {WEIGHTS_NAME}"):
        apb.push_to_hub(tmp_path, "user/heads")
    assert [name for name, _ in recording_api] == ["init"]  # nothing was created or uploaded


def test_push_script_refuses_bad_folder_before_touching_the_hub(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "user/heads", "--private"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert "missing adapter_config.json" in result.stderr


# ------------------------------------------------------------------------------------ main process only


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from apb.heads import ModelShape, RetainingHeads

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        RecordingHfApi.calls = []
        huggingface_hub.HfApi = RecordingHfApi  # this spawned process's own module object
        shape = ModelShape(
            model_type="llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_act="silu"
        )
        torch.manual_seed(rank)  # each rank's heads differ: the folder tells who wrote it
        heads = RetainingHeads(shape, hidden_size=8)
        folder = save_adapter(heads, Path(out) / "adapter")
        # After save_adapter returns, every rank sees the finished folder (barrier).
        seen = sorted(p.name for p in folder.iterdir())
        pushed = apb.push_to_hub(heads, "user/heads")
        torch.save(
            {
                "seen": seen,
                "pushed": pushed,
                "calls": [c for c, _ in RecordingHfApi.calls],
                "state": heads.state_dict(),
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_only_rank0_writes_and_pushes(tmp_path):
    torch.multiprocessing.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[1]["seen"] == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert ranks[0]["pushed"] == "commit-info" and ranks[0]["calls"] == [
        "init",
        "create_repo",
        "upload_folder",
    ]
    assert ranks[1]["pushed"] is None and ranks[1]["calls"] == []
    from safetensors.torch import load_file

    written = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert all(torch.equal(written[k], ranks[0]["state"][k]) for k in written)
    assert not all(torch.equal(written[k], ranks[1]["state"][k]) for k in written)


def test_push_script_hands_its_arguments_to_push_to_hub(recording_api, tmp_path, capsys):
    with script_module(SCRIPT) as cli:
        folder = save_adapter(build_heads(tiny_model("llama"), hidden_size=16), tmp_path / "adapter")
        assert cli.main([str(folder), "user/heads", "--private", "--revision", "dev"]) == 0
        calls = dict(recording_api)
        assert calls["create_repo"]["private"] is True
        assert calls["create_branch"]["branch"] == "dev"
        assert (
            Path(calls["upload_folder"]["folder_path"]) == folder
            and calls["upload_folder"]["revision"] == "dev"
        )
        assert "pushed" in capsys.readouterr().out
