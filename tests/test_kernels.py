"""APB attention kernel vs its plain reference (FlashAttention's testing rule).

For each case: the kernel, an fp32 reference (`apb_attention_ref` on upcast inputs) and a reference at
the kernel's own precision (`_ref_lowp`: q·kᵀ, softmax and p·v each rounded to the input dtype, as
FlashAttention's `attention_ref(upcast=False)`). The kernel's max error against the fp32 reference must
be at most 2× the low-precision reference's, plus a floor (`OUT_FLOOR`, `LSE_FLOOR`) for cases where
the low-precision reference happens to be exact (e.g. one visible key: the output is v itself).

CPU (CI): the Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1) in a subprocess,
because the variable must be set before triton is imported. Only fp16 there: the interpreter of
triton 3.9 multiplies bf16 dot operands as raw uint16 bits (a bug of the interpreter, not the
kernel), so bf16 is checked on the GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from apb.kernels import apb_attention, apb_attention_ref, apb_mask, decode_attention_ref
from apb.kernels.triton_apb import HAS_TRITON
from conftest import script_module

# Floors: fp32 rounding of exp2/log2 in the kernel (≈1e-6 relative) on values of order 1 (out) and
# 10 (lse); far below one bf16/fp16 ulp, so they only matter where the low-precision ref is exact.
OUT_FLOOR = 1e-5
LSE_FLOOR = 1e-4

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU for the Triton kernel"
)


def _ref_lowp(q, k, v, *, num_passing, num_anchor, causal_shift=0, scale=None):
    """Reference in the inputs' own dtype: scores, softmax and p·v each rounded to q.dtype."""
    num_queries, head_dim = q.shape[2], q.shape[3]
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = apb_mask(num_passing, num_anchor, num_queries - num_anchor, device=q.device)
    if causal_shift:  # no anchor: row i sees keys <= num_passing + causal_shift + i
        assert num_anchor == 0
        rows = torch.arange(num_queries, device=q.device)[:, None] + num_passing + causal_shift
        mask = torch.arange(k.shape[2], device=q.device)[None, :] <= rows
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    attn = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(attn, v), lse


