"""Retaining heads (Locret, arXiv 2410.01805) and their attachment to an unmodified transformers model.

A retaining head is a two-layer MLP per decoder layer that reads a token's own pre-RoPE projections
``cat(q, k, v)`` and predicts, for each KV head, how much that token's KV entry will matter later:
``score = fc2(act(fc1(cat(q, k, v))))``.

The heads never touch the base model's computation: forward hooks on the attention projections copy
the projections out (only while a :class:`ProjectionCapture` is enabled) and return ``None``, so the
model's outputs are bit-identical with or without heads attached.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

# Model types whose attention blocks have the shape the heads need: separate q/k/v projections,
# grouped-query attention, RoPE applied inside the attention module. Yi checkpoints are model_type
# "llama". Anything else is refused with a message that says what is missing.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelShape:
    """The facts about a base model that retaining heads depend on."""

    model_type: str
    """`config.model_type` of the base model (`llama`, `mistral`, `qwen2`, `qwen3`)."""
    num_layers: int
    """Number of decoder layers: one retaining head each."""
    num_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """Key/value heads per layer (GQA groups); a head outputs one score per KV head."""
    head_dim: int
    """Width of one attention head."""
    hidden_act: str
    """The base model's MLP activation; the heads' default activation."""
    name_or_path: str = ""
    """`config._name_or_path`, for adapter metadata."""

    @property
    def input_size(self) -> int:
        """Width of ``cat(q, k, v)``: ``(num_heads + 2 * num_kv_heads) * head_dim``."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelShape:
        """Read the shape of a supported causal LM; `ValueError` naming what is missing otherwise."""
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"{type(model).__name__} has no `config`: expected a transformers model")
        model_type = getattr(config, "model_type", "<none>")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported by retaining heads; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Yi checkpoints are 'llama')"
            )
        layers = decoder_layers(model)
        missing = [
            name
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")
            if not hasattr(getattr(layers[0], "self_attn", None), name)
        ]
        if missing:
            raise ValueError(
                f"model_type {model_type!r}: decoder layer 0 has no self_attn.{', self_attn.'.join(missing)}; "
                "retaining heads need separate q/k/v projections"
            )
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"model_type {model_type!r}: num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        return cls(
            model_type=model_type,
            num_layers=len(layers),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            hidden_act=getattr(config, "hidden_act", "silu"),
            name_or_path=getattr(config, "_name_or_path", "") or "",
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (`model.model.layers`) or of a bare decoder (`model.layers`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"model_type {model_type!r}: no decoder `layers` ModuleList found")
    return layers


