"""How hosts talk: one communicator over torch.distributed, one that simulates H hosts in one process.

The maths (apb.attention) is the same for both; only these three exchanges differ:

- ``exchange_passing``: the per-layer all-gather of passing blocks during prefill. A host only reads
  the blocks of hosts before it, so running hosts one after another in host order (simulation) gives
  each host exactly what an all-gather would.
- ``share_anchor``: the per-layer broadcast of the anchor's K/V from host 0 (``APBConfig.share_anchor``),
  started before the host's passing-block selection and waited for before its attention.
- ``gather_partials``: the per-layer all-gather of partial attention outputs and log-sum-exps while
  decoding (Star Attention phase 2).
- ``broadcast_from_last``: the last host's sampled tokens / stop flag to every host.
- ``any_host``: whether a flag holds on any host (graphed decoding steps record their graph again on every
  host together when one host's store grew).

Before the prefill, ``check_agreement`` makes sure every rank was given the same inputs: ranks given
different contexts would otherwise agree on wrong logits, and ranks given different lengths or configs
would abort inside a collective (or wait in it) with no word on why.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NoReturn

import torch
import torch.distributed as dist

# torch >= 2.13 names the one-buffer all-gather all_gather_single (all_gather_into_tensor warns there)
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Communicator:
    """Interface. `hosts` are the host indices whose state lives in this process."""

    num_hosts: int
    hosts: list[int]

    def exchange_passing(
        self, layer_idx: int, host: int, k: torch.Tensor, v: torch.Tensor, counts: list[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Contribute host `host`'s passing block of layer `layer_idx` and return those of hosts < host.

        k, v: [batch, num_kv_heads, counts[host], head_dim]. `counts[j]` is host j's block size,
        known to every host in advance (it follows from the context length), so blocks of different
        sizes are padded to max(counts) for the collective and trimmed after it.
        Returns [(k_j, v_j) for j in range(host)] in host order.
        """
        raise NotImplementedError

    def share_anchor(self, layer_idx: int, host: int, kv: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start sending host 0's anchor K/V of layer `layer_idx` to every host; call the result to wait
        for them ([2, batch, kv_heads, anchor_len, head_dim], K then V). `kv`: on host 0 the anchor's K and
        V stacked so, on the other hosts a buffer of that shape to receive into. Every host calls it at
        every layer."""
        raise NotImplementedError

    def gather_partials(
        self, outs: list[torch.Tensor], lses: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All hosts' partial outputs, stacked in host order: [hosts, batch, heads, t, head_dim] and lses
        [hosts, batch, heads, t] (fp32). `outs` [batch, heads, t, head_dim] / `lses` [batch, heads, t] hold
        this process's hosts' partials, in host order."""
        raise NotImplementedError

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last host's value of `tensor` on every host."""
        raise NotImplementedError

    def any_host(self, flag: bool) -> bool:
        """Whether `flag` is true on any host (every host calls it together)."""
        raise NotImplementedError

    def check_agreement(self, descriptor: Mapping[str, Any], error: Exception | None = None) -> None:
        """Every process must hold the same `descriptor` (a small JSON-able dict: lengths, config,
        checksums of the ids). `ValueError` on every rank naming the differing fields and ranks.

        `error`: this process refused its inputs; it is re-raised here after the exchange, and the other
        ranks raise a `ValueError` naming this rank, instead of waiting in the prefill's first collective.
        One process (simulation) has nothing to compare."""
        if error is not None:
            raise error

    @contextmanager
    def shared_refusal(self) -> Iterator[None]:
        """Input checks run inside this block: a `TypeError`/`ValueError` raised in it is reported to the
        other ranks (through `check_agreement`) before it propagates, so every rank stops together."""
        try:
            yield
        except (TypeError, ValueError) as err:
            self.check_agreement({}, error=err)
            raise


class SimulatedComm(Communicator):
    """H hosts in one process, run one after another in host order."""

    def __init__(self, num_hosts: int):
        self.num_hosts = num_hosts
        self.hosts = list(range(num_hosts))
        self._blocks: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._anchors: dict[int, torch.Tensor] = {}

    def exchange_passing(self, layer_idx, host, k, v, counts):
        if k.shape[2] != counts[host]:
            raise AssertionError(
                f"host {host} passing block has {k.shape[2]} entries, expected {counts[host]}"
            )
        layer = self._blocks.setdefault(layer_idx, {})
        if host < self.num_hosts - 1:  # nobody reads the last host's block
            layer[host] = (k, v)
        earlier = [layer[j] for j in range(host)]
        if host == self.num_hosts - 1:
            self._blocks.pop(layer_idx, None)  # the last reader is done with this layer
        return earlier

    def share_anchor(self, layer_idx, host, kv):
        if host == 0:
            self._anchors[layer_idx] = kv
            return lambda: kv
        anchor = self._anchors[layer_idx]
        if host == self.num_hosts - 1:
            del self._anchors[layer_idx]  # the last reader is done with this layer
        if anchor.shape != kv.shape:
            raise AssertionError(
                f"host {host} expects an anchor of {tuple(kv.shape)}, got {tuple(anchor.shape)}"
            )
        return lambda: anchor

    def gather_partials(self, outs, lses):
        return torch.stack(outs), torch.stack([lse.float() for lse in lses])

    def broadcast_from_last(self, tensor):
        return tensor

    def any_host(self, flag):
        return flag


class DistributedComm(Communicator):
    """One host per rank of a torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("DistributedComm needs an initialised torch.distributed process group")
        self.group = group
        self.device = torch.device(device) if device is not None else None
        """Where the agreement check's small tensors live (the model's device; NCCL needs CUDA)."""
        self.num_hosts = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.hosts = [self.rank]

    def exchange_passing(self, layer_idx, host, k, v, counts):
        if host != self.rank:
            raise AssertionError(f"rank {self.rank} asked to act as host {host}")
        # K and V in one buffer padded to the largest block (one copy), gathered into one [hosts, ...] buffer
        batch, kv_heads, count, head_dim = k.shape
        packed = k.new_zeros(2, batch, kv_heads, max(counts), head_dim)
        packed[0, :, :, :count], packed[1, :, :, :count] = k, v
        gathered = self._all_gather_stacked(packed)
        return [(gathered[j, 0, :, :, : counts[j]], gathered[j, 1, :, :, : counts[j]]) for j in range(host)]

    def share_anchor(self, layer_idx, host, kv):
        if host != self.rank:
            raise AssertionError(f"rank {self.rank} asked to act as host {host}")
        work = dist.broadcast(kv, src=self._global_rank(0), group=self.group, async_op=True)  # in place

        def wait() -> torch.Tensor:
            work.wait()
            return kv

        return wait

    def gather_partials(self, outs, lses):
        (out,), (lse,) = outs, lses
        # one collective: every rank's output and lse side by side, fp32, in one [hosts, ...] buffer
        packed = torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1)
        gathered = self._all_gather_stacked(packed)
        return gathered[..., :-1], gathered[..., -1]

    def broadcast_from_last(self, tensor):
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=self._global_rank(self.num_hosts - 1), group=self.group)
        return tensor

    def any_host(self, flag):
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self._small_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def _all_gather_stacked(self, packed: torch.Tensor) -> torch.Tensor:
        """Every rank's `packed` in one collective: [hosts, *packed.shape], in rank order."""
        # ranks concatenated along the first axis (the layout every backend takes, gloo included)
        gathered = packed.new_empty(self.num_hosts * packed.shape[0], *packed.shape[1:])
        _ALL_GATHER_SINGLE(gathered, packed.contiguous(), group=self.group)
        return gathered.view(self.num_hosts, *packed.shape)

    def _small_device(self) -> torch.device:
        """Where small control tensors live: the model's device, else what the backend takes."""
        if self.device is not None:
            return self.device
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def backend(self) -> str:
        """The process group's backend ("nccl", "gloo", ...)."""
        return str(dist.get_backend(self.group))

    def _global_rank(self, host: int) -> int:
        return dist.get_global_rank(self.group, host) if self.group is not None else host

    def check_agreement(self, descriptor, error=None):
        mine = {
            "descriptor": dict(descriptor),
            "error": None if error is None else f"{type(error).__name__}: {error}",
        }
        everyone = self._all_gather_json(mine)
        if error is not None:
            raise error
        refused = [(rank, entry["error"]) for rank, entry in enumerate(everyone) if entry["error"]]
        if refused:
            raise ValueError(
                "another rank refused its inputs, so this rank stops too: "
                + "; ".join(f"rank {rank}: {message}" for rank, message in refused)
            )
        differences = _differences([entry["descriptor"] for entry in everyone])
        if differences:
            raise ValueError(
                f"the {self.num_hosts} ranks were not given the same inputs (every rank must get the same "
                "context, query and config; each is one host of one prefill): " + "; ".join(differences)
            )

    def _all_gather_json(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order, through two small all-gathers (sizes, then bytes)."""
        device = self._small_device()
        payload = torch.tensor(
            list(json.dumps(value, sort_keys=True).encode()), dtype=torch.uint8, device=device
        )
        size = torch.tensor([payload.numel()], dtype=torch.long, device=device)
        sizes = [torch.empty_like(size) for _ in range(self.num_hosts)]
        dist.all_gather(sizes, size, group=self.group)
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[: payload.numel()] = payload
        gathered = [torch.empty_like(padded) for _ in range(self.num_hosts)]
        dist.all_gather(gathered, padded, group=self.group)
        return [
            json.loads(bytes(g[: int(n.item())].tolist()).decode())
            for g, n in zip(gathered, sizes, strict=True)
        ]


def _differences(descriptors: list[dict[str, Any]]) -> list[str]:
    """One line per field on which the ranks differ, naming the ranks that differ from the most common
    value (rank 0's on a tie)."""
    lines = []
    for field in sorted(set().union(*descriptors)):
        values = [json.dumps(d.get(field), sort_keys=True) for d in descriptors]
        if len(set(values)) == 1:
            continue
        counts = Counter(values)
        usual = max(counts, key=lambda v: (counts[v], v == values[0]))
        odd = [rank for rank, value in enumerate(values) if value != usual]
        agreeing = [rank for rank, value in enumerate(values) if value == usual]
        shown = ", ".join(f"rank {rank}: {values[rank]}" for rank in odd)
        lines.append(
            f"{field} differs on rank(s) {', '.join(map(str, odd))} ({shown}; "
            f"rank(s) {', '.join(map(str, agreeing))}: {usual})"
        )
    return lines


def make_comm(num_hosts: int | None, device: torch.device | str | None = None) -> Communicator:
    """Distributed inside an initialised process group (num_hosts must equal the world size, or be
    None), simulated otherwise (num_hosts defaults to 1). `device`: the model's, for the distributed
    agreement check's tensors."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if num_hosts is not None and num_hosts != world:
            raise ValueError(
                f"num_hosts={num_hosts} but the process group has world size {world}: inside torch.distributed "
                "every rank is one host (leave num_hosts unset)"
            )
        return DistributedComm(device=device)
    num_hosts = 1 if num_hosts is None else num_hosts
    if not isinstance(num_hosts, int) or num_hosts < 1:
        raise ValueError(f"num_hosts must be an int >= 1, got {num_hosts!r}")
    return SimulatedComm(num_hosts)


def exit_rank(code: int | None = 0) -> NoReturn:
    """`sys.exit(code)`; a process started by torchrun leaves with `os._exit` once its output is flushed.

    A script calls it last, after `destroy_process_group`. The interpreter's teardown frees what is left of
    a process group (its C++ worker threads, kept alive by a reference somewhere), and gloo can abort there
    ("terminate called without an active exception") after every result was written and checked, turning a
    run that passed into a failed one; skipping the teardown leaves nothing to abort."""
    if "RANK" not in os.environ:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
