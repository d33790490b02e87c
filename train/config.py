"""Run configuration: one YAML file read into typed dataclasses.

Unknown keys and bad values raise ``ValueError`` naming the key path (``optim.lrr``). The DeepSpeed
JSON is generated from this config (:meth:`RunConfig.deepspeed_config`): there is no second file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DTYPES = ("float32", "bfloat16", "float16")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {message}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The frozen base model."""

    name_or_path: str | None = None
    """Hub id or local folder of the base model; None with `from_config` for a random-weight model."""
    from_config: dict[str, Any] | None = None
    """Build a random-weight model from these `AutoConfig.for_model` kwargs (needs `model_type`)."""
    dtype: str = "bfloat16"
    """Base model weights' dtype: float32, bfloat16 or float16."""
    tokenizer: str | None = None
    """Tokenizer id/folder; None: `name_or_path`; `builtin:tiny`: the project's tiny test tokenizer."""
    seed: int = 0
    """Seed of the random init for `from_config` models."""
    hub_id: str | None = None
    """Hub repo id the exported adapter records as its base (`base_model_name_or_path`, model card);
    None: `name_or_path`. Set it when `name_or_path` is a local copy of a Hub model."""

    @property
    def base_name(self) -> str:
        """The base model's name in the adapter: `hub_id`, else `name_or_path`, else "" (from_config)."""
        return self.hub_id or self.name_or_path or ""

    def __post_init__(self) -> None:
        if self.hub_id is not None:
            from huggingface_hub.errors import HFValidationError
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(self.hub_id)
            except HFValidationError as err:
                raise ValueError(
                    f"model.hub_id: must be a Hub repo id (name or namespace/name), got {self.hub_id!r}"
                ) from err
        _check(
            (self.name_or_path is None) != (self.from_config is None),
            "model",
            "set exactly one of name_or_path and from_config",
        )
        if self.from_config is not None:
            _check("model_type" in self.from_config, "model.from_config", "needs a model_type")
        _check(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(
            self.tokenizer is not None or self.name_or_path is not None,
            "model.tokenizer",
            "required when the model is built from_config",
        )


@dataclass(kw_only=True, slots=True)
class HeadsConfig:
    """The retaining heads being trained."""

    hidden_size: int = 1024
    """fc1's output width (Locret: 1024)."""
    act: str | None = None
    """Activation; None: the base model's `hidden_act`."""
    init_std: float = 0.02
    """Std of the N(0, std^2) init."""

    def __post_init__(self) -> None:
        _check(self.hidden_size > 0, "heads.hidden_size", f"must be > 0, got {self.hidden_size}")
        _check(self.init_std > 0, "heads.init_std", f"must be > 0, got {self.init_std}")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Training samples and their APB layout."""

    sources: list[dict[str, Any]] = field(default_factory=list)
    """Where samples come from (at least one): `{path, field?, limit?}` for a local json/jsonl/parquet
    file, `{tasks?, num_samples, context_length, seed?, split?, haystack?}` for built-in synthetic
    tasks (`apb.data.sources`)."""
    max_length: int = 10240
    """Token budget of one laid-out sequence (anchor + block + question + answer)."""
    query_in_anchor: bool = True
    """Splice the question into the anchor (APB); False: Locret's query-agnostic layout."""
    anchor_len: int = 1024
    """Anchor block length in tokens."""
    block_len: int | None = None
    """Context tokens per block; None: all the context after the anchor that fits max_length."""
    query_offset: int = 16
    """Context tokens before the spliced question in the anchor."""
    min_block_len: int = 16
    """Samples whose block would be shorter are refused (before training starts)."""
    chat_template: bool = True
    """Wrap question/answer with the tokenizer's chat template when it has one."""
    seed: int = 0
    """Seed of the sampler's shuffling (and of synthetic generation)."""

    def resolved_sources(self) -> list[Any]:
        """The sources as `apb.data.sources.LocalSource` / `SyntheticSource` (ValueError naming the key)."""
        from apb.data.sources import source_from_dict

        resolved = []
        for i, spec in enumerate(self.sources):
            try:
                resolved.append(source_from_dict(spec))
            except ValueError as err:
                raise ValueError(f"data.sources[{i}]: {err}") from err
        return resolved

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "data.sources", "needs at least one source")
        self.resolved_sources()  # validates every source now
        _check(self.max_length > 0, "data.max_length", f"must be > 0, got {self.max_length}")
        _check(self.anchor_len >= 0, "data.anchor_len", f"must be >= 0, got {self.anchor_len}")
        _check(
            0 <= self.query_offset <= self.anchor_len,
            "data.query_offset",
            f"must be in [0, anchor_len={self.anchor_len}], got {self.query_offset}",
        )
        if self.block_len is not None:
            _check(self.block_len > 0, "data.block_len", f"must be > 0, got {self.block_len}")
        _check(self.min_block_len > 0, "data.min_block_len", f"must be > 0, got {self.min_block_len}")
        _check(
            self.anchor_len + self.min_block_len < self.max_length,
            "data.max_length",
            f"{self.max_length} leaves no room for anchor {self.anchor_len} + block {self.min_block_len}",
        )


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW with warmup then linear decay (Locret's recipe)."""

    lr: float = 5e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup optimizer steps."""
    max_steps: int | None = None
    """Optimizer steps in all; None: `epochs` passes over the data."""
    epochs: int = 1
    """Passes over the data when max_steps is None."""
    micro_batch_size: int = 1
    """Samples per forward per rank (1: sequences differ in length and are not padded)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 1.0
    """Max global gradient norm (0: off)."""
    smooth_weight: float = 0.0025
    """Weight of the smoothness term of the loss."""
    label_chunk_elements: int = 1 << 26
    """Label scores formed at once (memory bound of the label computation)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"must be two values in [0, 1), got {self.betas}",
        )
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.max_steps is not None:
            _check(self.max_steps > 0, "optim.max_steps", f"must be > 0, got {self.max_steps}")
            _check(
                self.warmup_steps <= self.max_steps,
                "optim.warmup_steps",
                f"{self.warmup_steps} is more than optim.max_steps ({self.max_steps})",
            )
        _check(self.epochs > 0, "optim.epochs", f"must be > 0, got {self.epochs}")
        _check(self.micro_batch_size == 1, "optim.micro_batch_size", "only 1 is supported (use grad_accum)")
        _check(self.grad_accum > 0, "optim.grad_accum", f"must be > 0, got {self.grad_accum}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.smooth_weight >= 0, "optim.smooth_weight", f"must be >= 0, got {self.smooth_weight}")
        _check(self.label_chunk_elements > 0, "optim.label_chunk_elements", "must be > 0")


@dataclass(kw_only=True, slots=True)
class DeepSpeedConfig:
    """DeepSpeed settings; the engine's JSON is generated from these."""

    zero_stage: int = 0
    """ZeRO stage of the heads' optimizer (0-3). Stage 3 also shards the frozen base across ranks."""
    bf16: bool = True
    """Train the heads in bf16 with fp32 master weights (the base runs in model.dtype)."""
    offload_optimizer: bool = False
    """Keep the heads' optimizer state on the CPU (ZeRO >= 1)."""
    offload_param: bool = False
    """Keep the base's parameters on the CPU between uses (ZeRO-3 only)."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0-3, got {self.zero_stage}")
        _check(
            not self.offload_optimizer or self.zero_stage >= 1,
            "deepspeed.offload_optimizer",
            "needs zero_stage >= 1",
        )
        _check(
            not self.offload_param or self.zero_stage == 3, "deepspeed.offload_param", "needs zero_stage 3"
        )


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """Console and TensorBoard logging (rank 0 only)."""

    every: int = 1
    """Log every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard events under <output_dir>/tensorboard."""
    tqdm: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        _check(self.every > 0, "logging.every", f"must be > 0, got {self.every}")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Periodic checkpoints of heads, optimizer, scheduler, sampler and RNG states."""

    every: int = 100
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted."""
    resume: bool = True
    """Resume from the newest checkpoint in <output_dir>/checkpoints if there is one."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}")
        _check(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True, slots=True)
