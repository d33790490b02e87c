"""`APBModel`: APB prefill and distributed decoding around an unmodified transformers causal LM."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from apb.attention import (
    ATTN_NAME,
    DECODE_ROOM,
    ContextStored,
    DecodeState,
    LayerKV,
    PrefillState,
    TimedRegion,
    activate,
    install,
    uninstall,
)
from apb.backends import get_backend
from apb.comm import Communicator, SimulatedComm, make_comm
from apb.config import APBConfig
from apb.decode import StopCriteria, check_generation, check_sampling, is_int, sample_next_token
from apb.heads import ModelShape, ProjectionCapture, RetainingHeads, decoder_layers
from apb.plan import Calibration, CostModel, HostPlan
from apb.selectors import get_selector
from apb.steps import EagerSteps, GraphedSteps

logger = logging.getLogger(__name__)

TokenIds = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


@dataclasses.dataclass(kw_only=True, slots=True)
class PrefillRecord:
    """What `APBModel.recording` saw of a prefill (hosts of this process only)."""

    plan: HostPlan | None = None
    passing: dict[int, dict[int, torch.Tensor]] = dataclasses.field(default_factory=dict)
    """host -> layer -> indices [batch, num_kv_heads, count] into the host's block."""
    host_seconds: dict[int, float] = dataclasses.field(default_factory=dict)
    clock: Callable[[], Any] = time.perf_counter
    """What marks the start and end of each passing exchange (a benchmark on a GPU passes CUDA events)."""
    exchange_marks: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    """(start, end) `clock` marks around every passing exchange (one per layer of a host that takes part;
    under torch.distributed this includes waiting for the other ranks)."""
    regions: list[TimedRegion] | None = None
    """With ``recording(regions=True)``: a `TimedRegion` (host, layer, name, start, end) for every region of
    APB's attention step each host ran, in order; the names are `apb.attention.PREFILL_REGIONS`
    (step, score, top_k, gather, exchange, attention). None otherwise."""

    def region_times(self, elapsed: Callable[[Any, Any], float] | None = None) -> dict[int, dict[str, float]]:
        """host -> region name -> total over layers. `elapsed(start, end)` turns two clock marks into a
        duration (default ``end - start``: seconds with the default clock; a benchmark timing with CUDA
        events passes ``lambda a, b: a.elapsed_time(b)`` after a synchronize). `ValueError` when the
        recording did not ask for regions."""
        if self.regions is None:
            raise ValueError("no regions were recorded: use APBModel.recording(regions=True)")
        elapsed = elapsed or (lambda start, end: end - start)
        totals: dict[int, dict[str, float]] = {}
        for region in self.regions:
            per_host = totals.setdefault(region.host, {})
            per_host[region.name] = per_host.get(region.name, 0.0) + elapsed(region.start, region.end)
        return totals


