"""String-keyed registry of APB attention backends.

Every backend has the signature of :func:`apb.kernels.reference.apb_attention_ref`::

    fn(q, k, v, *, num_passing, num_anchor, softmax_scale) -> (out, lse)
    q: [batch, num_heads, num_anchor + num_local, head_dim]
    k, v: [batch, num_kv_heads, num_passing + num_anchor + num_local, head_dim]
    out: like q; lse: [batch, num_heads, num_anchor + num_local] fp32, natural log

Built in: "reference" (plain torch, any device), "sdpa" (torch's fused scaled_dot_product_attention
with the APB mask as a boolean tensor; returns lse None), "flex" (torch flex_attention, CUDA), "flash"
(FlashAttention-4, ``apb.kernels.flash4`` with its default "split" method, when ``flash-attn-4`` is
installed: ``pip install "apb-retain[flash]"``; else flash-attn 2 when that is; CUDA), "triton"
(``apb.kernels.apb_attention``, only when that exists).

"auto" (`resolve_auto`) runs the fastest backend that takes the input. On CUDA: "flash" when it is
FlashAttention-4, FA4 imports, and `apb.kernels.flash4.fa4_fits` the input (compute capability 9.x-11.x,
fp16/bf16, a head_dim FA4 takes there); else "triton" (which runs fp32 and odd head dims on the
reference); else "flex". Elsewhere "sdpa". Measured on one H200 (benchmarks/RESULTS.md, "Kernel"): APB's
mask at 128K, FA4 633-669 useful TFLOP/s, Triton 538-565, flex 433-436. FA4 compiles on its first call in a
process (about 4 s); after that a new length runs in milliseconds, without compiling.

A backend may return ``lse = None`` when it cannot give it cheaply: APB's prefill uses only ``out``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable

import torch

from apb.kernels.reference import apb_attention_ref
from apb.kernels.triton_apb import HAS_TRITON

logger = logging.getLogger(__name__)

BackendFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_REGISTRY: dict[str, BackendFn] = {}
_DEVICE_TYPES: dict[str, tuple[str, ...]] = {}
"""Device types a backend runs on; backends not listed run on any device."""


def register_backend(name: str, fn: BackendFn, device_types: tuple[str, ...] | None = None) -> None:
    """Add (or replace) a backend under `name`; `device_types` ("cuda", ...) it is limited to (None: any)."""
    _REGISTRY[name] = fn
    if device_types is None:
        _DEVICE_TYPES.pop(name, None)
    else:
        _DEVICE_TYPES[name] = tuple(device_types)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names usable now (optional backends appear only when their package imports); with `device`, only
    those that run on that device's type."""
    _register_optional()
    if device is None:
        return sorted(_REGISTRY)
    kind = torch.device(device).type
    return sorted(name for name in _REGISTRY if kind in _DEVICE_TYPES.get(name, (kind,)))


