"""Checkpoints of the heads' training state (never the base): exact resume.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/``: DeepSpeed's own files for the heads module,
optimizer and LR scheduler (partitioned per rank under ZeRO), ``trainer_state.json`` (step, tokens
seen, sampler state, last loss) and ``rng_rank<r>.pt`` (torch, CUDA, Python and NumPy RNG states of
each rank). ``latest`` names the newest complete one: it is written last, so a run killed while
saving resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
LATEST = "latest"
STATE_NAME = "trainer_state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_NAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_NAME).is_file():
            return candidate
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def save_checkpoint(
    engine: Any,
    output_dir: str | Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    heads_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the engine (heads, optimizer, scheduler) and `state` at `step`; keep the newest `keep_last`.

    `heads_state` (the whole heads state dict) is written by rank 0 as heads.safetensors, which
    `scripts/export_adapter.py` reads. Collective: every rank calls it.
    """
    root = checkpoint_root(output_dir)
    tag = f"step_{step:08d}"
    folder = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), folder / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        if heads_state is not None:
            from apb.train.export import save_heads_file

            save_heads_file(heads_state, folder)
        (folder / STATE_NAME).write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True))
        (root / LATEST).write_text(tag)
        for _, old in step_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", folder)
    _barrier()
    return folder


def load_checkpoint(engine: Any, folder: str | Path) -> dict[str, Any]:
    """Restore the engine and this rank's RNG states from `folder`; returns the trainer state."""
    folder = Path(folder)
    load_path, _ = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")
    state = json.loads((folder / STATE_NAME).read_text())
    rng_file = folder / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("checkpoint %s has no RNG state for rank %d (world size changed?)", folder, _rank())
    logger.info("resumed from %s (step %d)", folder, state["step"])
    return state
