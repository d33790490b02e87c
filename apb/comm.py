"""How hosts talk: one communicator over torch.distributed, one that simulates H hosts in one process.

The maths (apb.attention) is the same for both; only these three exchanges differ:

- ``exchange_passing``: the per-layer all-gather of passing blocks during prefill. A host only reads
  the blocks of hosts before it, so running hosts one after another in host order (simulation) gives
  each host exactly what an all-gather would.
- ``gather_partials``: the per-layer all-gather of partial attention outputs and log-sum-exps while
  decoding (Star Attention phase 2).
- ``broadcast_from_last``: the last host's sampled tokens / stop flag to every host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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

    def gather_partials(
        self, outs: list[torch.Tensor], lses: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """All hosts' partial outputs [batch, heads, t, head_dim] and lses [batch, heads, t] (fp32) in
        host order; `outs`/`lses` hold this process's hosts' partials, in host order."""
        raise NotImplementedError

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last host's value of `tensor` on every host."""
        raise NotImplementedError


class SimulatedComm(Communicator):
    """H hosts in one process, run one after another in host order."""

    def __init__(self, num_hosts: int):
        self.num_hosts = num_hosts
        self.hosts = list(range(num_hosts))
        self._blocks: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

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

    def gather_partials(self, outs, lses):
        return list(outs), list(lses)

    def broadcast_from_last(self, tensor):
        return tensor


class DistributedComm(Communicator):
    """One host per rank of a torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("DistributedComm needs an initialised torch.distributed process group")
        self.group = group
        self.num_hosts = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.hosts = [self.rank]

    def exchange_passing(self, layer_idx, host, k, v, counts):
        if host != self.rank:
            raise AssertionError(f"rank {self.rank} asked to act as host {host}")
        max_count = max(counts)
        packed = torch.stack([k, v])  # [2, batch, kv_heads, count, head_dim]
        if packed.shape[3] < max_count:
            pad = packed.new_zeros(*packed.shape[:3], max_count - packed.shape[3], packed.shape[4])
            packed = torch.cat([packed, pad], dim=3)
        gathered = [torch.empty_like(packed) for _ in range(self.num_hosts)]
        dist.all_gather(gathered, packed.contiguous(), group=self.group)
        return [(gathered[j][0, :, :, : counts[j]], gathered[j][1, :, :, : counts[j]]) for j in range(host)]

    def gather_partials(self, outs, lses):
        (out,), (lse,) = outs, lses
        packed = torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1).contiguous()
        gathered = [torch.empty_like(packed) for _ in range(self.num_hosts)]
        dist.all_gather(gathered, packed, group=self.group)
        return [g[..., :-1] for g in gathered], [g[..., -1] for g in gathered]

    def broadcast_from_last(self, tensor):
        tensor = tensor.contiguous()
        src = (
            dist.get_global_rank(self.group, self.num_hosts - 1)
            if self.group is not None
            else self.num_hosts - 1
        )
        dist.broadcast(tensor, src=src, group=self.group)
        return tensor


def make_comm(num_hosts: int | None) -> Communicator:
    """Distributed inside an initialised process group (num_hosts must equal the world size, or be
    None), simulated otherwise (num_hosts defaults to 1)."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if num_hosts is not None and num_hosts != world:
            raise ValueError(
                f"num_hosts={num_hosts} but the process group has world size {world}: inside torch.distributed "
                "every rank is one host (leave num_hosts unset)"
            )
        return DistributedComm()
    num_hosts = 1 if num_hosts is None else num_hosts
    if not isinstance(num_hosts, int) or num_hosts < 1:
        raise ValueError(f"num_hosts must be an int >= 1, got {num_hosts!r}")
    return SimulatedComm(num_hosts)