def resolve_auto(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str:
    """The backend "auto" runs for inputs of this device, dtype and head_dim (module docstring)."""
    _register_optional()
    return _auto_choice(torch.device(device), dtype, head_dim)


def _auto_choice(device: torch.device, dtype: torch.dtype | None, head_dim: int) -> str:
    # Called once per attention call by `_auto_cuda`: no registration (a find_spec) here. dtype None:
    # q, k, v differ in dtype, which FA4 does not take.
    if device.type != "cuda":
        # 7-10x the reference on the CPU (its attention alone, 600-1000-token blocks); the mask is [queries, keys]
        # booleans, fine at the lengths a CPU runs
        return "sdpa"
    if _REGISTRY.get("flash") is _flash4 and _fa4_fits(device, dtype, head_dim) and _fa4_imports():
        return "flash"
    # The Triton kernel measured 1.24-1.30x flex_attention at 128K (H100 and H200, benchmarks/RESULTS.md).
    return "triton" if "triton" in _REGISTRY and HAS_TRITON else "flex"


def _fa4_fits(device: torch.device, dtype: torch.dtype | None, head_dim: int) -> bool:
    from apb.kernels.flash4 import fa4_fits

    return dtype is not None and fa4_fits(device, dtype, head_dim)


_FA4_IMPORTS: dict[str, bool] = {}


def _fa4_imports() -> bool:
    """Whether FA4's interface imports (tried once, when "auto" is first about to run it on a GPU: the
    import touches CUDA). A broken install (e.g. a cutlass-dsl without its ``cute`` sources) is logged
    once, and "auto" keeps the Triton kernel."""
    if "ok" not in _FA4_IMPORTS:
        from apb.kernels.flash4 import before_fa4_import

        before_fa4_import()  # this can be FA4's first import in the process: its kernel cache goes on first
        try:
            importlib.import_module("flash_attn.cute.interface")
            _FA4_IMPORTS["ok"] = True
        except Exception as e:  # noqa: BLE001 - any import failure means: not usable here
            logger.warning("flash-attn-4 is installed but does not import (%r); 'auto' uses triton/flex", e)
            _FA4_IMPORTS["ok"] = False
    return _FA4_IMPORTS["ok"]


def _auto_cuda(q, k, v, *, num_passing: int, num_anchor: int, softmax_scale: float | None = None):
    """The "auto" backend on CUDA with FlashAttention-4 installed: chosen per call from dtype and head_dim."""
    name = _auto_choice(q.device, q.dtype if k.dtype == q.dtype == v.dtype else None, q.shape[-1])
    return _REGISTRY[name](
        q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=softmax_scale
    )


def get_backend(name: str, device: torch.device | str) -> BackendFn:
    """The backend function for `name` ("auto": `resolve_auto`'s choice; on CUDA with FlashAttention-4
    installed, a function that makes that choice per call from the inputs' dtype and head_dim).

    `ValueError` for an unknown name, or for a backend that cannot run on `device` (flex and flash need
    CUDA: on the CPU, flex would fail deep inside Inductor's compile), naming the usable ones."""
    _register_optional()
    kind = torch.device(device).type
    if name == "auto":
        if kind == "cuda" and _REGISTRY.get("flash") is _flash4:
            return _auto_cuda
        # Without FA4 the choice does not depend on dtype or head_dim.
        name = _auto_choice(torch.device(device), torch.bfloat16, 128)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown APB attention backend {name!r}; available: {', '.join(available_backends())}"
        )
    if kind not in _DEVICE_TYPES.get(name, (kind,)):
        raise ValueError(
            f"APB attention backend {name!r} needs {' or '.join(_DEVICE_TYPES[name]).upper()}, but the model is "
            f"on {kind}; usable on {kind}: {', '.join(['auto', *available_backends(kind)])}"
        )
    return _REGISTRY[name]


def _reference(q, k, v, *, num_passing: int, num_anchor: int, softmax_scale: float | None = None):
    return apb_attention_ref(
        q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=softmax_scale
    )


register_backend("reference", _reference)


_SDPA_MASKS: dict[tuple, torch.Tensor] = {}


