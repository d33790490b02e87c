"""`decode_attention` (the query pass and decoding steps over one host's keys) vs plain references.

Same rule as tests/test_kernels.py (FlashAttention's): the kernel's max error against an fp32 reference is
at most 2x that of a reference computed in the kernel's own precision, plus a small floor.
"""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from apb.kernels import apb_attention_ref, decode_attention, decode_attention_ref
from conftest import run_under_interpreter
from test_kernels import needs_triton_interpreter

OUT_FLOOR = 1e-5  # fp32 rounding of exp2/log2 on values of order 1; see tests/test_kernels.py
LSE_FLOOR = 1e-4

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU for the Triton kernel"
)


def _inputs(num_heads, num_kv_heads, t, num_keys, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * t + num_keys)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return (
        rand(1, num_heads, t, head_dim),
        rand(1, num_kv_heads, num_keys, head_dim),
        rand(1, num_kv_heads, num_keys, head_dim),
    )


def _lowp(q, k, v, num_prefix):
    """All steps rounded to the inputs' dtype (FlashAttention's `attention_ref(upcast=False)`)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if num_prefix is not None:
        rows = torch.arange(q.shape[2], device=q.device)[:, None] + num_prefix
        scores = scores.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > rows, float("-inf"))
    return torch.matmul(torch.softmax(scores, -1).to(v.dtype), v), torch.logsumexp(scores.float(), -1)


def _check(q, k, v, out, lse, num_prefix):
    ref_out, ref_lse = decode_attention_ref(q.float(), k.float(), v.float(), num_prefix=num_prefix)
    low_out, low_lse = _lowp(q, k, v, num_prefix)
    err = (out.double() - ref_out).abs().max().item()
    low_err = (low_out.double() - ref_out).abs().max().item()
    lse_err = (lse.double() - ref_lse).abs().max().item()
    low_lse_err = (low_lse.double() - ref_lse).abs().max().item()
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert err <= 2 * low_err + OUT_FLOOR, f"out error {err:.3g} > 2 x {low_err:.3g}"
    assert lse_err <= 2 * low_lse_err + LSE_FLOOR, f"lse error {lse_err:.3g} > 2 x {low_lse_err:.3g}"


@pytest.mark.parametrize("t,num_keys", [(1, 1), (1, 37), (5, 5), (7, 300)])
def test_reference_all_visible_is_softmax_over_every_key(t, num_keys):
    q, k, v = _inputs(4, 2, t, num_keys, 16, torch.float64, "cpu")
    out, lse = decode_attention_ref(q, k, v, num_prefix=None)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ kk.transpose(-1, -2) / 4.0
    # The reference's math is fp32 whatever the inputs: fp32 rounding is the only difference.
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ vv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t,num_prefix", [(1, 0), (3, 10), (9, 250)])
def test_reference_with_prefix_is_apb_attention_without_anchor(t, num_prefix):
    q, k, v = _inputs(4, 1, t, num_prefix + t, 16, torch.float32, "cpu")
    out, lse = decode_attention_ref(q, k, v, num_prefix=num_prefix)
    ref_out, ref_lse = apb_attention_ref(q, k, v, num_passing=num_prefix, num_anchor=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("valid", [1, 9, 30])
def test_valid_keys_hide_the_rest_of_the_buffer(valid):
    """`valid_keys` (a device tensor: graphed decoding's store) reads the first keys only; the rest of the
    buffer, even NaN, changes nothing."""
    q, k, v = _inputs(4, 2, 1, 30, 16, torch.float32, "cpu")
    k[:, :, valid:], v[:, :, valid:] = float("nan"), float("nan")
    expected = decode_attention_ref(q, k[:, :, :valid], v[:, :, :valid], num_prefix=None)
    for fn in (decode_attention_ref, decode_attention):
        out, lse = fn(q, k, v, num_prefix=None, valid_keys=torch.tensor([valid]))
        torch.testing.assert_close(out, expected[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(lse, expected[1], rtol=0, atol=1e-6)


def test_cpu_falls_back_to_the_reference():
    q, k, v = _inputs(4, 2, 3, 40, 16, torch.float32, "cpu")
    for num_prefix in (None, 37):
        out, lse = decode_attention(q, k, v, num_prefix=num_prefix)
        ref_out, ref_lse = decode_attention_ref(q, k, v, num_prefix=num_prefix)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from apb.kernels.triton_apb import apb_attention_triton
    for case in json.loads(sys.argv[1]):
        gen = torch.Generator().manual_seed(case["t"] * 101 + case["keys"])
        q = torch.randn(1, case["heads"], case["t"], 16, generator=gen).half()
        k = torch.randn(1, case["kv"], case["keys"], 16, generator=gen).half()
        v = torch.randn(1, case["kv"], case["keys"], 16, generator=gen).half()
        out, lse = apb_attention_triton(q, k, v, num_passing=case["keys"] - case["t"], num_anchor=0,
                                        causal_shift=case["t"], block_m=16, block_n=16, use_tma=False)
        torch.save(dict(q=q, k=k, v=v, out=out, lse=lse), case["path"])
    """
)


