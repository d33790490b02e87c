"""Merging partial attentions (`apb.kernels.merge_partials`) and the decode path built on it.

The merge of attention over disjoint key sets must equal attention over their union; the one-launch Triton
merge must equal the plain reference (under the interpreter on the CPU, compiled on a GPU); and decoding
past the room kept after the last host's store must grow it without changing a logit.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from apb.kernels import decode_attention_ref, merge_partials, merge_partials_ref
from apb.kernels.triton_apb import HAS_TRITON
from conftest import run_under_interpreter, tiny_model

from apb import APBConfig, APBModel
from apb.comm import SimulatedComm

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for the Triton merge")

# Tolerances: the merge runs in fp32, so against float64 attention (or another fp32 order of the same sums)
# it is off by fp32 rounding of values of order 1 (1e-5). A bf16 / fp16 output adds its own rounding:
# 8 bits of mantissa, 0.4% relative, so 1e-2 on outputs of order 1.
FP32_TOL = 1e-5
HALF_TOL = 1e-2


def _partials(parts, batch, heads, t, head_dim, seed=0, empty=()):
    """Partials of one attention split over `parts` disjoint key sets, and the attention over all keys.
    Parts in `empty` see no key (lse -inf, output NaN, as a kernel may leave it)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, t, head_dim, generator=gen, dtype=torch.float64)
    sizes = [3 + 2 * p for p in range(parts)]
    keys = [torch.randn(batch, heads, n, head_dim, generator=gen, dtype=torch.float64) for n in sizes]
    values = [torch.randn(batch, heads, n, head_dim, generator=gen, dtype=torch.float64) for n in sizes]
    outs, lses = [], []
    for p, (k, v) in enumerate(zip(keys, values, strict=True)):
        if p in empty:
            outs.append(torch.full((batch, heads, t, head_dim), float("nan"), dtype=torch.float64))
            lses.append(torch.full((batch, heads, t), float("-inf"), dtype=torch.float64))
            continue
        out, lse = decode_attention_ref(q, k, v, num_prefix=None)
        outs.append(out)
        lses.append(lse)
    live = [p for p in range(parts) if p not in empty]
    k_all = torch.cat([keys[p] for p in live], dim=2)
    v_all = torch.cat([values[p] for p in live], dim=2)
    want_out, want_lse = decode_attention_ref(q, k_all, v_all, num_prefix=None)
    return torch.stack(outs), torch.stack(lses), want_out, want_lse


@pytest.mark.parametrize("parts", [1, 2, 5])
def test_reference_merge_equals_attention_over_the_union(parts):
    outs, lses, want_out, want_lse = _partials(parts, 2, 3, 4, 8)
    out, lse = merge_partials_ref(outs, lses)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out.double(), atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=FP32_TOL, rtol=FP32_TOL)


def test_reference_merge_ignores_parts_that_see_nothing():
    outs, lses, want_out, want_lse = _partials(4, 1, 2, 3, 8, empty=(1, 3))
    out, lse = merge_partials_ref(outs, lses, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want_out.double(), atol=HALF_TOL, rtol=HALF_TOL)
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=FP32_TOL, rtol=FP32_TOL)


def test_rows_that_no_part_sees_are_zero_with_lse_minus_inf():
    outs = torch.full((3, 1, 2, 4), float("nan"))
    lses = torch.full((3, 1, 2), float("-inf"))
    out, lse = merge_partials(outs, lses)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="lses"):
        merge_partials(torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="no partials"):
        merge_partials(torch.zeros(0, 3, 8), torch.zeros(0, 3))


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from apb.kernels.merge import merge_partials_triton
    for case in json.loads(sys.argv[1]):
        gen = torch.Generator().manual_seed(case["parts"] * 7 + case["dim"])
        outs = torch.randn(case["parts"], 2, 3, 5, case["dim"] + case["pad"], generator=gen)[..., : case["dim"]]
        lses = torch.randn(case["parts"], 2, 3, 5, generator=gen) * 4
        if case["dead"]:
            lses[0] = float("-inf")
            outs[0] = float("nan")
            lses[:, 0, 0, 0] = float("-inf")
        out, lse = merge_partials_triton(outs, lses, getattr(torch, case["dtype"]))
        torch.save(dict(outs=outs, lses=lses, out=out, lse=lse), case["path"])
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_merge_under_interpreter(tmp_path):
    """The one-launch merge through Triton's interpreter: strided outputs (a slice of a wider buffer, as
    the gathered [out | lse] buffer is), head dims that are not a power of two, parts that see nothing."""
    cases = [
        dict(parts=1, dim=8, pad=0, dead=False, dtype="float32"),
        dict(parts=3, dim=16, pad=1, dead=False, dtype="float16"),
        dict(parts=4, dim=12, pad=1, dead=True, dtype="float32"),
        dict(parts=2, dim=64, pad=0, dead=True, dtype="bfloat16"),
    ]
    cases = [dict(c, path=str(tmp_path / f"m{i}.pt")) for i, c in enumerate(cases)]
    run_under_interpreter(_INTERPRETER_SCRIPT, json.dumps(cases), cwd=tmp_path)
    for case in cases:
        r = torch.load(case["path"])
        want_out, want_lse = merge_partials_ref(r["outs"], r["lses"])
        assert r["out"].dtype == getattr(torch, case["dtype"])
        tol = FP32_TOL if case["dtype"] == "float32" else HALF_TOL
        torch.testing.assert_close(r["out"].float(), want_out, atol=tol, rtol=tol)
        torch.testing.assert_close(r["lse"], want_lse, atol=FP32_TOL, rtol=FP32_TOL)
        if case["dead"]:
            assert (r["out"][0, 0, 0] == 0).all() and torch.isneginf(r["lse"][0, 0, 0])


