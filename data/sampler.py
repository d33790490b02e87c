"""A deterministic sampler over epochs that resumes at exactly the next sample."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Sample indices for one rank, epoch after epoch, with a state that resumes exactly.

    Epoch ``e`` orders ``range(num_samples)`` by a permutation drawn from ``random.Random(f"{seed}|{e}")``
    (identity order when ``shuffle=False``), drops the last ``num_samples % world_size`` indices so that
    every rank gets the same count (ranks must step together), and gives rank ``r`` the positions
    ``r, r + world_size, ...``: the ranks' shards are disjoint and together cover the epoch.

    Iteration never ends by itself: after the last index of an epoch comes the first of the next. The
    state is ``(epoch, position)``, the position being how many indices this rank has taken in the
    current epoch; `load_state_dict` into a sampler built with the same arguments continues with the
    index that would have come next. `len()` is the number of indices per rank per epoch.
    """

    def __init__(
        self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if num_samples < world_size:
            raise ValueError(
                f"num_samples={num_samples} is less than world_size={world_size}: a rank would get nothing"
            )
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices in `epoch`, in order."""
        order = list(range(self.num_samples))
        if self.shuffle:
            random.Random(f"{self.seed}|{epoch}").shuffle(order)
        order = order[: len(self) * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_indices(self.epoch)
        index = self._order[self.position]
        self.position += 1
        return index

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position"}`` plus the arguments, to check a resume is like for like."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; ValueError if it was saved by a sampler with other arguments."""
        for key in ("num_samples", "seed", "world_size", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; "
                    "an exact resume needs the same data, seed and number of ranks"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"bad sampler state: epoch={epoch}, position={position} (len {len(self)})")
        self.epoch, self.position, self._order = epoch, position, None
