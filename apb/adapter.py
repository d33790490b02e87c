"""The adapter format: retaining heads saved in PEFT's shape, and strict loading of them.

An adapter is a folder with

- ``adapter_config.json``: an :class:`AdapterConfig` (sorted keys): format and library version, the base
  model it was trained on and its shape, the heads' hidden size and activation, the APB defaults the
  heads were trained for, and a free ``training`` section;
- ``adapter_model.safetensors``: only the head weights, contiguous, metadata ``{"format": "pt"}``,
  keys ``layers.{i}.fc1.weight`` / ``layers.{i}.fc2.weight`` (``RetainingHeads.state_dict()``);
- ``README.md``: a model card (YAML front matter with ``library_name``, ``base_model``, ``tags``).

:func:`load_heads` also reads a Hub repo id (through ``huggingface_hub.snapshot_download``) and the
legacy Locret/APB ``.bin`` checkpoints. Loading is strict: every difference between the adapter and the
model is collected and reported in one ``ValueError`` (the reference loaders use ``strict=False`` and
silently keep random heads when a key does not match).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from apb.heads import ModelShape, RetainingHeads, decoder_layers

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the adapter folder layout this library writes and reads."""
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "apb-retain"

_LEGACY_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(fc1|fc2)\.weight$")
_MAX_LISTED_DIFFERENCES = 40


def _library_version() -> str:
    import apb  # late: apb/__init__ imports this module

    return apb.__version__