@needs_triton_interpreter
def test_all_visible_kernel_under_interpreter(tmp_path):
    """The shifted-causal trick (every key visible) through Triton's interpreter, fp16, ragged tiles."""
    cases = [
        dict(t=1, keys=1, heads=2, kv=1),
        dict(t=1, keys=45, heads=4, kv=2),
        dict(t=5, keys=5, heads=2, kv=2),
        dict(t=7, keys=70, heads=4, kv=1),
        dict(t=20, keys=33, heads=2, kv=1),
    ]
    cases = [dict(c, path=str(tmp_path / f"c{i}.pt")) for i, c in enumerate(cases)]
    run_under_interpreter(_INTERPRETER_SCRIPT, json.dumps(cases), cwd=tmp_path)
    for case in cases:
        r = torch.load(case["path"])
        _check(r["q"], r["k"], r["v"], r["out"], r["lse"], None)


_SPLIT_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from apb.kernels.triton_decode import decode_attention_split
    for case in json.loads(sys.argv[1]):
        gen = torch.Generator().manual_seed(case["t"] * 101 + case["keys"])
        b = case.get("batch", 1)
        q = torch.randn(b, case["heads"], case["t"], 16, generator=gen).half()
        k = torch.randn(b, case["kv"], case["keys"] + 5, 16, generator=gen).half()[:, :, : case["keys"]]
        v = torch.randn(b, case["kv"], case["keys"] + 5, 16, generator=gen).half()[:, :, : case["keys"]]
        num_prefix = case["keys"] - case["t"] if case["prefix"] else None
        valid = case.get("valid")
        out, lse = decode_attention_split(q, k, v, num_prefix=num_prefix, splits=case["splits"], block_n=16,
                                          valid_keys=None if valid is None else torch.tensor([valid]))
        if valid is not None:  # what the kernel must have read: the first `valid` keys
            k, v = k[:, :, :valid], v[:, :, :valid]
        torch.save(dict(q=q, k=k, v=v, out=out, lse=lse, num_prefix=num_prefix), case["path"])
    """
)


@needs_triton_interpreter
def test_split_kernel_under_interpreter(tmp_path):
    """The split-key kernel (what `decode_attention` runs on CUDA) through Triton's interpreter: fp16,
    strided K/V views (a store with room after it), GQA rows packed into a tile, ragged splits and tiles,
    every key visible or causal over the queries' own keys, one split or several merged, batches, and a
    buffer of which only the first `valid_keys` keys exist."""
    cases = [
        dict(t=1, keys=1, heads=2, kv=1, prefix=False, splits=1),
        dict(t=1, keys=45, heads=4, kv=2, prefix=False, splits=3),
        dict(t=1, keys=45, heads=4, kv=2, prefix=True, splits=2),
        dict(t=5, keys=5, heads=2, kv=2, prefix=True, splits=1),
        dict(t=7, keys=70, heads=4, kv=1, prefix=True, splits=4),
        dict(t=20, keys=33, heads=2, kv=1, prefix=False, splits=2),
        dict(t=3, keys=200, heads=8, kv=2, prefix=True, splits=None),
        dict(t=2, keys=90, heads=4, kv=2, prefix=True, splits=3, batch=2),  # rows of one batch
        # `valid_keys` read from a tensor (graphed decoding): splits past it, inside one, on its edge
        dict(t=1, keys=90, heads=4, kv=2, prefix=False, splits=4, valid=37),
        dict(t=1, keys=90, heads=4, kv=2, prefix=False, splits=3, valid=1),
        dict(t=1, keys=96, heads=4, kv=1, prefix=False, splits=2, valid=48, batch=2),
        dict(t=1, keys=64, heads=2, kv=1, prefix=False, splits=None, valid=64),
    ]
    cases = [dict(c, path=str(tmp_path / f"c{i}.pt")) for i, c in enumerate(cases)]
    run_under_interpreter(_SPLIT_SCRIPT, json.dumps(cases), cwd=tmp_path)
    for case in cases:
        r = torch.load(case["path"])
        _check(r["q"], r["k"], r["v"], r["out"], r["lse"], r["num_prefix"])


def test_split_count_fills_the_gpu_and_keeps_splits_long():
    from apb.kernels.triton_decode import num_splits

    # Llama-3.1-8B, one decoding token over 32K keys on 132 SMs: 8 programs without splits -> 32 splits
    assert num_splits(1, 8, 1, 32768, 132) == 32
    assert num_splits(1, 8, 4, 32768, 132) == 8  # the query pass: 64 rows x 4 heads = 4 row tiles
    assert num_splits(1, 8, 1, 1000, 132) == 2  # no split under 256 keys
    assert num_splits(1, 8, 1, 100, 132) == 1
    assert num_splits(64, 8, 1, 1 << 20, 132) == 1  # enough programs already
    assert all(n & (n - 1) == 0 for n in (num_splits(1, 8, 1, keys, 132) for keys in range(1, 70000, 997)))


@pytest.mark.single_gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,num_keys", [(1, 1), (1, 16384), (17, 17), (64, 20480), (64, 1000), (300, 4133)])
@pytest.mark.parametrize("prefix", [False, True])
def test_decode_attention_gpu(dtype, t, num_keys, prefix):
    q, k, v = _inputs(32, 8, t, num_keys, 128, dtype, "cuda")
    num_prefix = num_keys - t if prefix else None
    out, lse = decode_attention(q, k, v, num_prefix=num_prefix)
    _check(q, k, v, out, lse, num_prefix)


@pytest.mark.single_gpu
@needs_cuda
@pytest.mark.parametrize("valid", [1, 5000, 16383])
def test_decode_attention_gpu_reads_valid_keys_only(valid):
    """The kernel's `valid_keys` on the GPU: a 16K-key buffer whose tail past `valid` is NaN."""
    q, k, v = _inputs(32, 8, 1, 16384, 128, torch.bfloat16, "cuda")
    k[:, :, valid:], v[:, :, valid:] = float("nan"), float("nan")
    out, lse = decode_attention(q, k, v, num_prefix=None, valid_keys=torch.tensor([valid], device="cuda"))
    _check(q, k[:, :, :valid], v[:, :, :valid], out, lse, None)


@needs_triton_interpreter
def test_bench_decode_script_runs_both_kernels_under_interpreter(tmp_path):
    """scripts/bench_decode.py --tiny: every setting times and checks the split-key kernel and the prefill
    kernel's decoding form against the reference, and writes them as JSON."""
    import os
    import sys
    from pathlib import Path

    from conftest import run_or_fail

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_decode.py"
    out = tmp_path / "decode.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = run_or_fail(
        [sys.executable, str(script), "--tiny", "--json", str(out)], timeout_s=600, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["keys"], r["t"], r["causal"]) for r in rows] == [
        (keys, t, causal) for keys in (40, 300) for t in (1, 4) for causal in (False, True)
    ]
    for row in rows:
        assert max(row["split_err"], row["prefill_kernel_err"]) < 2e-3, row  # fp16 outputs
        assert max(row["split_lse_err"], row["prefill_kernel_lse_err"]) < 1e-4, row
        assert row["split_ms"] > 0 and row["prefill_kernel_ms"] > 0
        assert ("sdpa_ms" in row) == (not row["causal"])
