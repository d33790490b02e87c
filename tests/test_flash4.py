"""FlashAttention-4 backend (`apb.kernels.flash4`) vs the plain reference.

CPU (CI): the block-sparse tile lists of the "mask" method against the boolean APB mask, detection
without importing FA4, and the reference fallback. GPU (single_gpu, skipped without CUDA or without
``flash-attn-4``): both methods and the dense causal entry point against fp32 and same-precision
references by FlashAttention's rule (`test_kernels._check_against_refs`: the kernel's error at most 2x
the same-precision reference's, plus a floor). Compiles are per dtype / head_dim / GQA group (and per
anchor length for "mask"), so the cases reuse a few anchors to keep the run short.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import pytest
import torch
from apb.kernels.flash4 import (
    METHODS,
    apb_attention_fa4,
    apb_block_sparsity,
    causal_attention_fa4,
    fa4_available,
)
from apb.kernels.reference import apb_attention_ref, apb_mask
from apb.kernels.triton_apb import HAS_TRITON
from test_kernels import LSE_FLOOR, OUT_FLOOR, _check_against_refs, _inputs, _ref_lowp

from apb.backends import available_backends, get_backend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for FlashAttention-4")
needs_fa4 = pytest.mark.skipif(
    not fa4_available(), reason='flash-attn-4 is not installed (pip install "apb-retain[flash]")'
)

# ---------------------------------------------------------------- CPU


def _tile_lists_by_brute_force(num_passing, num_anchor, num_local, block):
    mask = apb_mask(num_passing, num_anchor, num_local)
    num_m, num_n = -(-mask.shape[0] // block), -(-mask.shape[1] // block)
    partial, full = [], []
    for i in range(num_m):
        tiles = [mask[i * block : (i + 1) * block, j * block : (j + 1) * block] for j in range(num_n)]
        full.append([j for j, t in enumerate(tiles) if t.all()])
        partial.append([j for j, t in enumerate(tiles) if t.any() and not t.all()])
    return partial, full


@pytest.mark.parametrize("block", [4, 16])
@pytest.mark.parametrize(
    "num_passing,num_anchor,num_local",
    [(0, 0, 1), (0, 0, 33), (5, 0, 16), (0, 7, 9), (37, 16, 16), (16, 40, 3), (1, 1, 1), (64, 17, 50)],
)
def test_block_sparsity_matches_mask(num_passing, num_anchor, num_local, block):
    """Tile lists: partly visible tiles get the mask, fully visible ones skip it, empty ones are absent."""
    partial_count, partial_index, full_count, full_index = apb_block_sparsity(
        num_passing, num_anchor, num_local, block=block
    )
    partial, full = _tile_lists_by_brute_force(num_passing, num_anchor, num_local, block)
    for count, index, expected in ((partial_count, partial_index, partial), (full_count, full_index, full)):
        assert count.dtype == index.dtype == torch.int32
        assert count.shape == (1, 1, len(expected)) and index.shape[:3] == (1, 1, len(expected))
        for i, cols in enumerate(expected):
            assert index[0, 0, i, : count[0, 0, i]].tolist() == cols, (i, cols)


def test_detection_does_not_import_fa4():
    """Finding FA4 must not import it (its import touches CUDA through tvm_ffi)."""
    before = {name for name in sys.modules if name.startswith(("flash_attn", "cutlass"))}
    fa4_available()
    available_backends()
    after = {name for name in sys.modules if name.startswith(("flash_attn", "cutlass"))}
    assert after == before


def test_flash_backend_is_fa4_when_installed():
    if fa4_available():
        backends = importlib.import_module("apb.backends")
        assert "flash" in available_backends("cuda") and "flash" not in available_backends("cpu")
        assert backends._REGISTRY["flash"] is backends._flash4
        with pytest.raises(ValueError, match="needs CUDA"):
            get_backend("flash", "cpu")
    else:
        assert "flash" not in available_backends("cpu")


@pytest.fixture
def fake_fa4(monkeypatch):
    """Simulates FA4 installed or not, without importing it: a fresh backend registry, `fa4_available`
    answering `installed`, FA4's interface module as an empty stand-in (or None: "does not import"), and
    a GPU of compute capability `capability`. Call it with those three."""
    from apb.kernels import flash4

    from apb import backends

    def make(installed: bool, imports: bool = True, capability: tuple[int, int] = (9, 0)) -> None:
        registry = {name: fn for name, fn in backends._REGISTRY.items() if name != "flash"}
        monkeypatch.setattr(backends, "_REGISTRY", registry)
        monkeypatch.setattr(backends, "_DEVICE_TYPES", dict(backends._DEVICE_TYPES))
        monkeypatch.setattr(backends, "_FA4_IMPORTS", {})
        monkeypatch.setattr(flash4, "fa4_available", lambda: installed)
        stand_in = types.ModuleType("flash_attn.cute.interface") if imports else None
        monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", stand_in)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return make


TRITON_OR_FLEX = "triton" if HAS_TRITON else "flex"


def test_auto_runs_fa4_where_it_fits(fake_fa4):
    from apb.backends import _auto_cuda, resolve_auto

    fake_fa4(installed=True)
    assert resolve_auto("cuda", torch.bfloat16, 128) == "flash"
    assert resolve_auto("cuda:0", torch.float16, 64) == "flash"
    assert resolve_auto("cuda", torch.bfloat16, 256) == "flash"
    assert resolve_auto("cuda", torch.bfloat16, 96) == "flash"  # Hopper: any multiple of 8 up to 256
    # what FA4 does not take keeps the Triton kernel (which runs fp32 and odd head dims on the reference)
    assert resolve_auto("cuda", torch.float32, 128) == TRITON_OR_FLEX
    assert resolve_auto("cuda", torch.bfloat16, 100) == TRITON_OR_FLEX
    assert resolve_auto("cuda", torch.bfloat16, 512) == TRITON_OR_FLEX
    assert resolve_auto("cpu", torch.bfloat16, 128) == "sdpa"
    # the model's dtype and head_dim are known per call only: "auto" on CUDA chooses there
    assert get_backend("auto", "cuda") is _auto_cuda
    assert get_backend("auto", "cpu") is get_backend("sdpa", "cpu")


@pytest.mark.parametrize(
    "capability,head_dim,expected",
    [
        ((8, 0), 128, False),
        ((10, 0), 128, True),
        ((10, 0), 192, False),
        ((10, 0), 256, True),
        ((12, 0), 128, False),
    ],
)
def test_auto_runs_fa4_on_its_own_gpu_kernels_only(fake_fa4, capability, head_dim, expected):
    from apb.backends import resolve_auto

    fake_fa4(installed=True, capability=capability)
    assert resolve_auto("cuda", torch.bfloat16, head_dim) == ("flash" if expected else TRITON_OR_FLEX)


def test_auto_without_fa4_or_when_it_does_not_import(fake_fa4, caplog):
    from apb import backends

    fake_fa4(installed=False)
    assert backends.resolve_auto("cuda", torch.bfloat16, 128) == TRITON_OR_FLEX
    assert get_backend("auto", "cuda") is get_backend(TRITON_OR_FLEX, "cuda")

    fake_fa4(installed=True, imports=False)
    assert "flash" in available_backends("cuda")  # asked for by name, it is there (and fails loudly)
    assert backends.resolve_auto("cuda", torch.bfloat16, 128) == TRITON_OR_FLEX
    assert backends.resolve_auto("cuda", torch.bfloat16, 64) == TRITON_OR_FLEX
    warnings = [r.getMessage() for r in caplog.records if "does not import" in r.getMessage()]
    assert len(warnings) == 1 and "ModuleNotFoundError" in warnings[0]  # tried once, the error named


def test_cpu_and_fp32_fall_back_to_reference():
    q, k, v = _inputs(1, 4, 2, 3, 2, 5, 16, torch.float32, "cpu")
    for method in METHODS:
        out, lse = apb_attention_fa4(q, k, v, num_passing=3, num_anchor=2, method=method)
        ref_out, ref_lse = apb_attention_ref(q, k, v, num_passing=3, num_anchor=2)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    with pytest.raises(ValueError, match="unknown FA4 method"):
        apb_attention_fa4(q, k, v, num_passing=3, num_anchor=2, method="nope")
    with pytest.raises(ValueError):  # shapes are checked before anything runs
        apb_attention_fa4(q, k[:, :, 1:], v[:, :, 1:], num_passing=3, num_anchor=2)
    with pytest.raises(ValueError, match="FlashAttention-4 needs CUDA"):
        causal_attention_fa4(q, k, v)


# ---------------------------------------------------------------- GPU

# (num_passing, num_anchor, num_local): ragged lengths, no passing / no anchor, one local row, anchor
# longer than the local block, several tiles of each kind. Anchors repeat (129, 35): "mask" compiles
# once per anchor length.
SHAPES = [
    (0, 0, 17),
    (0, 129, 1000),
    (1000, 0, 1000),
    (517, 129, 1000),
    (517, 129, 4133),
    (3, 129, 1),
    (40, 35, 3),
    (256, 128, 384),  # every length a multiple of the 128 tile
]


@pytest.mark.single_gpu
@needs_cuda
@needs_fa4
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_passing,num_anchor,num_local", SHAPES)
def test_fa4_bf16_gqa4(method, num_passing, num_anchor, num_local):
    q, k, v = _inputs(1, 8, 2, num_passing, num_anchor, num_local, 128, torch.bfloat16, "cuda")
    out, lse = apb_attention_fa4(q, k, v, num_passing=num_passing, num_anchor=num_anchor, method=method)
    _check_against_refs(q, k, v, out, lse, num_passing=num_passing, num_anchor=num_anchor)


@pytest.mark.single_gpu
@needs_cuda
@needs_fa4
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "group,head_dim",
    [(1, 128), (8, 128), (4, 64), (5, 128), (4, 256)],  # 5: packed GQA off for "mask"; 256: "mask" runs split
)
def test_fa4_groups_and_head_dims(method, group, head_dim):
    q, k, v = _inputs(1, 2 * group, 2, 517, 129, 1000, head_dim, torch.bfloat16, "cuda")
    out, lse = apb_attention_fa4(q, k, v, num_passing=517, num_anchor=129, method=method)
    _check_against_refs(q, k, v, out, lse, num_passing=517, num_anchor=129)


@pytest.mark.single_gpu
@needs_cuda
@needs_fa4
@pytest.mark.parametrize("method", METHODS)
def test_fa4_fp16_batch_and_strides(method):
    q, k, v = _inputs(2, 8, 2, 517, 129, 1000, 128, torch.float16, "cuda")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [batch, queries, heads, dim] memory, as HF gives it
    out, lse = apb_attention_fa4(q, k, v, num_passing=517, num_anchor=129, method=method)
    _check_against_refs(q, k, v, out, lse, num_passing=517, num_anchor=129)


@pytest.mark.single_gpu
@needs_cuda
@needs_fa4
@pytest.mark.parametrize("num_queries,num_keys", [(1000, 1000), (777, 2049)])
def test_fa4_dense_causal(num_queries, num_keys):
    """Bottom-right causal: APB with every earlier key passing and no anchor."""
    num_passing = num_keys - num_queries
    q, k, v = _inputs(1, 8, 2, num_passing, 0, num_queries, 128, torch.bfloat16, "cuda")
    out, lse = causal_attention_fa4(q, k, v)
    _check_against_refs(q, k, v, out, lse, num_passing=num_passing, num_anchor=0)


@pytest.mark.single_gpu
@needs_cuda
@needs_fa4
def test_flash_backend_runs_fa4():
    """The registry's "flash" is FA4, and a scale other than 1/sqrt(head_dim) reaches the kernel."""
    q, k, v = _inputs(1, 8, 2, 517, 129, 1000, 128, torch.bfloat16, "cuda")
    kwargs = dict(num_passing=517, num_anchor=129)
    out, lse = get_backend("flash", "cuda")(q, k, v, softmax_scale=0.3, **kwargs)
    ref_out, ref_lse = apb_attention_ref(q.float(), k.float(), v.float(), softmax_scale=0.3, **kwargs)
    low_out, low_lse = _ref_lowp(q, k, v, scale=0.3, **kwargs)
    err, low_err = (out.double() - ref_out).abs().max(), (low_out.double() - ref_out).abs().max()
    lse_err, low_lse_err = (lse.double() - ref_lse).abs().max(), (low_lse.double() - ref_lse).abs().max()
    assert err <= 2 * low_err + OUT_FLOOR and lse_err <= 2 * low_lse_err + LSE_FLOOR  # the 2x rule


