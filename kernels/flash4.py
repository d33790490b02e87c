"""APB attention and dense causal attention on FlashAttention-4 (``flash-attn-4``, CuTe DSL).

FlashAttention's causal mask is aligned to the bottom-right corner when there are fewer queries than
keys: query i of n sees keys ``j <= i + (num_keys - n)``. APB's two kinds of rows are each exactly
that, so no log-sum-exp merge is needed:

- anchor rows over the anchor keys alone (same length, causal);
- local rows over all ``[passing | anchor | local]`` keys: local row i sees ``j <= P + A + i``, i.e.
  every passing key, the whole anchor and the local block causally.

Two ways to run it (``method``):

- ``"split"`` (the default, `DEFAULT_METHOD`): those two causal calls, outputs concatenated. Works on
  every head_dim FA4 supports; one compile per process, then any length runs without compiling.
- ``"mask"``: one call over all rows with a ``mask_mod`` of the APB layout and block-sparse tile lists
  (`apb_block_sparsity`) so that tiles outside the mask (anchor rows x passing keys, above the
  diagonal) are skipped and fully visible tiles skip the mask. Hopper, head_dim <= 128 (tiles
  128 x 128); elsewhere it runs as ``"split"``. Compiles once per anchor length.

``flash_attn`` and ``cutlass`` are imported on the first call only, so this module imports (and the
tests collect) without CUDA or FA4. Before that import FA4's disk cache of compiled kernels is switched on
(`KERNEL_CACHE_ENV`, unless set already): a new process then loads APB's kernels instead of compiling them.
Inputs FA4 cannot take (fp32, CPU, odd head dims) run the plain reference, as `apb.kernels.apb_attention`
does.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable

import torch
from apb.kernels.reference import apb_attention_ref, check_shapes

METHODS = ("split", "mask")
DEFAULT_METHOD = "split"
"""Method of `apb_attention_fa4` when none is given. On one H200 (benchmarks/RESULTS.md) split and mask
are within 8% of each other and neither is ahead in every run, but mask compiles again (5-8 s) at every
new anchor length while split takes milliseconds at any new length."""

SPARSE_BLOCK = 128
"""Query and key tile of the "mask" method's block-sparse lists: FA4's Hopper tile for head_dim <= 128."""


def fa4_available() -> bool:
    """Whether ``flash-attn-4`` and its CuTe DSL are installed (found on the path; nothing is imported)."""
    try:
        spec = importlib.util.find_spec("flash_attn")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    has_cute = any(
        os.path.isfile(os.path.join(path, "cute", "interface.py")) for path in spec.submodule_search_locations
    )
    try:
        return has_cute and importlib.util.find_spec("cutlass") is not None
    except (ImportError, ValueError):
        return False


def fa4_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FA4 can take these tensors: CUDA, fp16/bf16 alike, head_dim a multiple of 8 in 8..256."""
    head_dim = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and head_dim % 8 == 0
        and 8 <= head_dim <= 256
    )


def fa4_fits(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the "auto" backend runs FA4 for inputs of this device, dtype and head_dim.

    FA4's own kernels for the GPU (compute capability 9.x: Hopper, measured on an H200; 10.x/11.x:
    Blackwell, which take head_dim <= 128 or 256), fp16/bf16, head_dim a multiple of 8 in 8..256.
    Other GPUs keep the Triton kernel. Reads the device's capability; imports nothing.
    """
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return False
    major = torch.cuda.get_device_capability(device)[0]
    return major == 9 or (major in (10, 11) and (head_dim <= 128 or head_dim == 256))


KERNEL_CACHE_ENV = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
"""FA4's switch for its disk cache of compiled kernels (read when ``flash_attn.cute`` is first imported; the
folder is ``FLASH_ATTENTION_CUTE_DSL_CACHE_DIR``, default ``<tmp>/<user>/flash_attention_cute_dsl_cache``).
Set it to ``0`` to keep FA4's own default (compile in every process)."""


def before_fa4_import() -> None:
    """Turn FA4's kernel cache on unless the caller chose (or FA4 was already imported without us)."""
    if "flash_attn.cute" not in sys.modules:
        os.environ.setdefault(KERNEL_CACHE_ENV, "1")


