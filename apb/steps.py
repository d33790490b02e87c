"""Decoding steps: one token per row through every layer and the LM head, eagerly or as a CUDA graph.

An eager step launches a few hundred small kernels (every layer's projections, norms, RoPE, each host's
attention and the merge) for one token per row: the GPU waits on the CPU that launches them. Graphed steps
record the step once, as a CUDA graph, and replay it per token: one launch from the CPU.

A graph replays fixed kernels on fixed buffers, so everything a step changes lives in device tensors that
are written before each replay: the token ids, the position, and where the last host's store takes the
token's K/V (`DecodeState.slot`), whose attention reads only the entries filled so far
(`DecodeState.valid`, read by the kernel). The store grows by `DECODE_ROOM` tokens at a time
(`DecodeState.reserve`), not by `max_new_tokens` up front (a generous limit would cost memory for tokens
never generated); the graph is recorded again whenever the store's buffers were replaced. Replays compute
what eager steps compute, kernel for kernel.

Under torch.distributed (NCCL) each rank records its own graph, the step's collectives included: a
recorded collective runs when the graph replays, so every rank still runs each step's collectives once,
whether it replays or records that step (recording runs the step eagerly first). Only the last host's
store grows, but every rank checks for room at the same steps (every `room` tokens) and all record again
together when it grew (`Communicator.any_host`): ranks never record while their peers replay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from apb import attention
from apb.attention import DecodeState

logger = logging.getLogger(__name__)

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""ids [batch, 1], positions [1] -> logits [batch, vocab]: one decoding step of the model."""


class EagerSteps:
    """Each step run as it comes (any device, any communicator)."""

    def __init__(self, step: Step):
        self._step = step

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """token: [batch] ids at `position` -> the next logits [batch, vocab]."""
        positions = torch.arange(position, position + 1, device=token.device)
        return self._step(token[:, None], positions)

    def close(self) -> None:
        pass


class GraphedSteps:
    """Steps replayed from a CUDA graph recorded at the first one (see the module docstring).

    The first call runs the step eagerly, reading the step's inputs from the device tensors the graph uses
    (which also warms up Triton's and torch.compile's caches), then records the graph; later calls write
    the inputs and replay it. Should recording fail (an operation a graph cannot hold, such as a sync to
    the CPU inside a model's forward), a warning says so and the steps run eagerly from then on: same
    tokens, only slower. `close()` returns the state to eager steps and frees the graph. `room`: tokens the
    store grows by when it is full (default `apb.attention.DECODE_ROOM`).
    `record_graph=False` runs every step eagerly from the graph's input tensors: what a replay computes,
    on any device (the CPU tests check it against `EagerSteps`). `recordings`: how many times the step
    was recorded (with `record_graph=False`: would have been)."""

    def __init__(
        self,
        step: Step,
        decode: DecodeState,
        *,
        batch: int,
        max_steps: int,
        device: torch.device,
        record_graph: bool = True,
        room: int | None = None,
    ):
        if record_graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self._record_graph = record_graph
        self._step = step
        self._decode = decode
        self._steps_left = max_steps
        self._room = room or attention.DECODE_ROOM
        # Store entries counted from steps, not read from the store: the same on every rank (only the last
        # host has a store that fills), so that every rank checks for room at the same steps.
        self._filled = decode.filled
        self._room_end = self._filled  # entries the buffers have room for, as far as reserved
        self.recordings = 0
        self._ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(1, dtype=torch.long, device=device)
        decode.slot = torch.zeros(1, dtype=torch.long, device=device)
        decode.valid = torch.zeros(1, dtype=torch.long, device=device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._recorded = False  # a recording for the present buffers exists (the graph, or a stand-in)
        self._logits: torch.Tensor | None = None
        self._eager: EagerSteps | None = None

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """token: [batch] ids at `position` -> the next logits [batch, vocab] (a tensor of its own)."""
        decode = self._decode
        if self._steps_left <= 0:
            raise RuntimeError("more decoding steps than the max_steps these graphed steps were made for")
        filled = self._filled
        self._filled += 1
        self._steps_left -= 1
        if filled >= self._room_end:  # room for the next tokens; new buffers need a new recording everywhere
            room = min(self._room, self._steps_left + 1)
            # after a fallback the eager steps grow the store themselves, but this rank still takes part
            grown = decode.reserve(room) if self._eager is None else False
            if decode.comm.any_host(grown):
                self._graph = self._logits = None
                self._recorded = False
            self._room_end = filled + room
        if self._eager is not None:
            return self._eager(token, position)
        self._ids.copy_(token[:, None])
        self._positions.fill_(position)
        decode.slot.fill_(filled)
        decode.valid.fill_(filled + 1)
        if not self._recorded:
            self.recordings += 1
        if not self._record_graph:
            logits = self._step(self._ids, self._positions)
            self._recorded = True
        elif not self._recorded:
            logits = self._record()
        else:
            self._graph.replay()
            logits = self._logits.clone()  # the graph's output buffer is overwritten by the next replay
        decode.advance(1)
        return logits

    def close(self) -> None:
        self._decode.slot = self._decode.valid = None
        self._graph = self._logits = None
        self._recorded = False

    def _record(self) -> torch.Tensor:
        """Run this step eagerly on a side stream (as CUDA graph capture asks), then record it; the eager
        run's logits are this step's."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._step(self._ids, self._positions)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads may go on calling CUDA while this one records (NCCL's watchdog
            # polls the collectives run so far); the default would make their calls fail the recording
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._logits = self._step(self._ids, self._positions)
        except Exception as err:  # noqa: BLE001 - any failure to record falls back to the same steps, eagerly
            logger.warning(
                "decoding steps could not be recorded as a CUDA graph (%s: %s); they run eagerly (same tokens, "
                "slower). generate(cuda_graphs=False) skips the attempt.",
                type(err).__name__,
                err,
            )
            _end_failed_capture()
            self._decode.slot = self._decode.valid = None
            self._eager = EagerSteps(self._step)
            self._logits = None
            return logits
        self._graph = graph
        self._recorded = True
        return logits


def _end_failed_capture() -> None:
    """Undo what a failed capture leaves behind. `torch.cuda.graph` puts the CUDA random generators into
    capture mode when it starts and takes them out when the capture ends well; when it fails they stay in
    it, and every later random op on the GPU fails ("Offset increment outside graph capture"). A capture
    that succeeds (one fill kernel) takes them out again."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    scratch = torch.empty(1, device="cuda")
    with torch.cuda.graph(graph):
        scratch.fill_(0.0)
    del graph
