"""Merging partial attentions over disjoint key sets by log-sum-exp: one Triton launch, and the plain reference.

Decoding runs every host's attention over its own keys and merges the partials once per layer. In torch
that merge is a dozen small kernels (logsumexp, exp, nan handling, the weighted sum, the cast), each a
launch the CPU pays for while the GPU idles: the query pass and each generated token are launch-bound.
The Triton kernel reads the stacked partials once and writes the merged output in the caller's dtype.
"""

from __future__ import annotations

import os

import torch
from apb.kernels.triton_apb import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _merge_kernel(
        Outs,
        Lses,
        Out,
        LseOut,
        num_rows,
        stride_on,
        stride_or,
        stride_ln,
        stride_lr,
        NUM_PARTS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < num_rows
        tile_ok = row_ok[:, None] & (cols < HEAD_DIM)[None, :]
        top = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        for n in tl.static_range(NUM_PARTS):
            lse = tl.load(Lses + n * stride_ln + rows * stride_lr, mask=row_ok, other=float("-inf"))
            top = tl.maximum(top, lse)
        # rows that see no key at all (every partial -inf) come out as zeros with lse -inf
        shift = tl.where(top == float("-inf"), 0.0, top)
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for n in tl.static_range(NUM_PARTS):
            lse = tl.load(Lses + n * stride_ln + rows * stride_lr, mask=row_ok, other=float("-inf"))
            weight = tl.exp(lse - shift)
            part = tl.load(
                Outs + n * stride_on + rows[:, None] * stride_or + cols[None, :], mask=tile_ok, other=0.0
            )
            acc += tl.where(weight[:, None] > 0, weight[:, None] * part.to(tl.float32), 0.0)
            total += weight
        seen = total > 0
        out = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
        tl.store(Out + rows[:, None] * HEAD_DIM + cols[None, :], out.to(Out.dtype.element_ty), mask=tile_ok)
        tl.store(LseOut + rows, tl.where(seen, shift + tl.log(total), float("-inf")), mask=row_ok)


def merge_partials_ref(
    outs: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax merge of attention over disjoint key sets, plainly.

    outs: [parts, ..., head_dim] (each part normalised over its own keys); lses: [parts, ...] (natural log).
    Returns out [..., head_dim] in `out_dtype` (default fp32) and lse [...] (fp32), as if attention had run
    over the union of the key sets. A part with lse -inf (no visible key) adds nothing, even where its
    output holds NaN; a row no part sees comes out as zeros with lse -inf.
    """
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)
    weight = torch.exp(lses - lse).nan_to_num(0.0).unsqueeze(-1)
    out = torch.where(weight > 0, weight * outs.float(), 0.0).sum(dim=0)
    return out.to(out_dtype or torch.float32), lse


def merge_partials_triton(
    outs: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_partials_ref` in one Triton launch (CUDA, or any device under TRITON_INTERPRET=1).
    `outs` may be a strided view (the head_dim axis contiguous), e.g. a slice of a gathered buffer. The
    number of parts (hosts) is a compile-time constant: one compiled kernel per host count, loops unrolled."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    _check(outs, lses)
    parts, head_dim = outs.shape[0], outs.shape[-1]
    lead = outs.shape[1:-1]
    flat_outs = outs.reshape(parts, -1, head_dim)  # a view whenever the leading axes collapse
    if flat_outs.stride(-1) != 1:
        flat_outs = flat_outs.contiguous()
    flat_lses = lses.reshape(parts, -1)
    num_rows = flat_outs.shape[1]
    out = torch.empty(*lead, head_dim, device=outs.device, dtype=out_dtype or torch.float32)
    lse = torch.empty(lead, device=outs.device, dtype=torch.float32)
    if num_rows == 0:
        return out, lse
    block_d = triton.next_power_of_2(head_dim)
    # Rows per program: up to a 4096-element tile, but few enough that the programs spread over the SMs. A
    # decoding step merges batch x heads rows (32 for Llama-3.1-8B): 32 to a tile would leave one program
    # streaming every part alone (measured on an H200: 20 us per merge of 32 splits, 5x its launch cost).
    block_r = min(max(1, min(64, 4096 // block_d)), triton.next_power_of_2(triton.cdiv(num_rows, 256)))
    _merge_kernel[(triton.cdiv(num_rows, block_r),)](
        flat_outs, flat_lses, out, lse, num_rows,
        flat_outs.stride(0), flat_outs.stride(1), flat_lses.stride(0), flat_lses.stride(1),
        NUM_PARTS=parts, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return out, lse


def merge_partials(
    outs: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge stacked partial attentions (see `merge_partials_ref`): one Triton launch on CUDA, the
    reference elsewhere. outs [parts, ..., head_dim], lses [parts, ...] -> out [..., head_dim], lse [...]."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if HAS_TRITON and (outs.is_cuda or interpreted) and outs.dtype in _DTYPES and lses.dtype == torch.float32:
        return merge_partials_triton(outs, lses, out_dtype)
    _check(outs, lses)
    return merge_partials_ref(outs, lses, out_dtype)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(outs: torch.Tensor, lses: torch.Tensor) -> None:
    if outs.dim() < 2 or outs.shape[:-1] != lses.shape:
        raise ValueError(
            f"partials must be outs [parts, ..., head_dim] and lses [parts, ...]; got outs {tuple(outs.shape)}, "
            f"lses {tuple(lses.shape)}"
        )
    if outs.shape[0] == 0:
        raise ValueError("no partials to merge")


__all__ = ["merge_partials", "merge_partials_ref", "merge_partials_triton"]