@dataclasses.dataclass(kw_only=True, slots=True)
class AdapterConfig:
    """Contents of ``adapter_config.json``: what the heads are and which base model they fit."""

    format_version: int = FORMAT_VERSION
    """Adapter layout version; a newer one than this library knows is refused."""
    library_version: str = dataclasses.field(default_factory=_library_version)
    """`apb.__version__` of the library that wrote the adapter."""
    base_model_name_or_path: str = ""
    """Hub id or path of the base model the heads were trained on (informational)."""
    model_type: str
    """`config.model_type` of the base model; loading into another model type is refused."""
    num_layers: int
    """Decoder layers of the base model: one head each."""
    num_heads: int
    """Query heads per layer of the base model."""
    num_kv_heads: int
    """KV heads per layer of the base model: one score each."""
    head_dim: int
    """Width of one attention head of the base model."""
    head_hidden_size: int
    """Hidden width of each retaining head (fc1's output, fc2's input)."""
    head_act: str
    """Activation between fc1 and fc2 (a `transformers.activations.ACT2FN` name)."""
    apb: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The `apb.APBConfig` the heads were trained for, as a dict (`APBConfig.to_dict`); `apb.load` takes
    its layout (query_in_anchor, query_offset, pool_kernel, split) as the default."""
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Free-form record of the training run (config, data, steps)."""

    def __post_init__(self) -> None:
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise ValueError(f"format_version must be a positive int, got {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is newer than this apb-retain "
                f"({_library_version()}) reads (<= {FORMAT_VERSION}): upgrade apb-retain"
            )
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "head_hidden_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for key in ("model_type", "head_act"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"{key} must be a non-empty string, got {getattr(self, key)!r}")
        for key in ("apb", "training"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"{key} must be a dict, got {type(getattr(self, key)).__name__}")
            try:
                json.dumps(getattr(self, key))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{key} must be JSON-serialisable ({err})") from err

    @classmethod
    def from_heads(
        cls,
        heads: RetainingHeads,
        *,
        base_model_name_or_path: str | None = None,
        apb_defaults: Any = None,  # a mapping or a config dataclass (apb.APBConfig)
        training: Mapping[str, Any] | None = None,
    ) -> AdapterConfig:
        """The config describing `heads` (their shape, hidden size and activation)."""
        shape = heads.shape
        return cls(
            base_model_name_or_path=base_model_name_or_path or shape.name_or_path,
            model_type=shape.model_type,
            num_layers=shape.num_layers,
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            head_hidden_size=heads.hidden_size,
            head_act=heads.act_name,
            apb=_plain_dict(apb_defaults),
            training=dict(training or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Build from a parsed ``adapter_config.json``.

        Unknown keys (written by a newer version) are dropped with a warning; missing required keys
        raise ``ValueError`` naming them.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            logger.warning(
                "adapter_config.json: ignoring unknown keys %s (written by a newer version?)", unknown
            )
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"adapter_config.json: missing required keys {missing}")
        return cls(**{k: v for k, v in data.items() if k in fields})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AdapterConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return cls.from_dict(data)


def _plain_dict(settings: Any) -> dict[str, Any]:
    """A mapping or a dataclass instance (e.g. `apb.APBConfig`) as a plain dict; None -> {}."""
    if settings is None:
        return {}
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return dataclasses.asdict(settings)
    return dict(settings)


# ---------------------------------------------------------------------------------------------- saving


def _heads_of(obj: Any) -> RetainingHeads:
    """`obj` itself if it is a RetainingHeads, else its `.heads` (an APBModel or a trainer's wrapper)."""
    if isinstance(obj, RetainingHeads):
        return obj
    heads = getattr(obj, "heads", None)
    if isinstance(heads, RetainingHeads):
        return heads
    raise ValueError(
        f"expected RetainingHeads or an object with a `.heads` RetainingHeads attribute, got {type(obj).__name__}"
    )


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def looks_like_hub_id(name: str, *, namespace: bool = True) -> bool:
    """`namespace/name` (or, with ``namespace=False``, also a bare `name`) as the Hub spells it, and not a
    path: no leading '.', '/', '~', no file suffix of ours, no OS path separator."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    slashes = name.count("/")
    if slashes > 1 or (namespace and slashes != 1) or name.startswith((".", "/", "~")):
        return False
    if name.endswith((".bin", ".pt", ".pth")) or (os.sep != "/" and os.sep in name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_card(config: AdapterConfig, metrics: Mapping[str, Any] | None = None) -> str:
    """The adapter's README.md: YAML front matter for the Hub, then what the heads are and how to use them."""
    front: dict[str, Any] = {"library_name": LIBRARY_NAME}
    base = config.base_model_name_or_path
    if base and looks_like_hub_id(base):
        front["base_model"] = base  # the Hub only accepts repo ids here, not local paths
    front["tags"] = ["apb", "retaining-heads", "long-context", "kv-cache-compression", config.model_type]
    num_params = (
        config.num_layers
        * config.head_hidden_size
        * ((config.num_heads + 2 * config.num_kv_heads) * config.head_dim + config.num_kv_heads)
    )
    base_text = f"`{base}`" if base else f"a `{config.model_type}` model"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# Retaining heads for {base or config.model_type}",
        "",
        f"Retaining heads (Locret, arXiv 2410.01805) for {base_text}, trained on the frozen base model with "
        f"[{LIBRARY_NAME}]. One small MLP per decoder layer, `fc2({config.head_act}(fc1(cat(q, k, v))))`, "
        "reads a token's own pre-RoPE query/key/value projections and scores how much its KV-cache entry "
        "will matter; APB (arXiv 2502.12085) uses the scores to choose the passing block each host sends "
        "to the hosts after it during sequence-parallel prefill. The base model's weights are not changed.",
        "",
        f"- base model type: `{config.model_type}`, {config.num_layers} layers, {config.num_heads} query / "
        f"{config.num_kv_heads} KV heads, head dim {config.head_dim}",
        f"- heads: fc1 {(config.num_heads + 2 * config.num_kv_heads) * config.head_dim} -> "
        f"{config.head_hidden_size}, fc2 {config.head_hidden_size} -> {config.num_kv_heads}, "
        f"{num_params / 1e6:.1f}M parameters",
        f"- files: `{CONFIG_NAME}`, `{WEIGHTS_NAME}` (apb-retain adapter format {config.format_version}, "
        f"written by apb-retain {config.library_version})",
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM",
        "import apb",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{base or "<base model>"}", dtype=torch.bfloat16)',
        'model = apb.load(model, "<this repo id or folder>")',
        "```",
    ]
    if config.apb:
        lines += ["", "## APB settings the heads were trained for", "", "```json"]
        lines += [json.dumps(config.apb, sort_keys=True, indent=2), "```"]
    if config.training:
        lines += [
            "",
            "## Training",
            "",
            "```json",
            json.dumps(config.training, sort_keys=True, indent=2),
            "```",
        ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {_format_metric(value)} |" for name, value in metrics.items()]
    return "\n".join(lines) + "\n"


def _format_metric(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_adapter(
    heads: RetainingHeads,
    folder: str | os.PathLike,
    config: AdapterConfig,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write the three adapter files into `folder` from this process (no rank check: see `save_adapter`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in heads.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config.save(folder)
    (folder / CARD_NAME).write_text(model_card(config, metrics), encoding="utf-8")
    return folder


def save_adapter(
    heads_or_model: Any,
    folder: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    apb_defaults: Any = None,  # a mapping or a config dataclass (apb.APBConfig)
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Save retaining heads as an adapter folder (config, safetensors weights, model card).

    `heads_or_model` is a `RetainingHeads` or an object holding one as `.heads` (an APB model).
    Under `torch.distributed`, only rank 0 writes and every rank waits for it at a barrier; with
    ZeRO-3 the caller gathers the parameters first. Returns the folder on every rank.
    """
    heads = _heads_of(heads_or_model)
    folder = Path(folder)
    if _is_main_process():
        config = AdapterConfig.from_heads(
            heads,
            base_model_name_or_path=base_model_name_or_path,
            apb_defaults=apb_defaults,
            training=training,
        )
        write_adapter(heads, folder, config, metrics)
        logger.info("saved retaining heads adapter to %s", folder)
    _barrier()
    return folder


# --------------------------------------------------------------------------------------------- loading


def resolve_adapter(
    adapter: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder or `.bin` file for `adapter`: the path itself if it exists, else a Hub download.

    Hub ids go through `huggingface_hub.snapshot_download` (cache, `HF_HUB_OFFLINE`, `revision`, `token`);
    only the adapter's two files are fetched.
    """
    path = Path(adapter).expanduser()
    if path.exists():
        if revision is not None:
            logger.warning("revision=%r ignored: %s is a local path", revision, path)
        return path
    name = str(adapter)
    if not looks_like_hub_id(name):
        raise FileNotFoundError(
            f"adapter {name!r}: no such file or folder, and not a Hub repo id of the form 'namespace/name'"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # constants.HF_HUB_OFFLINE is read from the environment when huggingface_hub is imported; also
    # honour the variable when it was set later in this process.
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {
        "1",
        "ON",
        "YES",
        "TRUE",
    }
    try:
        folder = snapshot_download(
            name,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=offline,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"adapter {name!r} (revision {revision or 'main'}): not a local path, and not in the Hub cache"
            + (" (HF_HUB_OFFLINE is set)" if offline else " and the Hub could not be reached")
        ) from err
    return Path(folder)


def _expected_vs_found(model_shape: ModelShape, config: AdapterConfig) -> list[str]:
    problems = []
    for key, expected in (
        ("model_type", model_shape.model_type),
        ("num_layers", model_shape.num_layers),
        ("num_heads", model_shape.num_heads),
        ("num_kv_heads", model_shape.num_kv_heads),
        ("head_dim", model_shape.head_dim),
    ):
        found = getattr(config, key)
        if found != expected:
            problems.append(f"{key}: expected {expected!r} (the model), found {found!r} (the adapter)")
    return problems


def _check_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], problems: list[str]
) -> None:
    """Append one line per missing key, extra key and mis-shaped tensor of `state` against `expected`."""

    def layer_order(key: str) -> tuple[int, str]:
        match = re.match(r"layers\.(\d+)\.(.*)", key)
        return (int(match.group(1)), match.group(2)) if match else (-1, key)

    for key in sorted(set(expected) - set(state), key=layer_order):
        problems.append(f"missing {key}: expected shape {list(expected[key].shape)}, found nothing")
    for key in sorted(set(state) - set(expected), key=layer_order):
        problems.append(
            f"unexpected key {key} (shape {list(state[key].shape)}): the model has no such head weight"
        )
    for key in sorted(set(state) & set(expected), key=layer_order):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"{key}: expected shape {list(expected[key].shape)}, found {list(state[key].shape)}"
            )


def _raise_if(problems: list[str], source: str) -> None:
    if not problems:
        return
    shown = problems[:_MAX_LISTED_DIFFERENCES]
    more = len(problems) - len(shown)
    message = f"adapter {source} does not fit the model ({len(problems)} difference(s)):\n  " + "\n  ".join(
        shown
    )
    if more:
        message += f"\n  ... and {more} more"
    raise ValueError(message)


def check_finite(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """ValueError naming the first tensor of `state` holding NaN or inf (a damaged file loads as such)."""
    for key in sorted(state):
        tensor = state[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            num_bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{source}: tensor {key} holds {num_bad} NaN/inf value(s) of {tensor.numel()}; the file is "
                "damaged (or the training diverged): heads with such weights would pass arbitrary tokens"
            )


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file of head weights: ValueError naming the file if it is truncated or damaged, and
    naming the tensor if one holds NaN or inf."""
    from safetensors import SafetensorError

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({err}); it may be truncated: download or export it again"
        ) from err
    if not state:
        raise ValueError(f"{path}: holds no tensors")
    check_finite(state, path)
    return state


def _read_legacy_bin(path: Path) -> dict[str, torch.Tensor]:
    """A Locret/APB `.bin` checkpoint, renamed to our keys; the only place a pickle is read."""
    import pickle

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"legacy adapter {path}: not a readable torch checkpoint of tensors ({first})"
        ) from err
    if not isinstance(raw, Mapping):
        raise ValueError(f"legacy adapter {path}: expected a dict of tensors, found {type(raw).__name__}")
    renamed = {}
    for key, tensor in raw.items():
        match = _LEGACY_KEY.match(key)
        # Keys that are not head weights keep their name and are reported as unexpected.
        renamed[f"layers.{match.group(1)}.{match.group(2)}.weight" if match else key] = tensor
    return renamed


def load_heads(
    model: nn.Module,
    adapter: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[RetainingHeads, AdapterConfig]:
    """Load retaining heads for `model` from an adapter folder, a Hub repo id, or a legacy `.bin`.

    Strict: a model type or shape that differs from the adapter's, a missing layer, an extra key or a
    tensor of the wrong shape raises one `ValueError` listing every difference (expected vs found).
    A legacy `.bin` has no config: its hidden size is read from fc1's shape, its activation is the
    model's `hidden_act`. The heads keep the stored dtype unless `dtype` is given, and each layer's
    head is placed on the device of that layer's attention.
    """
    shape = ModelShape.from_model(model)
    path = resolve_adapter(adapter, revision=revision, token=token, cache_dir=cache_dir)
    problems: list[str] = []
    if path.is_file():
        if path.suffix not in {".bin", ".pt", ".pth"}:
            raise ValueError(
                f"adapter {path}: a file must be a legacy Locret/APB .bin checkpoint; "
                f"an apb-retain adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        state = _read_legacy_bin(path)
        check_finite(state, path)
        fc1 = next((t for k, t in sorted(state.items()) if k.endswith(".fc1.weight") and t.dim() == 2), None)
        if fc1 is None:
            raise ValueError(
                f"legacy adapter {path}: no model.layers.{{i}}.self_attn.fc1.weight found to size the heads "
                f"(keys: {sorted(state)[:8]})"
            )
        config = AdapterConfig(
            base_model_name_or_path=shape.name_or_path,
            model_type=shape.model_type,
            num_layers=shape.num_layers,
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            head_hidden_size=fc1.shape[0],
            head_act=shape.hidden_act,
            training={"source": f"legacy checkpoint {path.name}"},
        )
    else:
        missing_files = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
        if missing_files:
            raise FileNotFoundError(f"adapter folder {path}: missing {', '.join(missing_files)}")
        config = AdapterConfig.from_file(path / CONFIG_NAME)
        problems += _expected_vs_found(shape, config)
        state = read_weights(path / WEIGHTS_NAME)
        with safe_open(path / WEIGHTS_NAME, framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
        if fmt not in (None, "pt"):
            problems.append(f"{WEIGHTS_NAME} metadata format: expected 'pt', found {fmt!r}")

    heads = RetainingHeads(shape, hidden_size=config.head_hidden_size, act=config.head_act)
    _check_state_dict(state, heads.state_dict(), problems)
    _raise_if(problems, str(adapter))

    stored_dtype = next(iter(state.values())).dtype
    heads.to(dtype=dtype or stored_dtype)
    heads.load_state_dict(state, strict=True)
    for head, layer in zip(heads.layers, decoder_layers(model), strict=True):
        head.to(layer.self_attn.q_proj.weight.device)
    logger.info(
        "loaded retaining heads from %s (%d layers, hidden %d)", path, shape.num_layers, heads.hidden_size
    )
    return heads, config