class ExportConfig:
    """The adapter written at the end."""

    folder: str | None = None
    """Adapter folder; None: <output_dir>/adapter."""
    push_to_hub: str | None = None
    """Hub repo id (`user/name`) to push the adapter to; None: no push."""
    private: bool = True
    """Create the Hub repo as private."""

    def __post_init__(self) -> None:
        if self.push_to_hub is not None:
            _check(
                self.push_to_hub.count("/") == 1,
                "export.push_to_hub",
                f"must be user/name, got {self.push_to_hub!r}",
            )


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """A whole training run."""

    output_dir: str
    """Run folder: resolved config, checkpoints, TensorBoard events, metrics.jsonl, adapter."""
    seed: int = 0
    """Seed of everything random in training (heads' init, RNG state)."""
    model: ModelConfig
    """The frozen base model."""
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    """The retaining heads."""
    data: DataConfig
    """Samples and layout."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Adapter export."""

    @property
    def adapter_folder(self) -> Path:
        return Path(self.export.folder) if self.export.folder else Path(self.output_dir) / "adapter"

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def deepspeed_config(self, world_size: int) -> dict[str, Any]:
        """The DeepSpeed JSON of the heads' engine."""
        ds = self.deepspeed
        zero: dict[str, Any] = {"stage": ds.zero_stage}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if ds.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        return {
            "train_micro_batch_size_per_gpu": self.optim.micro_batch_size,
            "gradient_accumulation_steps": self.optim.grad_accum,
            "train_batch_size": self.optim.micro_batch_size * self.optim.grad_accum * world_size,
            "gradient_clipping": self.optim.grad_clip,
            "bf16": {"enabled": ds.bf16},
            "zero_optimization": zero,
            "steps_per_print": 10**9,  # our own logger prints each step
            "wall_clock_breakdown": False,
        }

    def base_deepspeed_config(self, world_size: int) -> dict[str, Any]:
        """The DeepSpeed JSON of the frozen base's inference engine (ZeRO-3 only: parameter sharding)."""
        zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
        if self.deepspeed.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        return {
            "train_micro_batch_size_per_gpu": 1,
            "train_batch_size": world_size,
            "bf16": {"enabled": self.model.dtype == "bfloat16"},
            "fp16": {"enabled": self.model.dtype == "float16"},
            "zero_optimization": zero,
            "steps_per_print": 10**9,
        }