def _check_against_refs(q, k, v, out, lse, *, num_passing, num_anchor, causal_shift=0, label=""):
    """`label` names the case in a failure message (which variant, which shapes)."""
    if causal_shift:  # the decoding form (every key or a shifted diagonal visible): its own reference
        ref_out, ref_lse = decode_attention_ref(
            q.float(), k.float(), v.float(), num_prefix=num_passing + causal_shift
        )
    else:
        ref_out, ref_lse = apb_attention_ref(
            q.float(), k.float(), v.float(), num_passing=num_passing, num_anchor=num_anchor
        )
    low_out, low_lse = _ref_lowp(
        q, k, v, num_passing=num_passing, num_anchor=num_anchor, causal_shift=causal_shift
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = (out.double() - ref_out).abs().max().item()
    low_err = (low_out.double() - ref_out).abs().max().item()
    lse_err = (lse.double() - ref_lse).abs().max().item()
    low_lse_err = (low_lse.double() - ref_lse).abs().max().item()
    assert err <= 2 * low_err + OUT_FLOOR, (
        f"{label}: out error {err:.3g} > 2 x low-precision ref {low_err:.3g}"
    )
    assert lse_err <= 2 * low_lse_err + LSE_FLOOR, f"{label}: lse error {lse_err:.3g} > 2 x {low_lse_err:.3g}"


def _inputs(batch, num_heads, num_kv_heads, num_passing, num_anchor, num_local, head_dim, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(num_passing * 7919 + num_anchor * 31 + num_local)
    n_q, n_k = num_anchor + num_local, num_passing + num_anchor + num_local

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return (
        rand(batch, num_heads, n_q, head_dim),
        rand(batch, num_kv_heads, n_k, head_dim),
        rand(batch, num_kv_heads, n_k, head_dim),
    )


# ---------------------------------------------------------------- CPU: reference and dispatch


def test_mask_rule_matches_row_ranges():
    """Row i sees keys [lo(i), P + i], lo = P for anchor rows and 0 for local rows (what the kernel uses)."""
    num_passing, num_anchor, num_local = 5, 3, 6
    mask = apb_mask(num_passing, num_anchor, num_local)
    for i in range(num_anchor + num_local):
        lo = num_passing if i < num_anchor else 0
        expected = torch.zeros(mask.shape[1], dtype=torch.bool)
        expected[lo : num_passing + i + 1] = True
        assert torch.equal(mask[i], expected), i


def test_cpu_and_fp32_use_reference():
    q, k, v = _inputs(1, 4, 2, 3, 2, 5, 16, torch.float32, "cpu")
    out, lse = apb_attention(q, k, v, num_passing=3, num_anchor=2)
    ref_out, ref_lse = apb_attention_ref(q, k, v, num_passing=3, num_anchor=2)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize(
    "shapes",
    [
        dict(q=(1, 4, 10, 16), k=(1, 3, 13, 16), num_passing=3, num_anchor=2),  # 4 heads over 3 kv heads
        dict(q=(1, 4, 10, 16), k=(1, 2, 12, 16), num_passing=3, num_anchor=2),  # keys != passing + queries
        dict(q=(1, 4, 10, 16), k=(1, 2, 13, 16), num_passing=3, num_anchor=11),  # anchor > queries
        dict(q=(1, 4, 10, 16), k=(1, 2, 13, 16), num_passing=-1, num_anchor=2),
    ],
)
def test_bad_shapes_raise(shapes):
    q, k = torch.zeros(shapes["q"]), torch.zeros(shapes["k"])
    with pytest.raises(ValueError):
        apb_attention(q, k, k, num_passing=shapes["num_passing"], num_anchor=shapes["num_anchor"])


# ---------------------------------------------------------------- CPU: the kernel under the interpreter

_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import torch
    from apb.kernels.triton_apb import apb_attention_triton
    cases, variants = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    results = []
    for c in cases:
        gen = torch.Generator().manual_seed(len(results))
        nq, nk = c["A"] + c["L"], c["P"] + c["A"] + c["L"]
        q = torch.randn(c["B"], c["H"], nq, c["D"], generator=gen).half()
        k = torch.randn(c["B"], c["KV"], nk, c["D"], generator=gen).half()
        v = torch.randn(c["B"], c["KV"], nk, c["D"], generator=gen).half()
        if c.get("strided"):  # q as a transpose of [batch, queries, heads, dim], as attention modules give it
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        for name, variant in variants.items():
            out, lse = apb_attention_triton(q, k, v, num_passing=c["P"], num_anchor=c["A"], **variant,
                                            causal_shift=c.get("shift", 0), block_m=c["BM"], block_n=c["BN"],
                                            num_warps=4, num_stages=1)
            torch.save(dict(q=q, k=k, v=v, out=out, lse=lse), c["path"] + "." + name)
    print("ok")
    """
)

_INTERPRETER_CASES = [
    # B, H, KV, P, A, L, D, BM, BN: ragged lengths, zero passing/anchor, the mixed anchor/local tile,
    # BLOCK_M > BLOCK_N, BLOCK_M < BLOCK_N, several tiles of each kind, GQA 1/4/8.
    dict(B=1, H=2, KV=2, P=0, A=0, L=1, D=16, BM=16, BN=16),
    dict(B=1, H=4, KV=1, P=0, A=0, L=17, D=16, BM=16, BN=16),
    dict(B=2, H=4, KV=1, P=5, A=7, L=17, D=32, BM=16, BN=16),
    dict(B=1, H=2, KV=2, P=0, A=9, L=40, D=16, BM=32, BN=16),
    dict(B=1, H=8, KV=1, P=33, A=0, L=50, D=64, BM=16, BN=32),
    dict(B=1, H=4, KV=4, P=21, A=19, L=37, D=16, BM=32, BN=16, strided=True),
    dict(B=1, H=8, KV=2, P=40, A=35, L=3, D=16, BM=16, BN=16),  # anchor longer than the local block
    dict(B=1, H=4, KV=1, P=70, A=16, L=33, D=16, BM=16, BN=32),  # anchor ends exactly on a tile
    dict(B=1, H=2, KV=1, P=10, A=128, L=20, D=16, BM=64, BN=32),  # anchor % 128 == 0 (fused: one bound)
    # decoding's forms (decode_attention): every key visible (shift = queries), and a shifted diagonal
    dict(B=1, H=4, KV=2, P=40, A=0, L=5, D=16, BM=16, BN=16, shift=5),
    dict(B=1, H=2, KV=1, P=3, A=0, L=20, D=16, BM=16, BN=16, shift=7),
]


# Every way the kernel can run. The interpreter ignores the warp_specialize hint, so that variant checks the
# single masked loop (with Q, K, V through TMA descriptors) that the hint is compiled for on Hopper;
# persistent runs 4 programs, so each strides over several tiles.
KERNEL_VARIANTS = {
    "pointers": dict(use_tma=False),
    "tma": dict(use_tma=True),
    "persistent": dict(use_tma=True, persistent=True),
    "fused": dict(use_tma=True, fused=True),
    "warp_specialized": dict(use_tma=True, warp_specialize=True),
    "warp_specialized_persistent": dict(use_tma=True, warp_specialize=True, persistent=True),
}


def _triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(
    HAS_TRITON and _triton_version() < (3, 7),
    reason="triton < 3.7's interpreter cannot loop over bounds derived from program ids (1-element arrays); "
    "there the kernel is covered compiled by the single_gpu tests",
)
def test_kernel_under_interpreter(tmp_path):
    cases = [dict(c, path=str(tmp_path / f"case{i}.pt")) for i, c in enumerate(_INTERPRETER_CASES)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT, json.dumps(cases), json.dumps(KERNEL_VARIANTS)],
        env=env,
        cwd=tmp_path,  # not the repo root: there `kernels/` would import as a top-level package
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for c in cases:
        for name in KERNEL_VARIANTS:
            r = torch.load(c["path"] + "." + name)
            _check_against_refs(
                r["q"], r["k"], r["v"], r["out"], r["lse"], num_passing=c["P"], num_anchor=c["A"],
                causal_shift=c.get("shift", 0), label=f"{name} {c}",
            )  # fmt: skip


# ---------------------------------------------------------------- GPU

GPU_CASES = [
    (group, head_dim, num_passing, num_anchor, num_local)
    for group in (1, 4, 8)
    for head_dim in (64, 128)
    for num_passing, num_anchor in ((0, 0), (0, 300), (1000, 0), (517, 129))
    for num_local in (1, 17, 1000, 4133)
]


@pytest.mark.single_gpu
@needs_cuda
@pytest.mark.parametrize("group,head_dim,num_passing,num_anchor,num_local", GPU_CASES)
def test_kernel_gpu_bf16(group, head_dim, num_passing, num_anchor, num_local):
    num_kv_heads = 2
    q, k, v = _inputs(1, num_kv_heads * group, num_kv_heads, num_passing, num_anchor, num_local, head_dim,
                      torch.bfloat16, "cuda")  # fmt: skip
    out, lse = apb_attention(q, k, v, num_passing=num_passing, num_anchor=num_anchor)
    _check_against_refs(q, k, v, out, lse, num_passing=num_passing, num_anchor=num_anchor)


@pytest.mark.single_gpu
@needs_cuda
@pytest.mark.parametrize("num_passing,num_anchor,num_local", [(0, 0, 17), (517, 129, 1000), (3, 5, 4133)])
def test_kernel_gpu_fp16_batch_and_strides(num_passing, num_anchor, num_local):
    q, k, v = _inputs(2, 8, 2, num_passing, num_anchor, num_local, 128, torch.float16, "cuda")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [batch, queries, heads, dim] memory, as HF gives it
    out, lse = apb_attention(q, k, v, num_passing=num_passing, num_anchor=num_anchor)
    _check_against_refs(q, k, v, out, lse, num_passing=num_passing, num_anchor=num_anchor)


def _is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.single_gpu
@needs_cuda
@pytest.mark.parametrize("variant", list(KERNEL_VARIANTS))
@pytest.mark.parametrize(
    "num_passing,num_anchor,num_local", [(0, 0, 1), (517, 129, 1000), (1000, 300, 4133), (300, 256, 999)]
)
def test_kernel_gpu_variants(variant, num_passing, num_anchor, num_local):
    """Every way the kernel runs, at a fixed config and autotuned (warp specialization: sm90 only, where
    it is compiled and measured)."""
    from apb.kernels.triton_apb import apb_attention_triton

    options = KERNEL_VARIANTS[variant]
    if options.get("warp_specialize") and not _is_sm90():
        pytest.skip("warp specialization is enabled for sm90 only")
    if options.get("use_tma") and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    q, k, v = _inputs(2, 8, 2, num_passing, num_anchor, num_local, 128, torch.bfloat16, "cuda")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [batch, queries, heads, dim] memory, as HF gives it
    warps = 4 if options.get("warp_specialize") else 8
    for config in (dict(block_m=128, block_n=64, num_warps=warps, num_stages=3), {}):
        out, lse = apb_attention_triton(
            q, k, v, num_passing=num_passing, num_anchor=num_anchor, **options, **config
        )
        _check_against_refs(
            q, k, v, out, lse, num_passing=num_passing, num_anchor=num_anchor, label=f"{variant} {config}"
        )


@pytest.mark.single_gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [16, 32, 256])
def test_kernel_gpu_other_head_dims(head_dim):
    q, k, v = _inputs(1, 4, 2, 517, 129, 1000, head_dim, torch.bfloat16, "cuda")
    out, lse = apb_attention(q, k, v, num_passing=517, num_anchor=129)
    _check_against_refs(q, k, v, out, lse, num_passing=517, num_anchor=129)


def _num_compiled() -> int:
    from apb.kernels.triton_apb import _apb_fwd_kernel

    caches = getattr(_apb_fwd_kernel, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in _apb_fwd_kernel.cache.values())


@pytest.mark.single_gpu
@needs_cuda
def test_new_length_does_not_recompile():
    """A new length in an already-tuned bucket reuses the compiled kernel and the tuned config."""
    from apb.kernels.triton_apb import _AUTOTUNED

    def num_tuned():
        return sum(len(autotuner.cache) for autotuner in _AUTOTUNED.values())

    q, k, v = _inputs(1, 8, 2, 300, 100, 3000, 128, torch.bfloat16, "cuda")
    apb_attention(q, k, v, num_passing=300, num_anchor=100)
    compiled, tuned = _num_compiled(), num_tuned()
    for num_passing, num_anchor, num_local in ((301, 99, 3001), (1, 0, 3333), (0, 7, 2999)):
        q, k, v = _inputs(1, 8, 2, num_passing, num_anchor, num_local, 128, torch.bfloat16, "cuda")
        out, lse = apb_attention(q, k, v, num_passing=num_passing, num_anchor=num_anchor)
        _check_against_refs(q, k, v, out, lse, num_passing=num_passing, num_anchor=num_anchor)
    assert _num_compiled() == compiled
    assert num_tuned() == tuned


# ---------------------------------------------------------------- CPU: scripts/bench_kernel.py's plumbing

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernel.py"


@pytest.fixture(scope="module")
def bench():
    with script_module(BENCH_SCRIPT) as module:
        yield module


def test_bench_dense_equivalent_length(bench):
    # 128K, last of 8 hosts: 14336 passing, 4096 anchor, 16384 local
    pairs = bench.visible_pairs(*bench.apb_lengths(131072))
    n = bench.dense_equivalent_length(pairs)
    assert n % 64 == 0 and abs(n * (n + 1) / 2 - pairs) / pairs < 0.01


def test_bench_markdown_variants_reports_errors_and_speedups(bench):
    rows = [
        dict(variant="default", context="128K", ms=13.0, tflops=560.0, maxdiff_out=0.0, maxdiff_lse=0.0),
        dict(
            variant="ws-128x128-w4-s2",
            context="128K",
            ms=11.0,
            tflops=662.0,
            maxdiff_out=1e-3,
            maxdiff_lse=2e-5,
        ),
        dict(variant="ws-128x64-w4-s4", context="128K", error="OutOfResources: shared memory | 278856"),
    ]
    table = bench.markdown_variants(rows, ["128K"]).splitlines()
    assert len(table) == 5 and "1.182x" in table[3] and "662" in table[3]
    assert "error: OutOfResources" in table[4] and table[4].count("|") == table[0].count("|")


def test_bench_markdown_table_names_the_best_full_attention(bench):
    row = dict(context="128K", passing=14336, anchor=4096, local=16384, ours_ms=12.0, ours_tflops=600.0,
               flex_ms=16.0, flex_tflops=450.0, dense_n=29824, sdpa_fa2_causal_tflops=330.0,
               sdpa_cudnn_causal_tflops=571.0, ours_causal_tflops=590.0, best_full="ours_causal",
               best_full_tflops=590.0)  # fmt: skip
    table = bench.markdown_table([row]).splitlines()
    assert "SDPA-cuDNN causal TF/s" in table[0] and "flash" not in table[0]
    assert "| ours 590 | 1.02x | 1.33x |" in table[2]
    with_flash = bench.markdown_table([dict(row, flash_causal_tflops=620.0)]).splitlines()
    assert "flash causal TF/s" in with_flash[0] and "| 620 |" in with_flash[2]


def test_bench_args_reject_unknown_names(bench):
    assert bench.parse_args(["--variants", "128K,32K"]).variants == "128K,32K"
    for argv in (["--variants", "100K"], ["--variant-names", "nope"], ["--contexts", "1K"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_bench_variants_run_each_in_a_process_and_survive_failures(bench, tmp_path, capsys):
    """Without a GPU every variant fails in its child: the parent still gets a row per context and a table."""
    if torch.cuda.is_available():
        pytest.skip("checks the failure path, which needs a machine without CUDA")
    out = tmp_path / "variants.json"
    bench.main_variants(["32K"], ["split-128x128-w8-s3"], str(out), timeout_s=120)
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["context"]) for r in rows] == [("split-128x128-w8-s3", "32K")]
    assert "error" in rows[0]
    assert "| split-128x128-w8-s3 | error:" in capsys.readouterr().out


def test_bench_variants_budget_skips_the_rest(bench, capsys):
    bench.main_variants(["128K"], ["default", "ws-128x128-w4-s2"], None, timeout_s=1, budget_s=-1)
    out = capsys.readouterr().out
    assert out.count("skipped: -1 s budget spent") == 2
