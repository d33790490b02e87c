"""Joining and leaving the process group (deepspeed launcher, torchrun, or a single process).

Only torch is imported here, so rank processes can exit cleanly without loading the rest.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group started by the deepspeed launcher or torchrun; a world of 1 otherwise."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    import deepspeed
    from apb.train.extensions import load_cpu_ops

    # DeepSpeed's CPU accelerator JIT-builds a comm op on first use (~60 s, cached across runs): build
    # it here, under a guard that survives a run killed mid-build (see apb.train.extensions).
    load_cpu_ops()
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the group above
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device
    )


def close_distributed(barrier: bool = True) -> None:
    """Destroy the process group on this rank (after a barrier when `barrier`), before interpreter exit.

    Left to interpreter finalisation, gloo's C++ worker threads may still hold work objects whose
    tensors need the GIL to be freed; that aborts the process with "terminate called without an
    active exception" (exit 134) on some runs (pytorch/pytorch#190489, #179291).
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