# ------------------------------------------------------------------------------------ YAML -> dataclasses


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{key}: must not be null")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ValueError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args if a is not type(None))
        raise ValueError(f"{key}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads `5e-4` (no dot) as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {hint!r}")  # our own bug, not the user's


RENAMED_KEYS = {"query_aware": "query_in_anchor"}
"""Keys of earlier versions and their names now (one name for one setting across the project)."""


def _build(cls: type, data: Any, key: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{key or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = ", ".join(f"{key}.{u}" if key else u for u in unknown)
        renamed = "".join(f" ({u} is now {RENAMED_KEYS[u]})" for u in unknown if u in RENAMED_KEYS)
        raise ValueError(f"unknown config key {where}{renamed}; known keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{key}.{name}" if key else name)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing config key {', '.join(f'{key}.{m}' if key else m for m in missing)}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - guarded by the checks above
        raise ValueError(f"{key or 'config'}: {err}") from err


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from parsed YAML (ValueError naming the key on any problem)."""
    return _build(RunConfig, data, "")


_KEY_PART = re.compile(r"([A-Za-z_]\w*)((?:\[\d+\])*)")
OVERRIDE_SYNTAX = "dotted names with [index] for list elements, e.g. data.sources[0].num_samples"


def _parse_key(dotted: str) -> list[str | int]:
    """`data.sources[0].num_samples` -> ["data", "sources", 0, "num_samples"]."""
    steps: list[str | int] = []
    for part in dotted.split("."):
        match = _KEY_PART.fullmatch(part)
        if match is None:
            hint = f" (write a list element as name[{part}])" if part.isdigit() else ""
            raise ValueError(f"bad config key {dotted!r}{hint}: expected {OVERRIDE_SYNTAX}")
        steps.append(match.group(1))
        steps += [int(i) for i in re.findall(r"\d+", match.group(2))]
    return steps


def _strip_none(hint: Any) -> Any:
    """`X | None` -> X; any other union -> Any (the override is checked when the config is built)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return hint


def _is_sequence(hint: Any) -> bool:
    return hint is Any or typing.get_origin(hint) in (list, tuple)


def _hint_name(hint: Any) -> str:
    return getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


def _missing_child(cls: Any, name: str, next_step: str | int) -> Any:
    """The container to create for a key absent from the YAML: a copy of the field's default list or
    tuple when an index follows (so `optim.betas[1]` works without betas in the file), else a mapping."""
    if not isinstance(next_step, int):
        return {}
    if dataclasses.is_dataclass(cls):
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, (list, tuple)):
            return list(default)
    return []


def set_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set one `--set` key in parsed YAML `data`, in place.

    Keys are dotted names with `[i]` for list elements (`data.sources[0].num_samples`). A name that is
    not a config key, an index into something that is not a list and an index out of range are
    ValueErrors naming the key; values are checked later, when the config is built.
    """
    steps = _parse_key(dotted)
    node: Any = data
    hint: Any = RunConfig
    path = ""
    for pos, step in enumerate(steps):
        hint = _strip_none(hint)
        last = pos == len(steps) - 1
        if isinstance(step, str):
            key = f"{path}.{step}" if path else step
            if dataclasses.is_dataclass(hint):
                names = [f.name for f in dataclasses.fields(hint)]
                if step not in names:
                    raise ValueError(f"unknown config key {key}; known keys here: {', '.join(names)}")
                child_hint = typing.get_type_hints(hint)[step]
            elif hint is Any or typing.get_origin(hint) is dict:
                child_hint = Any
            else:
                raise ValueError(
                    f"unknown config key {key}: {path} is not a section (type {_hint_name(hint)})"
                )
            if not isinstance(node, dict):
                raise ValueError(f"{path}: expected a mapping to set {key} in, got {node!r}")
            if last:
                node[step] = value
                return
            if node.get(step) is None:
                node[step] = _missing_child(hint, step, steps[pos + 1])
            child = node[step]
        else:
            key = f"{path}[{step}]"
            if not _is_sequence(hint) or not isinstance(node, list):
                what = _hint_name(hint) if not _is_sequence(hint) else type(node).__name__
                raise ValueError(f"{key}: {path} is not a list (type {what}); only lists take an [index]")
            if step >= len(node):
                raise ValueError(
                    f"{key}: index out of range ({path} has {len(node)} element(s)); "
                    f"set the whole list with {path}=[...]"
                )
            args = typing.get_args(hint)
            child_hint = args[0] if typing.get_origin(hint) is list else Any
            if last:
                node[step] = value
                return
            if node[step] is None:
                node[step] = [] if isinstance(steps[pos + 1], int) else {}
            child = node[step]
        node, hint, path = child, child_hint, key


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config; `overrides` maps keys (`optim.max_steps`, `data.sources[0].num_samples`)
    to values (see :func:`set_override`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping at the top, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        set_override(data, dotted, value)
    return config_from_dict(data)


def _read_yaml(path: Path) -> Any:
    """Parsed YAML of `path`; ValueError naming the file and line of a syntax error."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"config file {path}{where}: not valid YAML ({problem})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path}: not UTF-8 text ({err})") from err


