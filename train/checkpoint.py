"""Checkpoints of the heads' training state (never the base): exact resume, atomic, no pickle.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/``:

- DeepSpeed's files for the heads module, optimizer and LR scheduler (partitioned per rank under
  ZeRO). They are torch zip files; resuming reads them with ``torch.load(weights_only=True)`` and only
  the three DeepSpeed record types they hold allowed (:func:`safe_torch_load`), so a planted pickle
  payload is refused instead of run;
- ``rng_rank<r>.safetensors``: the torch, CUDA, Python and NumPy RNG states of rank r (tensors, with
  the scalars in the metadata);
- ``heads.safetensors``: the whole heads state dict (what `scripts/export_adapter.py` reads);
- ``trainer_state.json``: step, tokens seen, sampler state, last loss, and ``files``: the size and
  SHA-256 of every other file of the checkpoint. It is written last.

Saving is atomic: every rank writes into ``.tmp_step_<N>``; rank 0 then writes trainer_state.json,
renames the folder to ``step_<N>`` and only then points ``latest`` at it. A run killed while saving
leaves a ``.tmp_`` folder (removed by the next save), never a half-written ``step_`` folder.

Resuming (:func:`find_resume_checkpoint`) takes the newest checkpoint whose files match its
trainer_state.json; a damaged one is reported by file name with a warning and the one before it is
used. Checkpoints but none complete is an error: a run never silently restarts over old checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
LATEST = "latest"
STATE_NAME = "trainer_state.json"
FORMAT = 2
"""Checkpoint layout version: 2 adds the file manifest and safetensors RNG states (1: rng_rank*.pt)."""
_TMP_PREFIX = ".tmp_"
_OLD_PREFIX = ".old_"


class CheckpointError(ValueError):
    """A checkpoint that is damaged, incomplete or holds something other than tensors (names the file)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


# ------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_file(path: str | Path) -> Path:
    """This process's RNG states as safetensors: tensors for the state arrays, JSON for the scalars."""
    from safetensors.torch import save_file

    state = rng_state()
    version, mt, gauss_next = state["python"]
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    tensors = {
        "torch": state["torch"].contiguous(),
        "python": torch.tensor(mt, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
    }
    for i, cuda_state in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = cuda_state.contiguous()
    metadata = {
        "format": "pt",
        "python": json.dumps({"version": version, "gauss_next": gauss_next}),
        "numpy": json.dumps({"name": np_name, "pos": np_pos, "has_gauss": np_has_gauss, "cached": np_cached}),
    }
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def load_rng_file(path: str | Path) -> None:
    """Restore the RNG states written by `save_rng_file` (CheckpointError naming the file if unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        py, npy = json.loads(meta["python"]), json.loads(meta["numpy"])
        state: dict[str, Any] = {
            "torch": tensors["torch"],
            "python": (py["version"], tuple(int(x) for x in tensors["python"].tolist()), py["gauss_next"]),
            "numpy": (
                npy["name"],
                tensors["numpy"].numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached"],
            ),
        }
        cuda = sorted((int(k.split(".")[1]), t) for k, t in tensors.items() if k.startswith("cuda."))
        if cuda:
            state["cuda"] = [t for _, t in cuda]
        set_rng_state(state)
    except Exception as err:  # safetensors, JSON, key and value errors all mean the same: damaged
        raise CheckpointError(f"{path}: not a readable RNG state ({type(err).__name__}: {err})") from err


# --------------------------------------------------------------------------- loading DeepSpeed's files


def _deepspeed_safe_globals() -> list[Any]:
    """The non-container types DeepSpeed's checkpoints hold (measured for ZeRO 0-3, fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load(weights_only=True)` of a DeepSpeed checkpoint file: no code from the file runs.

    CheckpointError naming the file if it holds any other type (a planted payload) or is damaged.
    """
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and DeepSpeed's checkpoint records, "
            f"and resuming never runs code from a checkpoint ({first})"
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: damaged or not a torch checkpoint ({err})") from err


class SafeLoading:
    """A DeepSpeed checkpoint engine whose `load` is `safe_torch_load`; everything else is the wrapped one's.

    DeepSpeed reads every model, optimizer and scheduler file through `engine.checkpoint_engine.load`
    (its own `TorchCheckpointEngine` calls ``torch.load(weights_only=False)``).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)


def use_safe_loading(engine: Any) -> None:
    """Make `engine` read checkpoints with `safe_torch_load` (idempotent)."""
    if not isinstance(engine.checkpoint_engine, SafeLoading):
        engine.checkpoint_engine = SafeLoading(engine.checkpoint_engine)