class RetainingHead(nn.Module):
    """One layer's head: ``fc2(act(fc1(cat(q, k, v))))``."""

    def __init__(self, input_size: int, hidden_size: int, num_kv_heads: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size, bias=False)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden_size, num_kv_heads, bias=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [batch, seq, num_heads*head_dim], k, v: [batch, seq, num_kv_heads*head_dim]
        -> scores: [batch, seq, num_kv_heads] (raw, unnormalised)."""
        x = torch.cat([q, k, v], dim=-1).to(self.fc1.weight.dtype)
        return self.fc2(self.act(self.fc1(x)))


class RetainingHeads(nn.Module):
    """All layers' heads. State-dict keys: ``layers.{i}.fc1.weight``, ``layers.{i}.fc2.weight``."""

    def __init__(self, shape: ModelShape, hidden_size: int = 1024, act: str | None = None):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"head hidden_size must be positive, got {hidden_size}")
        act = act or shape.hidden_act
        if act not in ACT2FN:
            raise ValueError(f"unknown head activation {act!r}; known: {', '.join(sorted(ACT2FN))}")
        self.shape = shape
        self.hidden_size = hidden_size
        self.act_name = act
        self.layers = nn.ModuleList(
            RetainingHead(shape.input_size, hidden_size, shape.num_kv_heads, act)
            for _ in range(shape.num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Locret's init: every weight ~ N(0, std^2)."""
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scores of layer `layer_idx`: [batch, seq, num_kv_heads]."""
        return self.layers[layer_idx](q, k, v)


class ProjectionCapture:
    """Forward hooks that copy each layer's pre-RoPE q/k/v out of an unmodified model.

    Hooks return ``None`` (the module's output is untouched) and store nothing unless the capture is
    enabled, so attaching them costs nothing outside APB prefill and training.

    Which tensors: the outputs of ``q_proj``/``k_proj``/``v_proj``; for Qwen3, which normalises q and
    k per head (``q_norm``/``k_norm``) before RoPE, the *normalised* q and k, since those are what the
    attention's dot products are made of (RoPE only rotates them) and the per-token scale the norm
    removes would otherwise have to be learned by the heads. Either way they are pre-RoPE.
    """

    def __init__(self, model: nn.Module):
        """Hooks of its own on `model` (training, tests); `shared` is what `APBModel` uses."""
        self.layers = decoder_layers(model)
        self.enabled = False
        self.store: dict[int, dict[str, torch.Tensor]] = {}
        self._handles: list[Any] = []
        for layer_idx, layer in enumerate(self.layers):
            attn = layer.self_attn
            sources = {
                "q": getattr(attn, "q_norm", None) or attn.q_proj,
                "k": getattr(attn, "k_norm", None) or attn.k_proj,
                "v": attn.v_proj,
            }
            for name, module in sources.items():
                self._handles.append(module.register_forward_hook(self._hook(layer_idx, name)))

    @classmethod
    def shared(cls, model: nn.Module) -> ProjectionCapture:
        """The capture an earlier `APBModel` (`apb.load`) attached to `model`, or a new one.

        Loading heads twice onto one base model must not stack a second set of q/k/v hooks (each set
        copies every projection while capturing, and none was ever removed); the captures are read one
        forward at a time, so every `APBModel` of the model can use the same one."""
        layers = decoder_layers(model)
        ref = _SHARED_CAPTURES.get(layers)
        capture = ref() if ref is not None else None
        if capture is None or not capture._handles:  # none yet, or someone removed its hooks
            capture = cls(model)
            _SHARED_CAPTURES[layers] = weakref.ref(capture)
        return capture

    def _hook(self, layer_idx: int, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if self.enabled:
                # q_norm/k_norm outputs are [batch, seq, heads, head_dim]; flatten the heads.
                self.store.setdefault(layer_idx, {})[name] = output.flatten(2)

        # Not traced by torch.compile (`apb.compile_layers` compiles the attention modules around these
        # projections): traced, each layer's hook would be a graph guarded on its own layer index, one
        # recompile per layer up to Dynamo's limit. Opaque, the graph breaks at the projection instead.
        return torch.compiler.disable(hook)

    @contextmanager
    def capturing(self) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
        """Enable capture for the duration of a forward; the store is cleared on exit."""
        self.enabled, self.store = True, {}
        try:
            yield self.store
        finally:
            self.enabled, self.store = False, {}

    def pop(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Take (and forget) layer `layer_idx`'s q, k, v: [batch, seq, width] each."""
        entry = self.store.pop(layer_idx, None)
        if entry is None or len(entry) != 3:
            raise RuntimeError(f"no captured q/k/v for layer {layer_idx}: is the capture enabled?")
        return entry["q"], entry["k"], entry["v"]

    def remove(self) -> None:
        """Detach all hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


_SHARED_CAPTURES: weakref.WeakKeyDictionary[nn.Module, weakref.ref[ProjectionCapture]] = (
    weakref.WeakKeyDictionary()
)
"""`ProjectionCapture.shared`'s captures by the model's decoder layers. Weak both ways (a capture holds
its layers), so the registry never keeps a model alive."""


def build_heads(
    model: nn.Module, hidden_size: int = 1024, act: str | None = None, dtype: torch.dtype | None = None
) -> RetainingHeads:
    """Fresh, randomly initialised heads sized for `model`, on its device, in `dtype` (default: fp32)."""
    shape = ModelShape.from_model(model)
    heads = RetainingHeads(shape, hidden_size=hidden_size, act=act)
    device = next(model.parameters()).device
    return heads.to(device=device, dtype=dtype or torch.float32)