class APBModel(nn.Module):
    """An unmodified causal LM that runs APB (arXiv 2502.12085) prefill and Star-style decoding.

    Inside an initialised torch.distributed process group each rank is one host; outside one,
    `num_hosts` hosts are simulated one after another in this process with the same maths.
    The wrapped model itself keeps working as before (`apbm.model(...)`, `apbm.model.generate(...)`).
    """

    def __init__(self, model: nn.Module, heads: RetainingHeads | None = None, adapter_config: Any = None):
        super().__init__()
        self.shape = ModelShape.from_model(model)
        if heads is not None:
            _check_heads(self.shape, heads)
            _check_finite(heads)
        self.model = model
        self.heads = heads
        self.adapter_config = adapter_config
        # Shared: a second APBModel / apb.load on the same model reuses the q/k/v hooks of the first.
        self.capture = ProjectionCapture.shared(model) if heads is not None else None
        install(model)
        window = getattr(model.config, "sliding_window", None)
        if window and getattr(model.config, "use_sliding_window", True):
            logger.warning(
                "%s uses a sliding window of %d tokens; APB attends over full blocks (like the reference), "
                "so results differ from the model's own for contexts longer than the window",
                self.shape.model_type,
                window,
            )
        self.cost_model = CostModel.from_model_config(model.config)
        """Predicted per-host work, used by the balanced split (`apb.plan`)."""
        self.last_plan: HostPlan | None = None
        """The `HostPlan` of the last prefill."""
        self._warned_positions = False
        self._record: PrefillRecord | None = None

    # ------------------------------------------------------------------ public API

    @contextlib.contextmanager
    def recording(
        self, clock: Callable[[], Any] | None = None, *, regions: bool = False
    ) -> Iterator[PrefillRecord]:
        """Record what the prefills inside the block did, for evaluation and benchmarks: the plan, the
        passing indices every host of this process chose (host -> layer -> [batch, num_kv_heads, count],
        block coordinates), each host's seconds (a device synchronize before and after each host, taken
        only inside a recording) and `clock` marks around every passing exchange (default
        `time.perf_counter`). Costs one small dict per layer; the last prefill inside the block
        is what the record holds (the exchange marks and regions of all of them).

        `regions`: also mark, with `clock`, every region of APB's attention step on every layer
        (`apb.attention.PREFILL_REGIONS`: the whole step, selection scores, top-k, gather, exchange,
        attention backend) into ``record.regions``; ``record.region_times()`` sums them per host. On a
        GPU pass a clock that does not synchronise (CUDA events) and read the marks after a synchronize.
        Without a recording (or without `regions`) nothing is marked.

            with apbm.recording() as record:
                apbm.prefill(context_ids, query_ids, config=config, num_hosts=4)
            record.passing[0][5]  # what host 0 passed at layer 5
            with apbm.recording(regions=True) as record:
                apbm.prefill(context_ids, query_ids, config=config, num_hosts=4)
            record.region_times()[1]["attention"]  # host 1's attention backend, all layers, seconds
        """
        previous, self._record = (
            self._record,
            PrefillRecord(clock=clock or time.perf_counter, regions=[] if regions else None),
        )
        try:
            yield self._record
        finally:
            self._record = previous

    def forward(self, context_ids: TokenIds, query_ids: TokenIds, **kwargs) -> torch.Tensor:
        return self.prefill(context_ids, query_ids, **kwargs)

    @torch.no_grad()
    def prefill(
        self,
        context_ids: TokenIds,
        query_ids: TokenIds,
        config: APBConfig | None = None,
        num_hosts: int | None = None,
        anchor_query_ids: TokenIds | None = None,
        oracle_scores: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """APB prefill of the context, then the query on top. Returns the query tokens' logits
        [batch, len(query), vocab] (the same on every host).

        Ids are [seq] or [batch, seq] (tensors or lists). Rows of different lengths (lists of lists)
        are prefilled one at a time, each exactly as alone; the logits then come back as one tensor
        [batch, longest query, vocab] with shorter queries **left**-padded with zeros, so that
        ``logits[:, -1]`` is every row's next-token logits and row i's are ``logits[i, -len(query_i):]``.
        `anchor_query_ids` are the tokens spliced into the anchor (default: all of `query_ids`). Pass
        the question alone when `query_ids` goes on past it (an answer prefix, gold answer tokens to
        score): the anchor then holds what a user would have asked, as at decode time.
        `oracle_scores`: for ``selector="oracle"`` only (evaluation, rows of equal length):
        `apb.recall.attention_mass` of the same input.
        """
        comm = make_comm(num_hosts, self.device)
        with comm.shared_refusal():
            batches = self._batches(context_ids, query_ids, anchor_query_ids)
            if len(batches) > 1 and oracle_scores is not None:
                raise ValueError("oracle_scores are for rows of equal length: prefill the rows one at a time")
        outputs = []
        for context, query, anchor_query in batches:
            decode = self._prefill_context(
                context, anchor_query, config, comm, query=query, oracle_scores=oracle_scores
            )
            hidden = self._run_tokens(decode, query, start=context.shape[1])
            outputs.append(self._lm_head(hidden))
        if len(outputs) == 1:
            return outputs[0]
        return _pad_rows(outputs, 0.0, left=True)

    @torch.no_grad()
    def generate(
        self,
        context_ids: TokenIds,
        query_ids: TokenIds,
        config: APBConfig | None = None,
        num_hosts: int | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        seed: int | None = None,
        return_logits: bool = False,
        anchor_query_ids: TokenIds | None = None,
        streamer: Any = None,
        pad_token_id: int | None = None,
        cuda_graphs: bool | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Prefill, then generate up to `max_new_tokens` tokens after the query.

        Returns **only the new ids** [batch, steps] (not the prompt, unlike transformers' `generate`;
        steps <= `max_new_tokens`, fewer when every row stopped), and with `return_logits` also the
        logits each token was chosen from [batch, steps, vocab]. A row that stopped before the others is
        padded on the right with `pad_token_id` (default: the first EOS id).
        Tokens are chosen on the last host (seeded `torch.Generator`) and broadcast, so any number of
        processes gives the same tokens; EOS / stop strings stop every host at the same step.

        EOS: `eos_token_id`, else `tokenizer.eos_token_id`, else the model's
        ``generation_config.eos_token_id`` (``eos_token_id=[]`` turns stopping at EOS off).
        Rows of different lengths (lists of lists) run one at a time, each exactly as alone (same
        `seed`); their ids (and logits, padded with zeros) are padded on the right to the longest.
        `streamer`: an object with ``put(ids)`` and ``end()``, such as transformers' `TextStreamer`.
        As in transformers, it gets the prompt first (``context + query`` ids [batch, seq], which
        ``TextStreamer(tokenizer, skip_prompt=True)`` skips), then each step's new ids [batch], then
        ``end()``. It is called only in the process that holds host 0 (rank 0 under torch.distributed;
        the one process when hosts are simulated): other ranks may pass the same streamer or None.
        Rows of different lengths cannot be streamed (TextStreamer takes one row anyway).
        `anchor_query_ids`: the tokens spliced into the anchor, as in `prefill` (default: `query_ids`).
        `cuda_graphs`: run the decoding steps (after the query) as one recorded CUDA graph replayed per token
        (`apb.steps`): the same tokens, without a CPU launch per kernel. None (default): on when the model
        is on a GPU and every host runs in this process. Under torch.distributed the steps run eagerly
        unless `cuda_graphs=True` (NCCL only: each rank records its step with its collectives).
        """
        comm = make_comm(num_hosts, self.device)
        with comm.shared_refusal():  # every argument is checked before the prefill
            check_generation(max_new_tokens=max_new_tokens, seed=seed)
            graphed = self._graphed_steps(cuda_graphs, comm)
            check_sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
            batches = self._batches(context_ids, query_ids, anchor_query_ids)
            eos_token_id = self._eos_token_id(eos_token_id, tokenizer)
            stop = StopCriteria(1, eos_token_id, stop_strings, tokenizer, pad_token_id)
            if streamer is not None and not callable(getattr(streamer, "put", None)):
                raise TypeError(f"streamer must have put(ids) and end() (a TextStreamer), got {streamer!r}")
            if len(batches) > 1 and streamer is not None:
                raise ValueError(
                    "streamer: rows of different lengths run one at a time and cannot be streamed together; "
                    "generate them one by one"
                )
            if len(batches) > 1 and stop.pad_token_id is None and stop.stop_strings:
                raise ValueError(
                    "rows of different lengths stopped by stop_strings need a pad id for the rows that stop "
                    "early: pass pad_token_id (or eos_token_id)"
                )
        outputs = [
            self._generate_batch(
                context,
                query,
                anchor_query,
                config,
                comm,
                StopCriteria(context.shape[0], eos_token_id, stop_strings, tokenizer, pad_token_id),
                max_new_tokens=max_new_tokens,
                sampling={"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p},
                seed=seed,
                return_logits=return_logits,
                streamer=streamer,
                graphed=graphed,
            )
            for context, query, anchor_query in batches
        ]
        if len(outputs) == 1:
            ids, logits = outputs[0]
            return (ids, logits) if return_logits else ids
        ids = _pad_rows([ids for ids, _ in outputs], stop.pad_token_id or 0)  # 0 unused: no row stops early
        if return_logits:
            return ids, _pad_rows([logits for _, logits in outputs], 0.0)
        return ids

    # ------------------------------------------------------------------ save, load, push

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter: str | Path | None = None, **kwargs: Any) -> APBModel:
        """`apb.load(model, adapter, **kwargs)`: the heads of an adapter folder, Hub id or legacy `.bin`
        attached to `model` (no adapter: the training-free selector)."""
        from apb.api import load  # apb.api imports this module

        return load(model, adapter, **kwargs)

    def unload(self) -> nn.Module:
        """The base model as it was before `apb.load`: its own attention implementation back and the heads'
        q/k/v hooks removed, so that it runs, and compiles, as before (a registered APB attention delegates
        to the original while idle, but `torch.compile` cannot trace through it: a plain compiled
        ``model.generate`` would break its graph at every attention call). This `APBModel`, and any other
        made on the same model, cannot prefill or generate afterwards; `apb.load` the model again."""
        if self.capture is not None:
            self.capture.remove()
        uninstall(self.model)
        return self.model

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        base_model_name_or_path: str | None = None,
        apb_defaults: Any = None,
        training: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save the retaining heads as an adapter folder (`apb.save_adapter`: config, safetensors
        weights, model card; rank 0 writes, every rank waits) and return it. Only the heads are saved,
        not the base model; read it back with ``apb.load(model, folder)`` (or `from_pretrained`).

        The config's fields default to those of the adapter this model was loaded from (base model, the
        APB layout the heads were trained for, the training record), so a save and load round-trip keeps
        the defaults `generate` uses. `ValueError` when the model has no heads.
        """
        from apb.adapter import save_adapter

        return save_adapter(
            self._heads_to_save(),
            save_directory,
            metrics=metrics,
            **self._adapter_fields(
                base_model_name_or_path=base_model_name_or_path, apb_defaults=apb_defaults, training=training
            ),
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        base_model_name_or_path: str | None = None,
        apb_defaults: Any = None,
        training: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Any:
        """Upload the heads as an adapter to the Hub repo `repo_id` (`apb.push_to_hub`: created if needed,
        `revision` a branch; rank 0 only, the others return None) and return the commit info. The
        config's fields default as in `save_pretrained`."""
        from apb.hub import push_to_hub

        return push_to_hub(
            self._heads_to_save(),
            repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            metrics=metrics,
            **self._adapter_fields(
                base_model_name_or_path=base_model_name_or_path, apb_defaults=apb_defaults, training=training
            ),
        )

    # ------------------------------------------------------------------ internals

    def _heads_to_save(self) -> RetainingHeads:
        if self.heads is None:
            raise ValueError(
                "this APBModel has no retaining heads to save (apb.load(model) without an adapter selects "
                "passing blocks training-free); train heads with train/retain.py or load an adapter"
            )
        return self.heads

    def _adapter_fields(self, **given: Any) -> dict[str, Any]:
        """`given` (base_model_name_or_path, apb_defaults, training), each defaulting to the loaded
        adapter's value."""
        loaded = self.adapter_config
        defaults = {
            "base_model_name_or_path": getattr(loaded, "base_model_name_or_path", None) or None,
            "apb_defaults": getattr(loaded, "apb", None) or None,
            "training": getattr(loaded, "training", None) or None,
        }
        return {key: defaults[key] if value is None else value for key, value in given.items()}

    def _eos_token_id(self, eos_token_id: Any, tokenizer: Any) -> Any:
        """The EOS ids to stop at: given, else the tokenizer's, else the model's generation config's."""
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        return eos_token_id

    def _batches(
        self, context_ids: TokenIds, query_ids: TokenIds, anchor_query_ids: TokenIds | None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Checked inputs as (context, query, anchor_query) [batch, seq] batches: one batch, or one per
        row when some argument holds rows of different lengths (each row then runs as alone)."""
        named = {"context_ids": context_ids, "query_ids": query_ids, "anchor_query_ids": anchor_query_ids}
        if not any(_has_ragged_rows(ids) for ids in named.values()):
            context, query = self._inputs(context_ids, query_ids)
            return [(context, query, self._anchor_query(anchor_query_ids, query))]
        rows = {name: _rows(ids, name) for name, ids in named.items() if ids is not None}
        sizes = {name: len(r) for name, r in rows.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch sizes differ: {sizes}")
        batches = []
        for i in range(sizes["context_ids"]):
            anchor = rows["anchor_query_ids"][i] if "anchor_query_ids" in rows else None
            try:
                context, query = self._inputs(rows["context_ids"][i], rows["query_ids"][i])
                batches.append((context, query, self._anchor_query(anchor, query)))
            except (TypeError, ValueError) as err:
                raise type(err)(f"row {i}: {err}") from err
        return batches

    def _generate_batch(
        self,
        context: torch.Tensor,
        query: torch.Tensor,
        anchor_query: torch.Tensor,
        config: APBConfig | None,
        comm: Communicator,
        stop: StopCriteria,
        *,
        max_new_tokens: int,
        sampling: dict[str, Any],
        seed: int | None,
        return_logits: bool,
        streamer: Any,
        graphed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`generate` of one batch of equal-length rows: ids [batch, steps], logits [batch, steps, vocab]
        (None unless `return_logits`)."""
        decode = self._prefill_context(
            context, anchor_query, config, comm, query=query, max_new_tokens=max_new_tokens
        )
        streams = streamer is not None and 0 in comm.hosts
        args = (decode, context, query, stop, max_new_tokens, sampling, seed, return_logits, graphed)
        if not streams:
            return self._decode_batch(*args)
        streamer.put(torch.cat([context, query], dim=1).cpu())
        try:
            return self._decode_batch(*args, streamer)
        finally:  # also on an error, so that a consumer iterating a TextIteratorStreamer is not left waiting
            streamer.end()

    def _graphed_steps(self, cuda_graphs: object, comm: Communicator) -> bool:
        """`generate`'s `cuda_graphs` (None, True, False) -> whether its decoding steps run graphed: None
        turns them on for a GPU model whose hosts all run in this process; under torch.distributed (NCCL)
        they run graphed only when asked for."""
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True, False or None (auto), got {cuda_graphs!r}")
        in_process = isinstance(comm, SimulatedComm)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a GPU, but it is on the CPU")
        backend = getattr(comm, "backend", type(comm).__name__)
        if cuda_graphs and not in_process and backend != "nccl":
            raise ValueError(
                f"cuda_graphs=True under torch.distributed needs the NCCL backend (a CUDA graph records NCCL "
                f"collectives, not {backend}'s); pass cuda_graphs=None (auto) or False"
            )
        if cuda_graphs is None:
            return self.device.type == "cuda" and in_process
        return cuda_graphs

    def _steps(
        self, decode: DecodeState, *, batch: int, max_steps: int, graphed: bool
    ) -> EagerSteps | GraphedSteps:
        """The decoding steps after the query: eager, or replayed from a CUDA graph (`apb.steps`)."""

        def step(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self._lm_head(self._run_decoder(decode, ids, positions)[:, -1:])[:, 0]

        if graphed and max_steps > 0:
            return GraphedSteps(step, decode, batch=batch, max_steps=max_steps, device=self.device)
        return EagerSteps(step)

    def _decode_batch(
        self,
        decode: DecodeState,
        context: torch.Tensor,
        query: torch.Tensor,
        stop: StopCriteria,
        max_new_tokens: int,
        sampling: dict[str, Any],
        seed: int | None,
        return_logits: bool,
        graphed: bool,
        streamer: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query on top of the prefilled context, then the token loop (graphed steps or eager ones);
        `streamer.put` each token."""
        hidden = self._run_tokens(decode, query, start=context.shape[1])
        logits = self._lm_head(hidden[:, -1:])[:, 0]
        steps = self._steps(decode, batch=context.shape[0], max_steps=max_new_tokens - 1, graphed=graphed)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=logits.device).manual_seed(seed)
        position = context.shape[1] + query.shape[1]
        tokens: list[torch.Tensor] = []
        step_logits: list[torch.Tensor] = []
        try:
            for step in range(max_new_tokens):
                token = sample_next_token(logits, generator=generator, **sampling)
                if stop.pad_token_id is not None and any(stop.finished):
                    done = torch.tensor(stop.finished, device=token.device)
                    token = token.masked_fill(done, stop.pad_token_id)
                so_far = torch.cat([*tokens, token[:, None]], dim=1) if tokens else token[:, None]
                finished = stop.update(so_far)
                # the last host decides (token and stop flag) and every host follows
                packed = torch.cat([token, torch.tensor([int(finished)], device=token.device)])
                packed = decode.comm.broadcast_from_last(packed)
                token, finished = packed[:-1], bool(packed[-1].item())
                tokens.append(token[:, None])
                if streamer is not None:
                    streamer.put(token.cpu())
                if return_logits:
                    step_logits.append(logits)
                if finished or step == max_new_tokens - 1:
                    break
                logits = steps(token, position)
                position += 1
        finally:
            steps.close()
        return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1) if return_logits else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """Token ids must be in [0, vocab_size): the input embedding's rows."""
        return self.model.get_input_embeddings().num_embeddings

    def _inputs(self, context_ids: TokenIds, query_ids: TokenIds) -> tuple[torch.Tensor, torch.Tensor]:
        context = _as_batch(context_ids, "context_ids", self.device, self.vocab_size)
        query = _as_batch(query_ids, "query_ids", self.device, self.vocab_size)
        if context.shape[0] != query.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} != query batch {query.shape[0]}")
        if query.shape[1] < 1:
            raise ValueError("query_ids is empty: APB needs at least one query token")
        return context, query

    def _anchor_query(self, anchor_query_ids: TokenIds | None, query: torch.Tensor) -> torch.Tensor:
        if anchor_query_ids is None:
            return query
        anchor_query = _as_batch(anchor_query_ids, "anchor_query_ids", self.device, self.vocab_size)
        if anchor_query.shape[0] != query.shape[0]:
            raise ValueError(
                f"anchor_query_ids batch {anchor_query.shape[0]} != query batch {query.shape[0]}"
            )
        if anchor_query.shape[1] < 1:
            raise ValueError("anchor_query_ids is empty: pass None to splice query_ids into the anchor")
        return anchor_query

    def default_config(self, num_context: int, num_hosts: int, num_query: int = 0) -> APBConfig:
        """The config used when none is given: the paper's sizes for this length
        (`APBConfig.for_length`) with the layout the heads were trained for (the adapter's `apb` section:
        query_in_anchor, query_offset, pool_kernel, split) where it records them. Without heads the
        passing blocks are chosen by the training-free "query_attention" selector.

        A query of `num_query` tokens that the paper's anchor (block/4) cannot hold after query_offset
        gets a larger anchor, up to one host's block; when even that is too small (short contexts) the
        prefill passes everything, which is exact attention."""
        trained = dict(getattr(self.adapter_config, "apb", None) or {}) if self.heads is not None else {}
        layout = {
            k: trained[k] for k in ("query_in_anchor", "query_offset", "pool_kernel", "split") if k in trained
        }
        if self.heads is None:
            layout["selector"] = "query_attention"
        values = {**APBConfig.for_length(num_context, num_hosts).to_dict(), **layout}
        if not values["anchor_len"]:  # too short for an anchor (and then for a passing block)
            return APBConfig.exact()
        config = APBConfig.from_dict(values)
        need = config.query_offset + num_query
        if config.query_in_anchor and num_hosts > 1 and need > config.anchor_len:
            if need > num_context // num_hosts:
                return APBConfig.exact()
            config = APBConfig.from_dict({**values, "anchor_len": need})
        return config

    def plan(
        self, num_context: int, num_query: int, num_hosts: int | None = None, config: APBConfig | None = None
    ) -> HostPlan:
        """The `HostPlan` a prefill of `num_context` context and `num_query` query tokens runs:
        every host's block, anchor, passing count (`ValueError` when the inputs do not fit).
        `num_hosts` defaults to the world size inside torch.distributed, else 1."""
        if num_hosts is None:
            num_hosts = make_comm(None).num_hosts
        config = self._resolve_config(config, num_context, num_hosts, num_query)
        return HostPlan(config, num_context, num_query, num_hosts, cost=self.cost_model)

    @torch.no_grad()
    def host_times(
        self,
        num_context: int,
        num_hosts: int | None = None,
        *,
        num_query: int = 64,
        config: APBConfig | None = None,
        repeats: int = 2,
        progress: bool = False,
    ) -> list[tuple[float, float, float]]:
        """(tokens, pairs, seconds) of every host of APB prefills of random tokens under the equal split, at
        `num_context` and `num_context // 2` tokens: what `calibrate` fits. Tokens and pairs are the host's
        work (`HostPlan.work`); seconds the fastest of `repeats` timed runs after one untimed one.

        The hosts run one after another in this process (`num_hosts`: default the world size inside
        torch.distributed, else 4), so no host's time includes waiting for another. Inside torch.distributed
        every rank times them on its own device and the ranks average their times, so that all of them
        fit the same cost model (the ranks must agree on the split). `progress`: a progress bar over the
        prefills (on rank 0)."""
        comm = make_comm(None, self.device)  # inside torch.distributed: the ranks check their arguments agree
        distributed = comm.num_hosts > 1
        with comm.shared_refusal():
            if not is_int(repeats) or repeats < 1:
                raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
            if not is_int(num_query) or num_query < 0:
                raise ValueError(f"num_query must be an int >= 0, got {num_query!r}")
            if not is_int(num_context) or num_context < 2:
                raise ValueError(f"num_context must be an int >= 2, got {num_context!r}")
            if num_hosts is None:
                num_hosts = comm.num_hosts if distributed else 4
            plans = []
            for length in (num_context, num_context // 2):
                equal = dataclasses.replace(
                    self.plan(length, num_query, num_hosts, config).config, split="equal"
                )
                plans.append(HostPlan(equal, length, num_query, num_hosts))
        comm.check_agreement(
            {
                "calibrate.repeats": repeats,
                **{
                    f"calibrate.plan{i}": [plan.config.to_dict(), plan.blocks] for i, plan in enumerate(plans)
                },
            }
        )
        from tqdm.auto import tqdm

        generator = torch.Generator().manual_seed(0)
        samples = []
        bar = tqdm(
            total=len(plans) * (repeats + 1),
            desc="calibrate",
            unit="prefill",
            disable=not progress or (distributed and dist.get_rank() != 0),
        )
        last_plan = self.last_plan  # the user's last prefill, not these
        for plan in plans:
            context, query = (
                torch.randint(self.vocab_size, (1, size), generator=generator).to(self.device)
                for size in (plan.num_context, num_query)
            )
            best = [float("inf")] * num_hosts
            for run in range(repeats + 1):
                with self.recording() as record:
                    self._prefill_context(context, query, plan.config, SimulatedComm(num_hosts))
                if run:  # the first run compiles and warms up
                    best = [min(b, record.host_seconds[host]) for host, b in enumerate(best)]
                bar.update()
            samples += [
                (tokens, pairs, seconds) for (tokens, pairs), seconds in zip(plan.work(), best, strict=True)
            ]
        bar.close()
        self.last_plan = last_plan
        if distributed:
            seconds = torch.tensor([t for _, _, t in samples], dtype=torch.float64, device=self.device)
            dist.all_reduce(seconds)
            seconds /= dist.get_world_size()
            samples = [(n, p, t) for (n, p, _), t in zip(samples, seconds.tolist(), strict=True)]
        return samples

    def calibrate(
        self,
        num_context: int,
        num_hosts: int | None = None,
        *,
        num_query: int = 64,
        config: APBConfig | None = None,
        repeats: int = 2,
        apply: bool = True,
        progress: bool = False,
    ) -> Calibration:
        """Fit the balanced split's cost model to this device, backend and model: time every host
        (`host_times`), fit the rates of linear and attention work (`CostModel.fit`) and, with `apply`, use
        the result for the prefills that follow (`cost_model`). Time a context near the one you will run;
        the default attention weight (`apb.plan.MEASURED_ATTENTION_WEIGHT`) was fitted for FlashAttention-4
        on an H200. Runs 1 + `repeats` simulated prefills at `num_context` and as many at half of it (26-28 s
        at 128K with 8 hosts of the Llama-3.1-8B shape on an H200); a context too short for the hosts' work
        to dominate their fixed costs is refused (`CostModel.fit`). `progress`: a progress bar (rank 0).

            calibration = apbm.calibrate(131072)
            calibration.cost.attention_weight  # keep it: CostModel.from_model_config(config, attention_weight=w)
        """
        calibration = self.cost_model.fit(
            self.host_times(
                num_context, num_hosts, num_query=num_query, config=config, repeats=repeats, progress=progress
            )
        )
        logger.info(
            "calibrated the balanced split: linear work %.3g TFLOP/s, attention %.3g TFLOP/s, attention weight "
            "%.3f, fixed %.1f ms a host, fit within %.1f%%",
            calibration.linear_tflops,
            calibration.attention_tflops,
            calibration.cost.attention_weight,
            calibration.fixed_seconds * 1e3,
            calibration.max_error * 100,
        )
        if calibration.max_error > 0.1:
            logger.warning(
                "the calibration fits the host times only within %.0f%%: time a longer context",
                calibration.max_error * 100,
            )
        if apply:
            self.cost_model = calibration.cost
        return calibration

    def _resolve_config(
        self, config: APBConfig | None, num_context: int, num_hosts: int, num_query: int = 0
    ) -> APBConfig:
        if config is None:
            config = self.default_config(num_context, num_hosts, num_query)
        if not isinstance(config, APBConfig):
            raise TypeError(f"config must be an apb.APBConfig, got {type(config).__name__}")
        if config.needs_heads and self.heads is None:
            raise ValueError(
                f"passing_len={config.passing_len} selects passing blocks with retaining heads, but this model "
                "has none attached (APBModel(model, heads) / apb.load); without heads use "
                "selector='query_attention' (training-free), APBConfig.exact() (passing_len=None) or Star "
                "(passing_len=0)"
            )
        get_selector(config.selector)  # an unknown name is refused here, before any work
        return config

    def _prefill_context(
        self,
        context: torch.Tensor,
        anchor_query: torch.Tensor,
        config: APBConfig | None,
        comm: Communicator,
        query: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        oracle_scores: dict[int, torch.Tensor] | None = None,
    ) -> DecodeState:
        """`query` (run after the prefill) and `max_new_tokens` enter the ranks' agreement check and size the
        room kept after the last host's store for the tokens decoded on top of it."""
        with comm.shared_refusal():
            if self.model.config._attn_implementation != ATTN_NAME:
                raise RuntimeError(
                    "the model's APB attention was removed (APBModel.unload, or its attention implementation "
                    "was switched since apb.load): apb.load(model, ...) it again"
                )
            plan = self.plan(context.shape[1], anchor_query.shape[1], comm.num_hosts, config)
            config = plan.config
            backend = get_backend(config.backend, self.device)
            if config.selector == "oracle" and config.needs_selection and oracle_scores is None:
                raise ValueError(
                    "selector='oracle' is for evaluation only: pass oracle_scores="
                    "apb.recall.attention_mass(model, context_ids, query_ids)"
                )
            selector = get_selector(config.selector)
        comm.check_agreement(
            {
                "batch_size": context.shape[0],
                "context_len": context.shape[1],
                "query_len": None if query is None else query.shape[1],
                "anchor_query_len": anchor_query.shape[1],
                "context_sha256": _checksum(context),
                "query_sha256": None if query is None else _checksum(query),
                "anchor_query_sha256": _checksum(anchor_query),
                "has_heads": self.heads is not None,
                "max_new_tokens": max_new_tokens,
                "plan.blocks": plan.blocks,  # ranks whose cost models differ would split differently
                **{f"config.{key}": value for key, value in config.to_dict().items()},
            }
        )
        self._warn_past_max_positions(context.shape[1] + (0 if query is None else query.shape[1]))
        anchor = plan.anchor_ids(context, anchor_query)
        stores: dict[int, list[LayerKV]] = {}
        context_len = 0
        # the last host's store keeps room for the tokens decoded on top of it (query, then generated); a
        # generous max_new_tokens does not reserve memory up front: past the room the store doubles
        room = (0 if query is None else query.shape[1]) + min(max_new_tokens or 0, DECODE_ROOM)
        self.last_plan = plan
        record = self._record
        if record is not None:
            record.plan = plan
        last_layer = min(len(decoder_layers(self.model)), self.model.config.num_hidden_layers) - 1
        for host in comm.hosts:
            view = plan.hosts[host]
            ids, positions = plan.host_inputs(host, context, anchor)
            selects = config.needs_selection and view.passing_count > 0
            use_heads = selects and config.selector == "heads"
            state = PrefillState(
                host=host,
                num_anchor=view.num_anchor,
                counts=plan.counts,
                passing_all=config.passing_len is None,
                num_excluded=view.num_excluded,
                pool_kernel=config.pool_kernel,
                room=room if host == plan.num_hosts - 1 else 0,
                last_layer=last_layer,
                comm=comm,
                backend=backend,
                selector=selector if selects else None,
                anchor_visible=view.anchor_visible,
                shared_anchor=plan.shared_anchor_len,
                question_rows=plan.question_rows,
                block_start=view.block[0],
                heads=self.heads if use_heads else None,
                capture=self.capture if use_heads else None,
                oracle_scores=oracle_scores,
                record_indices=record is not None,
                exchange_marks=None if record is None else record.exchange_marks,
                regions=None if record is None else record.regions,
                clock=None if record is None else record.clock,
            )
            if record is not None:  # a host's time is only taken when asked: it costs two device syncs
                _sync(context.device)
                started = time.perf_counter()
            with contextlib.suppress(ContextStored):  # raised once the last layer's K/V are stored
                self._run_decoder(state, ids, positions, capture=use_heads)
            stores[host] = state.store
            if host == plan.num_hosts - 1:
                context_len = state.num_stored
            if record is not None:
                _sync(context.device)
                record.host_seconds[host] = time.perf_counter() - started
                record.passing[host] = state.passing_indices
                logger.debug(
                    "host %d prefill: %d tokens in %.3fs", host, ids.shape[1], record.host_seconds[host]
                )
        return DecodeState(stores=stores, last_host=plan.num_hosts - 1, comm=comm, context_len=context_len)

    def _warn_past_max_positions(self, num_tokens: int) -> None:
        """Warn (once per model) when a prefill runs positions the model's config says it was not made for."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if not isinstance(limit, int) or num_tokens <= limit or self._warned_positions:
            return
        self._warned_positions = True
        logger.warning(
            "a prefill of %d tokens runs positions past the model's max_position_embeddings (%d): the model "
            "was not trained on them, so expect worse answers than within that length (APB runs them as the "
            "model itself would; a model with RoPE scaling states its extended length there)",
            num_tokens,
            limit,
        )

    def _run_decoder(self, state, input_ids: torch.Tensor, positions: torch.Tensor, capture: bool = False):
        decoder = self.model.get_decoder()
        position_ids = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
        with activate(self.model.config, state):
            if capture:
                with self.capture.capturing():
                    return decoder(
                        input_ids=input_ids, position_ids=position_ids, use_cache=False
                    ).last_hidden_state
            return decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state

    def _run_tokens(self, decode: DecodeState, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Query / generated tokens at positions start.. on every host; hidden states [batch, t, hidden]."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        return self._run_decoder(decode, ids, positions)

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)


def _check_heads(shape: ModelShape, heads: RetainingHeads) -> None:
    theirs = getattr(heads, "shape", None)
    if not isinstance(heads, RetainingHeads) or theirs is None:
        raise ValueError(f"heads must be RetainingHeads, got {type(heads).__name__}")
    mismatched = [
        f"{field}: heads {getattr(theirs, field)} vs model {getattr(shape, field)}"
        for field in ("num_layers", "num_heads", "num_kv_heads", "head_dim")
        if getattr(theirs, field) != getattr(shape, field)
    ]
    if mismatched:
        raise ValueError(
            f"retaining heads were built for another model ({theirs.model_type} {theirs.name_or_path!r}) than "
            f"this {shape.model_type} {shape.name_or_path!r}: " + "; ".join(mismatched)
        )


def _check_finite(heads: RetainingHeads) -> None:
    """ValueError naming the first head tensor holding NaN or inf (`apb.load` refuses such a file already;
    this covers heads built or trained in memory)."""
    for key, tensor in heads.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            num_bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"retaining heads: tensor {key} holds {num_bad} NaN/inf value(s) of {tensor.numel()}; heads "
                "with such weights would pass arbitrary tokens (did the training diverge?)"
            )


def _is_nested(rows: Sequence[Any]) -> bool:
    """`rows` (a list) holds rows of ids rather than ids."""
    return (
        bool(rows)
        and not is_int(rows[0])
        and getattr(rows[0], "ndim", 1) != 0
        and hasattr(rows[0], "__len__")
    )


def _has_ragged_rows(ids: TokenIds | None) -> bool:
    """A list of rows (lists or 1-D tensors) whose lengths differ."""
    if ids is None or isinstance(ids, (torch.Tensor, str, bytes)) or not isinstance(ids, Sequence):
        return False
    return _is_nested(ids) and len({len(row) for row in ids}) > 1


def _rows(ids: TokenIds, name: str) -> list[Any]:
    """`ids` split into its rows (each [seq]); a single row is a batch of one."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            return [ids]
        if ids.dim() != 2:
            raise ValueError(f"{name} must be [seq] or [batch, seq], got shape {tuple(ids.shape)}")
        return list(ids.unbind(0))
    if isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)) and _is_nested(ids):
        return list(ids)
    return [ids]


def _pad_rows(rows: list[torch.Tensor], value: float | int, left: bool = False) -> torch.Tensor:
    """[1, steps_i, ...] tensors -> [len(rows), max steps, ...], padded with `value` on the right (or left)."""
    longest = max(row.shape[1] for row in rows)
    out = rows[0].new_full((len(rows), longest, *rows[0].shape[2:]), value)
    for i, row in enumerate(rows):
        if left:
            out[i, longest - row.shape[1] :] = row[0]
        else:
            out[i, : row.shape[1]] = row[0]
    return out


def _as_batch(ids: TokenIds, name: str, device: torch.device, vocab_size: int) -> torch.Tensor:
    """1-D or 2-D integer ids (tensor or lists) -> [batch, seq] long on `device`; rows must share a length.

    Float or bool ids are a `TypeError` (a cast would truncate 3.7 to 3 without a word); ids outside
    [0, vocab_size) a `ValueError`, both naming the argument."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(
            f"{name} must be token ids, got text {ids[:40]!r}; tokenize it first (tokenizer(text).input_ids)"
        )
    if isinstance(ids, torch.Tensor):
        tensor = ids
    else:
        try:
            rows = list(ids)
        except TypeError as err:
            raise TypeError(
                f"{name} must be token ids (a tensor or a list of ints), got {type(ids).__name__}"
            ) from err
        if _is_nested(rows):
            lengths = [len(r) for r in rows]
            if len(set(lengths)) > 1:
                raise ValueError(
                    f"{name}: batch rows have different lengths {lengths}; rows of one tensor "
                    "share a length (APBModel.prefill / generate take such rows as lists and run them one by one)"
                )
        try:
            tensor = torch.as_tensor(rows)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be integer token ids (a tensor or a list of ints): {err}") from err
        if tensor.numel() == 0:
            tensor = tensor.long()  # [] comes out float32
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer token ids, got {tensor.dtype}: a cast would silently truncate them "
            "(pass the tokenizer's ids, e.g. tokenizer(text, return_tensors='pt').input_ids)"
        )
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [seq] or [batch, seq], got shape {tuple(tensor.shape)}")
    if tensor.numel():
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{name} holds token id {low if low < 0 else high}, outside the model's vocabulary "
                f"[0, {vocab_size}) (a tokenizer of another model?)"
            )
    return tensor.to(device=device, dtype=torch.long)


def _checksum(ids: torch.Tensor) -> str:
    """SHA-256 of [batch, seq] long ids (16 hex digits: enough to tell inputs apart, short in a message),
    for the ranks' agreement check."""
    return hashlib.sha256(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