# -------------------------------------------------------------------------------------- finding them


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every ``step_<N>`` folder under `root` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `folder` but trainer_state.json (flushed to disk first)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_NAME):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def verify_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint; CheckpointError naming the first damaged file.

    Checks that trainer_state.json parses and that every file it lists has its size and SHA-256 and
    no other file is there. A format-1 checkpoint (no manifest) is accepted with a warning.
    """
    folder = Path(folder)
    state_file = folder / STATE_NAME
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing (the checkpoint was not completely written)")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_file}: not readable JSON ({err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{state_file}: not a trainer state (no integer 'step')")
    if state.get("format", 1) > FORMAT:
        raise CheckpointError(f"{state_file}: format {state['format']} is newer than this apb-retain reads")
    files = state.get("files")
    if files is None:
        logger.warning(
            "checkpoint %s was written before checkpoints had a file manifest: its files are not "
            "verified and its rng_rank*.pt (pickle) files are not read",
            folder,
        )
        return state
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{path}: {size} bytes, expected {expected['size']} (truncated or replaced)"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path}: contents differ from when it was saved (SHA-256 mismatch)")
    extra = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != STATE_NAME and p.relative_to(folder).as_posix() not in files
    )
    if extra:
        raise CheckpointError(f"{folder / extra[0]}: not written by this checkpoint (not in {STATE_NAME})")
    return state


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (warning for each damaged newer one), or None."""
    for _, folder in reversed(step_dirs(checkpoint_root(output_dir))):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            logger.warning("skipping damaged checkpoint %s: %s", folder.name, err)
            continue
        return folder
    return None


def _choose(output_dir: Path) -> tuple[str | None, list[str], str | None]:
    """(tag to resume from or None, warnings, error): the newest complete checkpoint."""
    root = checkpoint_root(output_dir)
    damaged: list[str] = []
    for _, folder in reversed(step_dirs(root)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as err:
            damaged.append(f"{folder.name}: {err}")
            continue
        warnings = [f"checkpoint {line}; resuming from {folder.name} instead" for line in damaged]
        return folder.name, warnings, None
    if damaged:
        error = (
            f"{root} holds checkpoints but none is complete, so this run cannot resume and will not "
            "start over on top of them:\n  " + "\n  ".join(damaged) + "\nMove or delete that folder to "
            "start again from step 0, or restore a checkpoint."
        )
        return None, [], error
    return None, [], None


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the newest complete one, or None when the run has none.

    A damaged newer checkpoint is reported (warning naming its file) and skipped; checkpoints none of
    which is complete raise CheckpointError. Rank 0 checks the files and tells the others, so all ranks
    resume from the same one (collective under torch.distributed).
    """
    output_dir = Path(output_dir)
    result: list[Any] = [None]
    if _rank() == 0:
        result[0] = _choose(output_dir)
    if _distributed():
        dist.broadcast_object_list(result, src=0)  # between our own ranks, not from disk
    tag, warnings, error = result[0]
    if error:
        raise CheckpointError(error)
    for line in warnings:
        logger.warning(line)
    return checkpoint_root(output_dir) / tag if tag else None


def has_checkpoints(output_dir: str | Path) -> bool:
    return bool(step_dirs(checkpoint_root(output_dir)))


# ------------------------------------------------------------------------------------ saving, loading


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    engine: Any,
    output_dir: str | Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    heads_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the engine (heads, optimizer, scheduler), RNG states and `state` at `step`, atomically.

    Keeps the newest `keep_last` checkpoints up to `step` (a newer-numbered one left by an earlier run
    is never pruned for this one). `heads_state` (the whole heads state dict) is written by rank 0 as
    heads.safetensors, which `scripts/export_adapter.py` reads. Collective: every rank calls it.
    """
    root = checkpoint_root(output_dir)
    tag = f"step_{step:08d}"
    tmp_tag = f"{_TMP_PREFIX}{tag}"
    tmp = root / tmp_tag
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving this step
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    save_rng_file(tmp / f"rng_rank{_rank()}.safetensors")
    _barrier()
    folder = root / tag
    if _rank() == 0:
        if heads_state is not None:
            from apb.train.export import save_heads_file

            save_heads_file(heads_state, tmp)
        record = {"format": FORMAT, "step": step, **state, "files": _manifest(tmp)}
        _write_atomic(tmp / STATE_NAME, json.dumps(record, indent=2, sort_keys=True))
        if folder.exists():  # the same step saved again (a rerun, or a damaged one redone)
            old = root / f"{_OLD_PREFIX}{tag}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
        _fsync_dir(root)
        _write_atomic(root / LATEST, tag)
        older = [d for s, d in step_dirs(root) if s < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", folder)
    _barrier()
    return folder


def load_checkpoint(engine: Any, folder: str | Path) -> dict[str, Any]:
    """Restore the engine and this rank's RNG states from `folder`; returns the trainer state.

    No pickle code runs: DeepSpeed's files go through `safe_torch_load`, the RNG states are safetensors.
    Call `find_resume_checkpoint` (or `verify_checkpoint`) first; this does not check the manifest.
    """
    folder = Path(folder)
    use_safe_loading(engine)
    state = json.loads((folder / STATE_NAME).read_text())
    load_path, _ = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"{folder}: DeepSpeed found no checkpoint files of this run's layout there")
    rng_file = folder / f"rng_rank{_rank()}.safetensors"
    if rng_file.is_file():
        load_rng_file(rng_file)
    else:
        logger.warning("checkpoint %s has no RNG state for rank %d (world size changed?)", folder, _rank())
    logger.info("resumed from %s (step %d)", folder, state["step"])
    return state
