"""Opt-in `torch.compile` of a decoder's layers around APB's attention.

Outside the attention itself a layer is chains of small ops when run eagerly (RMSNorm: cast, pow, mean,
rsqrt, mul, cast; the MLP's SiLU(gate) * up; RoPE: about ten elementwise launches on strided q and k, plus
Qwen3's per-head q/k norms), each a kernel launch and a trip through memory; compiled, each chain becomes
one fused kernel. APB's attention function is not traced (`apb.attention`): it runs eagerly between the
graph before it and the one after. On an H200 (Llama-3.1-8B shapes, 128K context, 4 hosts) compiling the
norms and MLPs made every APB host 6-7% faster and the query pass about 30% faster, and full attention gains
too (benchmarks/RESULTS.md, "Host forward on one H200").
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from apb.heads import decoder_layers

logger = logging.getLogger(__name__)

COMPILE_LAYERS_ARG: dict[str, Any] = dict(
    nargs="?",
    const="inductor",
    default=None,
    metavar="BACKEND",
    help="torch.compile every layer's norms, MLP and attention module around APB's attention "
    "(apb.compile_layers); BACKEND defaults to inductor",
)
"""argparse keywords of `--compile-layers [BACKEND]`, the flag of the benchmarks and scripts/generate.py."""


def check_backend(backend: str) -> None:
    """`ValueError` naming the known backends unless `backend` is one `torch.compile` takes."""
    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(
            f"compile_layers must be a torch.compile backend ({', '.join(known)}), got {backend!r}"
        )


ATTENTION_CHILD = "self_attn"
"""The child of a decoder layer that holds its attention (see `compile_layers`)."""


def compile_layers(model: nn.Module, *, attention: bool = True, **compile_kwargs: Any) -> int:
    """Compile, in place, every child of every decoder layer and the final norm.

    For each layer of `model.get_decoder().layers`, each named child (Llama, Qwen, Mistral:
    `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`) gets `nn.Module.compile`, and so does
    the decoder's final `norm` when it has one. `compile_kwargs` go to `torch.compile` over the default
    ``dynamic=True`` (one graph for every sequence length instead of one per length); pass e.g.
    ``backend="aot_eager"`` where no C++ compiler is at hand.

    In the attention module the graph stops at the attention function: APB's (`apb.attention`) is not
    traced, so a prefill's per-host blocks, passing sets and backends run eagerly and never reach a guard,
    while the q/k/v projections, RoPE (and Qwen3's q/k norms) before it and the output projection after it
    are compiled. The forward hooks of the retaining heads on q_proj / k_proj / v_proj
    (`apb.heads.ProjectionCapture`) are not traced either, so with heads attached the graph also breaks at
    each projection. `attention=False` leaves the attention modules eager (as before this option existed).

    Compilation is lazy: the first forward traces and compiles, seconds to a minute on a GPU, so warm up
    before timing. Identical layers share one graph per module class; a new length does not recompile
    (sizes 0 and 1 are specialised, though), a new grad mode does (``inference_mode`` after ``no_grad``).
    Forward hooks on a compiled module are called from its compiled call: wrap them in
    `torch.compiler.disable` so Dynamo runs them as they are instead of tracing them. A deep copy made
    after compiling still calls the original's compiled modules: copy first. Calling this again skips what
    is compiled already.

    Returns the number of modules compiled by this call (4 per layer + 1 on Llama, 3 per layer + 1 with
    ``attention=False``; 0 when called again). Raises ValueError when the model has no decoder layers or a
    layer has no `self_attn`.
    """
    try:
        layers = decoder_layers(model)
    except ValueError as error:
        raise ValueError(
            f"compile_layers: {type(model).__name__} has no `get_decoder().layers` to compile ({error})"
        ) from None
    modules: list[nn.Module] = []
    for index, layer in enumerate(layers):
        children = dict(layer.named_children())
        if ATTENTION_CHILD not in children:
            raise ValueError(
                f"compile_layers: layer {index} ({type(layer).__name__}) of {type(model).__name__} has no "
                f"`{ATTENTION_CHILD}` child (children: {', '.join(children) or 'none'}); without knowing which "
                "child is the attention, APB's attention cannot be kept out of the graphs"
            )
        modules += [child for name, child in children.items() if attention or name != ATTENTION_CHILD]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    final_norm = getattr(decoder, "norm", None)
    if isinstance(final_norm, nn.Module):
        modules.append(final_norm)
    kwargs = {"dynamic": True, **compile_kwargs}
    num_compiled = 0
    for module in modules:
        if getattr(module, "_compiled_call_impl", None) is not None:  # set by nn.Module.compile
            continue
        module.compile(**kwargs)
        num_compiled += 1
    logger.info("compile_layers: %d module(s) compiled (%s)", num_compiled, kwargs)
    return num_compiled