# ------------------------------------------------------------------------------------------ rerun safety

RERUN_FREE = ("output_dir", "logging.", "checkpoint.", "export.", "model.hub_id", "deepspeed.offload_param")
"""Keys a rerun may change: they change nothing the checkpoints hold (also `data.sources[i].workers`,
`optim.label_chunk_elements`)."""
RERUN_APPLIED = (
    "optim.lr",
    "optim.warmup_steps",
    "optim.max_steps",
    "optim.epochs",
    "optim.betas",
    "optim.weight_decay",
    "optim.eps",
    "optim.grad_clip",
    "optim.grad_accum",
    "optim.smooth_weight",
)
"""Keys a rerun may change and a resume applies from its step on (recorded in the adapter's training
record as `config_changes`). Every other key (seed, model, heads, data, the ZeRO stage, bf16,
offload_optimizer) describes what the checkpoints are: a change is refused."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (list, tuple)) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def _rerun_kind(key: str) -> str:
    """ "free", "applied" or "refused" for a flattened key."""
    if key.startswith(RERUN_FREE) or key == "optim.label_chunk_elements":
        return "free"
    if re.fullmatch(r"data\.sources\[\d+\]\.workers", key):
        return "free"
    if any(key == k or key.startswith(k + "[") for k in RERUN_APPLIED):
        return "applied"
    return "refused"


def _renamed(data: Any) -> Any:
    """`data` with the keys of earlier versions (RENAMED_KEYS) under their names now."""
    if isinstance(data, dict):
        return {RENAMED_KEYS.get(k, k) if isinstance(k, str) else k: _renamed(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_renamed(v) for v in data]
    return data


def check_rerun(config: RunConfig, output_dir: str | Path | None = None) -> dict[str, tuple[Any, Any]]:
    """Compare `config` with the config.yaml of an existing run in `output_dir` (default: its own).

    Reads only. Returns the changed keys a resume applies (``{key: (old, new)}``, see RERUN_APPLIED);
    a change of any key that describes the checkpoints (model, heads, data, seed, ZeRO stage, ...) is a
    ValueError naming every such key, old and new value. No config.yaml: a new run, ``{}``.
    """
    folder = Path(output_dir if output_dir is not None else config.output_dir)
    path = folder / "config.yaml"
    if not path.is_file():
        return {}
    saved = _read_yaml(path)
    if not isinstance(saved, dict):
        raise ValueError(
            f"{path}: not a run config (expected a mapping); is {folder} another program's folder?"
        )
    # Keys renamed since, and defaults filled in, as this version writes them; a config written by a
    # version this one cannot read is compared as it is.
    with contextlib.suppress(ValueError):
        saved = config_from_dict(_renamed(saved)).to_dict()
    old, new = _flatten(saved), _flatten(config.to_dict())
    missing = object()
    applied: dict[str, tuple[Any, Any]] = {}
    refused = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, missing), new.get(key, missing)
        if before == after:
            continue
        kind = _rerun_kind(key)
        if kind == "applied":
            applied[key] = (before, after)
        elif kind == "refused":
            show = [("absent" if v is missing else repr(v)) for v in (before, after)]
            refused.append(f"{key}: {show[0]} -> {show[1]}")
    if refused:
        raise ValueError(
            f"{folder} holds a run with another config ({path}); resuming it cannot honour these changes:\n  "
            + "\n  ".join(refused)
            + "\nUse another output_dir for the new settings, or restore them to continue that run"
        )
    return {key: applied[key] for key in applied}


def save_resolved(config: RunConfig, folder: str | Path) -> Path:
    """Write the resolved config (every default filled in) as config.yaml and the DeepSpeed JSON."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    tmp = folder / f".config.yaml.{os.getpid()}.tmp"
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    os.replace(tmp, path)  # a run killed here leaves the old config.yaml or the new one, never half
    return path


def dump_deepspeed(config: RunConfig, folder: str | Path, world_size: int) -> Path:
    path = Path(folder) / "deepspeed.json"
    path.write_text(json.dumps(config.deepspeed_config(world_size), indent=2, sort_keys=True))
    return path