def _fa4_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FA4 forward on ``[batch, seq, heads, dim]`` views of our ``[batch, heads, seq, dim]`` tensors
    (no copies: FA4 takes strided inputs). Returns out [batch, seq, heads, dim] and lse [batch, heads, seq]."""
    before_fa4_import()
    from flash_attn.cute.interface import flash_attn_func

    out, lse = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        softmax_scale=softmax_scale,
        return_lse=True,
        **kwargs,
    )
    return out, lse


def causal_attention_fa4(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention on FA4 (the full-attention baseline).

    q: [batch, num_heads, num_queries, head_dim]; k, v: [batch, num_kv_heads, num_keys, head_dim],
    num_keys >= num_queries (bottom-right causal: query i sees keys ``j <= i + num_keys - num_queries``);
    GQA without repeating K/V. Returns out like q (a [batch, seq, heads, dim]-contiguous view) and
    lse [batch, num_heads, num_queries] fp32, natural log. Needs `fa4_supported` inputs.
    """
    if not fa4_supported(q, k, v):
        raise ValueError(
            f"FlashAttention-4 needs CUDA fp16/bf16 q, k, v of one dtype and head_dim in 8..256 (multiple "
            f"of 8); got {q.dtype} on {q.device.type}, head_dim {q.shape[-1]}"
        )
    out, lse = _fa4_call(q, k, v, softmax_scale, causal=True)
    return out.transpose(1, 2), lse