@pytest.mark.single_gpu
@needs_cuda
@pytest.mark.parametrize(("parts", "rows"), [(1, 64), (4, 64), (8, 64), (32, 1), (4, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_merge_gpu(parts, rows, dtype):
    """The query pass's shape (64 rows a head) and a decoding step's (one row a head: a program per row)."""
    gen = torch.Generator().manual_seed(parts)
    outs = torch.randn(parts, 1, 32, rows, 129, generator=gen)[..., :128].cuda()
    lses = (torch.randn(parts, 1, 32, rows, generator=gen) * 10).cuda()
    lses[0, 0, :4] = float("-inf")
    out, lse = merge_partials(outs, lses, dtype)
    want_out, want_lse = merge_partials_ref(outs, lses, dtype)
    assert out.dtype == dtype
    tol = FP32_TOL if dtype == torch.float32 else HALF_TOL
    torch.testing.assert_close(out.float(), want_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=FP32_TOL, rtol=FP32_TOL)


def test_decoding_past_the_kept_room_grows_the_store():
    """The last host's store keeps room for the query only when prefilled without generation; decoding
    more tokens on top must grow it and still give exactly full attention's logits (exact mode)."""
    model = tiny_model("llama").eval()
    apbm = APBModel(model)
    gen = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    context = torch.randint(0, vocab, (1, 37), generator=gen)
    query = torch.randint(0, vocab, (1, 4), generator=gen)
    more = torch.randint(0, vocab, (1, 9), generator=gen)
    comm = SimulatedComm(3)
    decode = apbm._prefill_context(context, query, APBConfig.exact(), comm, query=query)
    room = decode.stores[2][0][0].shape[2] - decode.context_len
    assert room == query.shape[1]
    apbm._run_tokens(decode, query, start=context.shape[1])
    step = apbm._lm_head(apbm._run_tokens(decode, more, start=context.shape[1] + query.shape[1]))
    assert decode.stores[2][0][0].shape[2] >= decode.context_len + query.shape[1] + more.shape[1]
    assert decode.appended[0] == query.shape[1] + more.shape[1]
    with torch.no_grad():
        full = model(torch.cat([context, query, more], dim=1)).logits[:, -more.shape[1] :]
    # fp32 on both sides; APB sums each host's keys apart and merges, so only the order of the sums differs
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def test_a_generous_max_new_tokens_reserves_no_memory_up_front():
    """generate(max_new_tokens=10**6) must not allocate a million tokens' K/V per layer before the first
    step: the room kept after the last host's block is capped, and decoding past it grows the store."""
    from apb.attention import DECODE_ROOM

    model = tiny_model("llama").eval()
    apbm = APBModel(model)
    gen = torch.Generator().manual_seed(4)
    context = torch.randint(0, model.config.vocab_size, (1, 30), generator=gen)
    query = torch.randint(0, model.config.vocab_size, (1, 3), generator=gen)
    decode = apbm._prefill_context(
        context, query, APBConfig.exact(), SimulatedComm(2), query=query, max_new_tokens=10**6
    )
    capacity = decode.stores[1][0][0].shape[2]
    assert capacity == decode.context_len + query.shape[1] + DECODE_ROOM
    ids = apbm.generate(context, query, config=APBConfig.exact(), num_hosts=2, max_new_tokens=5)
    assert ids.shape == (1, 5)