def test_fa4_kernel_cache_is_on_unless_the_caller_chose(monkeypatch):
    """FA4's disk cache of compiled kernels is switched on before flash_attn.cute is first imported, unless
    the caller set the variable (0 keeps FA4's compile-per-process) or FA4 was imported already."""
    from apb.kernels import flash4

    monkeypatch.delitem(sys.modules, "flash_attn.cute", raising=False)
    monkeypatch.delenv(flash4.KERNEL_CACHE_ENV, raising=False)
    flash4.before_fa4_import()
    assert os.environ[flash4.KERNEL_CACHE_ENV] == "1"
    monkeypatch.setenv(flash4.KERNEL_CACHE_ENV, "0")
    flash4.before_fa4_import()
    assert os.environ[flash4.KERNEL_CACHE_ENV] == "0"
    monkeypatch.delenv(flash4.KERNEL_CACHE_ENV)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", types.ModuleType("flash_attn.cute"))
    flash4.before_fa4_import()
    assert flash4.KERNEL_CACHE_ENV not in os.environ


def test_auto_backend_turns_the_kernel_cache_on_before_its_fa4_import(monkeypatch):
    """The "auto" backend's import check can be FA4's first import in a process (it was, on every GPU run
    with backend="auto", and the cache stayed off): the variable is set before that import."""
    import importlib

    from apb.kernels import flash4

    from apb import backends

    seen = {}

    def fake_import(name, *args):
        seen[name] = os.environ.get(flash4.KERNEL_CACHE_ENV)
        raise ImportError("not here")

    monkeypatch.delitem(sys.modules, "flash_attn.cute", raising=False)
    monkeypatch.delenv(flash4.KERNEL_CACHE_ENV, raising=False)
    monkeypatch.setattr(backends, "_FA4_IMPORTS", {})
    monkeypatch.setattr(importlib, "import_module", fake_import)
    assert backends._fa4_imports() is False
    assert seen == {"flash_attn.cute.interface": "1"}