def apb_attention_fa4(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_passing: int,
    num_anchor: int,
    softmax_scale: float | None = None,
    method: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APB attention over keys ``[passing | anchor | local]`` on FA4 (forward only).

    q: [batch, num_heads, num_anchor + num_local, head_dim]
    k, v: [batch, num_kv_heads, num_passing + num_anchor + num_local, head_dim] (GQA: num_heads a
    multiple of num_kv_heads; K/V are not repeated).
    Returns out [batch, num_heads, num_queries, head_dim] in q's dtype and lse [batch, num_heads,
    num_queries] (fp32, natural log). `method`: "split" or "mask" (module docstring; None:
    `DEFAULT_METHOD`). Inputs FA4 cannot take run `apb_attention_ref`.
    """
    method = DEFAULT_METHOD if method is None else method
    if method not in METHODS:
        raise ValueError(f"unknown FA4 method {method!r}; use one of {', '.join(METHODS)}")
    check_shapes(q, k, v, num_passing, num_anchor)
    if not fa4_supported(q, k, v):
        return apb_attention_ref(
            q, k, v, num_passing=num_passing, num_anchor=num_anchor, softmax_scale=softmax_scale
        )
    num_local = q.shape[2] - num_anchor
    if not num_anchor:  # passing + local only: one bottom-right causal call is the whole mask
        out, lse = _fa4_call(q, k, v, softmax_scale, causal=True)
        return out.transpose(1, 2), lse
    if method == "mask" and _mask_method_fits(q) and num_local:
        out, lse = _fa4_call(
            q,
            k,
            v,
            softmax_scale,
            mask_mod=_apb_mask_mod(num_anchor),
            block_sparse_tensors=_block_sparse_tensors(num_passing, num_anchor, num_local, q.device),
            # Packed GQA maps a packed query tile to sparse row tile // group: exact only when the
            # group divides the tile (Llama's 4 and 8 do; Qwen2.5-14B's 5 does not)
            pack_gqa=None if SPARSE_BLOCK % (q.shape[1] // k.shape[1]) == 0 else False,
        )
        return out.transpose(1, 2), lse
    anchor_keys = slice(num_passing, num_passing + num_anchor)
    out_a, lse_a = _fa4_call(q[:, :, :num_anchor], k[:, :, anchor_keys], v[:, :, anchor_keys], softmax_scale, causal=True)  # fmt: skip
    if not num_local:
        return out_a.transpose(1, 2), lse_a
    out_l, lse_l = _fa4_call(q[:, :, num_anchor:], k, v, softmax_scale, causal=True)
    return torch.cat([out_a, out_l], dim=1).transpose(1, 2), torch.cat([lse_a, lse_l], dim=2)


# ---------------------------------------------------------------- the "mask" method


def _mask_method_fits(q: torch.Tensor) -> bool:
    """FA4 picks 128 x 128 tiles on Hopper for head_dim <= 128; the tile lists are built for those."""
    return q.shape[-1] <= 128 and torch.cuda.get_device_capability(q.device)[0] == 9


def apb_block_sparsity(
    num_passing: int, num_anchor: int, num_local: int, block: int = SPARSE_BLOCK, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile lists of the APB mask, in flex_attention's / FA4's block-sparse form.

    Query tile i covers rows ``[i*block, (i+1)*block)`` of ``[anchor | local]``, key tile j keys
    ``[j*block, (j+1)*block)`` of ``[passing | anchor | local]``. Returns
    (partial_count [1, 1, num_m], partial_index [1, 1, num_m, num_n], full_count, full_index), int32:
    per query tile, how many and which key tiles (ascending, padded with 0) are partly visible (the
    kernel applies the mask there) and fully visible (no mask). Tiles with nothing visible are in
    neither list. Row r sees keys ``[lo(r), P + r]`` with lo = P for anchor rows and 0 for local rows.
    """
    num_queries, num_keys = num_anchor + num_local, num_passing + num_anchor + num_local
    num_m, num_n = -(-num_queries // block), -(-num_keys // block)
    r0 = torch.arange(num_m, device=device)[:, None] * block  # first row of each query tile
    r1 = torch.clamp(r0 + block, max=num_queries) - 1  # last row
    c0 = torch.arange(num_n, device=device)[None, :] * block  # first key of each key tile
    c1 = torch.clamp(c0 + block, max=num_keys) - 1  # last key
    # The tile's anchor rows [r0, min(r1, A-1)] see keys [P, P + r]; its local rows [max(r0, A), r1]
    # see [0, P + r]. Visible somewhere: some row's range meets [c0, c1]; fully: every row's covers it.
    has_anchor = r0 < num_anchor
    has_local = r1 >= num_anchor
    last_anchor_row = torch.clamp(r1, max=num_anchor - 1)
    first_local_row = torch.clamp(r0, min=num_anchor)
    any_anchor = has_anchor & (num_passing <= c1) & (num_passing + last_anchor_row >= c0)
    any_local = has_local & (num_passing + r1 >= c0)
    full_anchor = ~has_anchor | ((num_passing <= c0) & (num_passing + r0 >= c1))
    full_local = ~has_local | (num_passing + first_local_row >= c1)
    full = full_anchor & full_local
    partial = (any_anchor | any_local) & ~full

    def packed(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cols = torch.arange(num_n, device=device).expand(num_m, num_n)
        index = torch.sort(torch.where(selected, cols, num_n), dim=1).values  # selected first, ascending
        index = torch.where(index == num_n, 0, index)
        count = selected.sum(dim=1)
        return count.to(torch.int32)[None, None], index.to(torch.int32)[None, None]

    return (*packed(partial), *packed(full))


_SPARSITY_CACHE: dict[tuple, object] = {}


def _block_sparse_tensors(num_passing: int, num_anchor: int, num_local: int, device: torch.device):
    """FA4's `BlockSparseTensorsTorch` for one host shape, cached (every layer of a host reuses it);
    batch and head dims are 1 (broadcast), which FA4 needs for packed GQA."""
    before_fa4_import()
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    key = (num_passing, num_anchor, num_local, device)
    tensors = _SPARSITY_CACHE.get(key)
    if tensors is None:
        if len(_SPARSITY_CACHE) > 64:  # one per host shape; simulations of many lengths would grow it
            _SPARSITY_CACHE.clear()
        partial_count, partial_index, full_count, full_index = apb_block_sparsity(
            num_passing, num_anchor, num_local, device=device
        )
        tensors = _SPARSITY_CACHE[key] = BlockSparseTensorsTorch(
            mask_block_cnt=partial_count,
            mask_block_idx=partial_index,
            full_block_cnt=full_count,
            full_block_idx=full_index,
            block_size=(SPARSE_BLOCK, SPARSE_BLOCK),
        )
    return tensors


_MASK_MODS: dict[int, Callable] = {}


def _apb_mask_mod(num_anchor: int) -> Callable:
    """FA4 ``mask_mod`` of the APB layout (same visibility as `apb_mask`), one per anchor length.

    num_passing comes from the kernel's lengths (keys - queries), so every host shares one compiled
    kernel; the anchor length is a compile-time constant (FA4 keys its compile cache on the closure),
    so a run compiles once per anchor length.
    """
    fn = _MASK_MODS.get(num_anchor)
    if fn is not None:
        return fn
    before_fa4_import()
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def apb_mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        passing = scalar_to_ssa(seqlen_info.seqlen_k - seqlen_info.seqlen_q, cutlass.Int32)
        anchor = scalar_to_ssa(num_anchor, cutlass.Int32)
        zero = scalar_to_ssa(0, cutlass.Int32)
        k_local = kv_idx - passing  # key position in [anchor | local]; < 0 for passing keys
        return (k_local <= q_idx) & ((k_local >= zero) | (q_idx >= anchor))

    _MASK_MODS[num_anchor] = apb_mask_mod
    return apb_mask_mod