def _sdpa(q, k, v, *, num_passing: int, num_anchor: int, softmax_scale: float | None = None):
    """APB attention through `torch.nn.functional.scaled_dot_product_attention` with an explicit boolean
    mask (`apb_mask`, cached per shape); GQA without repeating K/V. Returns (out, None): no lse."""
    from apb.kernels.reference import apb_mask, check_shapes

    check_shapes(q, k, v, num_passing, num_anchor)
    num_local = q.shape[2] - num_anchor
    key = (num_passing, num_anchor, num_local, q.device)
    mask = _SDPA_MASKS.get(key)
    if mask is None:
        if len(_SDPA_MASKS) > 64:  # one per host shape; simulations of many lengths would grow it
            _SDPA_MASKS.clear()
        mask = _SDPA_MASKS[key] = apb_mask(num_passing, num_anchor, num_local, device=q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out, None


register_backend("sdpa", _sdpa)


# ---------------------------------------------------------------- flex_attention


def apb_mask_mod(num_passing: torch.Tensor | int, num_anchor: torch.Tensor | int) -> Callable:
    """flex_attention mask_mod of the APB layout (same visibility as `apb_mask`).

    The sizes may be 0-dim tensors so that one compiled kernel serves every host's shape.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        k_local = kv_idx - num_passing  # < 0 for passing keys
        is_local_row = q_idx >= num_anchor
        causal = (k_local <= q_idx) & ((k_local >= 0) | is_local_row)
        return causal | (is_local_row & (k_local < num_anchor))

    return mask_mod


_FLEX_STATE: dict[str, object] = {}
FLEX_MIN_LEN = 128
"""Shorter query or key sequences go to the reference backend (see `_flex`)."""


def _flex(q, k, v, *, num_passing: int, num_anchor: int, softmax_scale: float | None = None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "compiled" not in _FLEX_STATE:
        # Static shapes: one compile per (queries, keys) shape, i.e. per host in simulation and once
        # per rank when distributed. Dynamic-shape recompiles failed in Inductor (torch 2.11,
        # head_dim 16: "NoValidChoicesError"). The limit is raised so simulating many hosts never
        # falls back to eager flex, which materialises the full score matrix.
        for name in ("recompile_limit", "cache_size_limit"):
            if getattr(torch._dynamo.config, name, 256) < 256:
                setattr(torch._dynamo.config, name, 256)
        _FLEX_STATE["compiled"] = torch.compile(flex_attention, dynamic=False)
        _FLEX_STATE["masks"] = {}
    masks: dict = _FLEX_STATE["masks"]  # type: ignore[assignment]
    num_queries, num_keys = q.shape[2], k.shape[2]
    if min(num_queries, num_keys) < FLEX_MIN_LEN:
        # Inductor's flex template found no kernel config for a 100-token host block (torch 2.11,
        # fp32, H100) while 150 tokens compiled; such blocks are cheap for the reference anyway.
        return _reference(
            q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=softmax_scale
        )
    key = (num_passing, num_anchor, num_queries, num_keys, q.device)
    block_mask = masks.get(key)
    if block_mask is None:
        # Built once per shape (prefill: per host; every layer reuses it). The sizes are captured as
        # tensors so the compiled kernel is not specialised on each host's numbers.
        sizes = torch.tensor([num_passing, num_anchor], device=q.device)
        block_mask = create_block_mask(
            apb_mask_mod(sizes[0], sizes[1]), None, None, num_queries, num_keys, device=q.device
        )
        masks[key] = block_mask
    group = q.shape[1] // k.shape[1]
    kwargs = {"block_mask": block_mask, "scale": softmax_scale, "enable_gqa": group > 1}
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        out, lse = _FLEX_STATE["compiled"](q, k, v, return_lse=True, **kwargs)
    else:
        out, aux = _FLEX_STATE["compiled"](q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
        lse = aux.lse
    return out, lse.float()


register_backend("flex", _flex, device_types=("cuda",))


# ---------------------------------------------------------------- decomposed (flash-attn)


def decomposed_apb_attention(
    attend: Callable, q, k, v, *, num_passing: int, num_anchor: int, softmax_scale: float | None = None
):
    """APB attention from a plain ``attend(q, k, v, causal, scale) -> (out, lse)`` kernel (same-length
    causal only): anchor rows = causal over the anchor; local rows = merge(full over
    [passing | anchor], causal over local). Layout as in the module docstring."""
    from apb.kernels import merge_partials

    num_queries = q.shape[2]
    num_local = num_queries - num_anchor
    k_prefix, v_prefix = k[:, :, : num_passing + num_anchor], v[:, :, : num_passing + num_anchor]
    k_local, v_local = k[:, :, num_passing + num_anchor :], v[:, :, num_passing + num_anchor :]
    outs, lses = [], []
    if num_anchor:
        qa = q[:, :, :num_anchor]
        o, s = attend(
            qa,
            k[:, :, num_passing : num_passing + num_anchor],
            v[:, :, num_passing : num_passing + num_anchor],
            True,
            softmax_scale,
        )
        outs.append(o.float())
        lses.append(s.float())
    if num_local:
        ql = q[:, :, num_anchor:]
        parts = [attend(ql, k_local, v_local, True, softmax_scale)]
        if num_passing + num_anchor:
            parts.insert(0, attend(ql, k_prefix, v_prefix, False, softmax_scale))
        o, s = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1].float() for p in parts]))
        outs.append(o)
        lses.append(s)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def _flash_attend(q, k, v, causal: bool, scale):
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        softmax_scale=scale,
        causal=causal,
        return_attn_probs=True,
    )
    return out.transpose(1, 2), lse


def _flash(q, k, v, *, num_passing: int, num_anchor: int, softmax_scale: float | None = None):
    return decomposed_apb_attention(
        _flash_attend, q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=softmax_scale
    )


# ---------------------------------------------------------------- FlashAttention-4


def _flash4(q, k, v, *, num_passing: int, num_anchor: int, softmax_scale: float | None = None):
    """APB attention on FlashAttention-4 (`apb.kernels.flash4.apb_attention_fa4`, its default method)."""
    from apb.kernels.flash4 import apb_attention_fa4

    return apb_attention_fa4(
        q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=softmax_scale
    )


# ---------------------------------------------------------------- optional registration


def _register_optional() -> None:
    if "flash" not in _REGISTRY:
        from apb.kernels.flash4 import fa4_available

        # flash-attn-4 installs flash_attn/cute (no flash_attn/__init__.py), so finding `flash_attn`
        # alone does not mean flash-attn 2's flash_attn_func is there: FA4 is checked first
        if fa4_available():
            register_backend("flash", _flash4, device_types=("cuda",))
        elif importlib.util.find_spec("flash_attn") is not None:
            register_backend("flash", _flash, device_types=("cuda",))
    if "triton" not in _REGISTRY:
        try:
            kernels = importlib.import_module("apb.kernels")
        except ImportError:  # pragma: no cover - apb.kernels is part of the package
            return
        fn = getattr(kernels, "apb_attention", None)
        if callable(fn):
            register_backend("triton", fn)
