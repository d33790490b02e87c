"""DeepSpeed's C++ CPU op, JIT-built once per user and version, never waiting on a build that died.

On the CPU accelerator DeepSpeed JIT-builds a shared-memory comm op (``deepspeed_shm_comm``) on first
use through ``torch.utils.cpp_extension.load``, which holds ``<TORCH_EXTENSIONS_DIR>/<op>/lock`` while it
builds and makes every other process wait for that file to go. A run killed during the build leaves
the file behind, and every later run then waits forever without a word.

Here every apb-retain process builds or loads the op under an exclusive ``flock`` on
``<TORCH_EXTENSIONS_DIR>/.apb-build.lock``: the kernel drops it when its holder dies, so whoever holds
it knows no other apb-retain process is building, and a ``lock`` file left in the op's folder is stale:
it is removed with a warning. Waiting for a live holder is bounded (``APB_JIT_LOCK_TIMEOUT`` seconds,
default 900) and ends with an error naming the holder. The default folder is per user and per
Python/torch/DeepSpeed version, so two installs never share (or wait on) each other's builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

logger = logging.getLogger(__name__)

GUARD_NAME = ".apb-build.lock"
OPS = ("deepspeed_shm_comm",)
"""The ops built under the guard (their torch build-lock files are the ones checked)."""
DEFAULT_TIMEOUT_S = 900.0


def default_extensions_dir() -> Path:
    """``~/.cache/apb-retain/torch_extensions/<user>-py<X.Y>-torch<v>-deepspeed<v>``."""
    import torch

    try:
        ds_version = version("deepspeed")
    except PackageNotFoundError:
        ds_version = "none"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    tag = (
        f"{user}-py{sys.version_info[0]}.{sys.version_info[1]}-torch{torch.__version__}-deepspeed{ds_version}"
    )
    return Path.home() / ".cache" / "apb-retain" / "torch_extensions" / tag.replace("+", "_")


def extensions_dir() -> Path:
    """``TORCH_EXTENSIONS_DIR``, set to `default_extensions_dir()` when the user has not set it."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions_dir()))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


@contextlib.contextmanager
def build_guard(folder: Path, timeout_s: float) -> Iterator[Path]:
    """Hold the exclusive build guard of `folder`; RuntimeError naming its holder after `timeout_s`."""
    folder.mkdir(parents=True, exist_ok=True)
    guard = folder / GUARD_NAME
    fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = guard.read_text(errors="replace").strip() or "another process"
                    raise RuntimeError(
                        f"waited {timeout_s:.0f} s for {guard}, held by {holder}, which is building "
                        f"DeepSpeed's C++ ops in {folder}; let it finish (set APB_JIT_LOCK_TIMEOUT to wait "
                        "longer), or stop it, or point TORCH_EXTENSIONS_DIR at another folder"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield guard
    finally:
        os.close(fd)  # closing drops the flock


def remove_stale_locks(folder: Path) -> list[Path]:
    """Remove torch's build locks of `OPS` in `folder`. Call only while holding `build_guard(folder)`."""
    removed = []
    for op in OPS:
        lock = folder / op / "lock"
        if lock.exists():
            logger.warning(
                "removing stale JIT build lock %s: no apb-retain process is building %s (a run was killed "
                "while building it)",
                lock,
                op,
            )
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def load_cpu_ops(timeout_s: float | None = None) -> None:
    """On DeepSpeed's CPU accelerator, build or load its shm comm op now, under the build guard.

    DeepSpeed caches loaded ops per process, so its own later `load` (in `deepspeed.init_distributed`)
    takes no build lock. Not collective; a no-op on other accelerators.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    # The same test as deepspeed.comm.torch.build_shm_op: an op DeepSpeed would not build is not built.
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    if timeout_s is None:
        timeout_s = float(os.environ.get("APB_JIT_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S))
    folder = extensions_dir()
    with build_guard(folder, timeout_s):
        remove_stale_locks(folder)
        if not any((folder / builder.NAME).glob("*.so")):
            # warning: logging is not configured yet this early, and a silent minute looks like a hang
            logger.warning(
                "building DeepSpeed's CPU comm op once (about a minute; cached in %s for later runs)", folder
            )
        builder.load(verbose=False)
