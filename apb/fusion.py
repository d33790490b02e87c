"""Opt-in `torch.compile` of the token-wise parts of a decoder: the norms and the MLP of every layer.

Those parts are chains of small elementwise ops when run eagerly (RMSNorm: cast, pow, mean, rsqrt, mul,
cast; the MLP's SiLU(gate) * up), each a kernel launch and a trip through memory; compiled, each chain
becomes one fused kernel. On an H200 (Llama-3.1-8B shapes, 128K context, 4 hosts) every APB host runs 6-7%
faster and the query pass about 30% faster; full attention gains too (benchmarks/RESULTS.md, "Host forward
on one H200").
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
    help="torch.compile every layer's norms and MLP (apb.compile_layers); BACKEND defaults to inductor",
)
"""argparse keywords of `--compile-layers [BACKEND]`, the flag of the benchmarks and scripts/generate.py."""


def check_backend(backend: str) -> None:
    """`ValueError` naming the known backends unless `backend` is one `torch.compile` takes."""
    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(
            f"compile_layers must be a torch.compile backend ({', '.join(known)}), got {backend!r}"
        )


EAGER_CHILD = "self_attn"
"""The child of a decoder layer that stays eager (see `compile_layers`)."""


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile, in place, every child of every decoder layer except its attention, and the final norm.

    For each layer of `model.get_decoder().layers`, each named child other than `self_attn` (Llama, Qwen,
    Mistral: `input_layernorm`, `post_attention_layernorm`, `mlp`) gets `nn.Module.compile`, and so does
    the decoder's final `norm` when it has one. `compile_kwargs` go to `torch.compile` over the default
    ``dynamic=True`` (one graph for every sequence length instead of one per length); pass e.g.
    ``backend="aot_eager"`` where no C++ compiler is at hand.

    The attention module stays eager because APB runs inside it: it registers its own attention function
    (`apb.attention`) and forward hooks on q_proj / k_proj / v_proj (`apb.heads.ProjectionCapture`), and a
    prefill switches per host between blocks, passing sets and backends, which a compiled graph would
    have to guard on and recompile for.

    Compilation is lazy: the first forward traces and compiles, seconds to a minute on a GPU, so warm up
    before timing. Identical layers share one graph per module class; a new length does not recompile
    (sizes 0 and 1 are specialised, though), a new grad mode does (``inference_mode`` after ``no_grad``).
    Forward hooks on a compiled module are called from its compiled call: wrap them in
    `torch.compiler.disable` so Dynamo runs them as they are instead of tracing them. A deep copy made
    after compiling still calls the original's compiled modules: copy first. Calling this again skips what
    is compiled already.

    Returns the number of modules compiled by this call (3 per layer + 1 on Llama; 0 when called again).
    Raises ValueError when the model has no decoder layers or a layer has no `self_attn`.
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
        if EAGER_CHILD not in children:
            raise ValueError(
                f"compile_layers: layer {index} ({type(layer).__name__}) of {type(model).__name__} has no "
                f"`{EAGER_CHILD}` child (children: {', '.join(children) or 'none'}); without knowing which "
                "child is the attention, nothing can be left eager"
            )
        modules += [child for name, child in children.items() if name != EAGER_CHILD]
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
