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
import textwrap
from pathlib import Path

import pytest
import torch
from apb.kernels import apb_attention, apb_attention_ref, apb_mask, decode_attention_ref
from apb.kernels.triton_apb import HAS_TRITON
from conftest import run_under_interpreter, script_module

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
    """`label` names the case in a failure message (which load path, which shapes)."""
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
    cases, load_paths = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    results = []
    for c in cases:
        gen = torch.Generator().manual_seed(len(results))
        nq, nk = c["A"] + c["L"], c["P"] + c["A"] + c["L"]
        q = torch.randn(c["B"], c["H"], nq, c["D"], generator=gen).half()
        k = torch.randn(c["B"], c["KV"], nk, c["D"], generator=gen).half()
        v = torch.randn(c["B"], c["KV"], nk, c["D"], generator=gen).half()
        if c.get("strided"):  # q as a transpose of [batch, queries, heads, dim], as attention modules give it
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        for name, load_path in load_paths.items():
            out, lse = apb_attention_triton(q, k, v, num_passing=c["P"], num_anchor=c["A"], **load_path,
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
    dict(
        B=1, H=2, KV=1, P=10, A=128, L=20, D=16, BM=64, BN=32
    ),  # anchor a multiple of the tile: no mixed tile
    # decoding's forms (decode_attention): every key visible (shift = queries), and a shifted diagonal
    dict(B=1, H=4, KV=2, P=40, A=0, L=5, D=16, BM=16, BN=16, shift=5),
    dict(B=1, H=2, KV=1, P=3, A=0, L=20, D=16, BM=16, BN=16, shift=7),
]


# The kernel's two ways to load K/V: pointer loads and TMA descriptors (the default from sm90 on).
LOAD_PATHS = {"pointers": dict(use_tma=False), "tma": dict(use_tma=True)}


def _triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2])


def needs_triton_interpreter(test):
    """Skip `test` without triton, or with a triton < 3.7, whose interpreter cannot loop over bounds that
    come from program ids or kernel arguments (1-element arrays); there the kernels are covered compiled by
    the single_gpu tests."""
    test = pytest.mark.skipif(
        HAS_TRITON and _triton_version() < (3, 7),
        reason="triton < 3.7's interpreter cannot loop over bounds derived from program ids or arguments "
        "(1-element arrays); there the kernels are covered compiled by the single_gpu tests",
    )(test)
    return pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")(test)


@needs_triton_interpreter
def test_kernel_under_interpreter(tmp_path):
    cases = [dict(c, path=str(tmp_path / f"case{i}.pt")) for i, c in enumerate(_INTERPRETER_CASES)]
    run_under_interpreter(_INTERPRETER_SCRIPT, json.dumps(cases), json.dumps(LOAD_PATHS), cwd=tmp_path)
    for c in cases:
        for name in LOAD_PATHS:
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


@pytest.mark.single_gpu
@needs_cuda
@pytest.mark.parametrize("load_path", list(LOAD_PATHS))
@pytest.mark.parametrize(
    "num_passing,num_anchor,num_local", [(0, 0, 1), (517, 129, 1000), (1000, 300, 4133), (300, 256, 999)]
)
def test_kernel_gpu_both_load_paths(load_path, num_passing, num_anchor, num_local):
    """Pointer and TMA loads of K/V, whichever is the default, at a fixed config and autotuned."""
    from apb.kernels.triton_apb import apb_attention_triton

    options = LOAD_PATHS[load_path]
    if options["use_tma"] and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    q, k, v = _inputs(2, 8, 2, num_passing, num_anchor, num_local, 128, torch.bfloat16, "cuda")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [batch, queries, heads, dim] memory, as HF gives it
    for config in (dict(block_m=128, block_n=64, num_warps=8, num_stages=3), {}):
        out, lse = apb_attention_triton(
            q, k, v, num_passing=num_passing, num_anchor=num_anchor, **options, **config
        )
        _check_against_refs(
            q, k, v, out, lse, num_passing=num_passing, num_anchor=num_anchor, label=f"{load_path} {config}"
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
    from apb.kernels.triton_apb import _apb_fwd_autotuned

    def num_tuned():
        return len(_apb_fwd_autotuned.cache)

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
    # with host 0's shared anchor the host runs no anchor rows; its block still sees the anchor's keys
    assert bench.apb_lengths(131072, shared_anchor=True) == (14336 + 4096, 0, 16384)
    shared = bench.visible_pairs(*bench.apb_lengths(131072, shared_anchor=True))
    assert pairs - shared == 4096 * 4097 // 2  # the anchor rows' own causal pairs


def _bench_row(**extra):
    """A 128K row as `main_table` records it (numbers made up)."""
    row = dict(context="128K", passing=14336, anchor=4096, local=16384, pairs=444606464, default="fa4_split",
               triton_ms=12.9, triton_tflops=565.0, fa4_split_ms=11.0, fa4_split_tflops=660.0,
               flex_ms=16.7, flex_tflops=436.0, dense_n=29824, sdpa_fa2_causal_tflops=346.0,
               sdpa_cudnn_causal_tflops=597.0, triton_causal_tflops=558.0, fa4_causal_tflops=665.0,
               best_full="fa4_causal", best_full_tflops=665.0)  # fmt: skip
    return dict(row, **extra)


def test_bench_table_has_both_backends_and_the_best_full_attention(bench):
    table = bench.markdown_table([_bench_row()]).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[2:5] == ["Triton ms (TF/s)", "FA4 split ms (TF/s)", "flex ms (TF/s)"]
    assert "SDPA-cuDNN causal TF/s" in head and "FA4 causal TF/s" in head and "FA4 mask ms (TF/s)" not in head
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert len(cells) == len(head)
    assert cells[head.index("default")] == "FA4 split"
    assert cells[-3:] == ["FA4 665", "0.99x", "1.52x"]  # 660 / 665; 16.7 ms / 11.0 ms


def test_bench_table_without_fa4_defaults_to_triton(bench):
    row = {k: v for k, v in _bench_row().items() if not k.startswith("fa4")}
    row.update(default="triton", best_full="sdpa_cudnn_causal", best_full_tflops=597.0)
    table = bench.markdown_table([row]).splitlines()
    assert "FA4" not in table[0]
    assert table[2].endswith("| Triton | 29824 | 346 | 597 | 558 | SDPA-cuDNN 597 | 0.95x | 1.29x |")


def test_bench_full_causal_table_and_first_calls(bench):
    full = dict(context="128K", kind="full_causal", dense_n=131072, fa4_causal_ms=208.3, fa4_causal_tflops=675.8,
                sdpa_cudnn_causal_ms=256.8, sdpa_cudnn_causal_tflops=548.0, best_full="fa4_causal",
                best_full_tflops=675.8)  # fmt: skip
    table = bench.markdown_full_causal([full]).splitlines()
    assert table[2] == "| 128K | 256.80 (548) | 208.30 (676) | FA4 676 |"
    row = _bench_row(triton_first_s=0.35, triton_new_length_s=0.015, fa4_split_first_s=3.9)
    assert (
        bench.first_calls_line([row])
        == "first call / new length (s): 128K: Triton 0.35 / 0.015, FA4 split 3.90 / nan"
    )


def test_bench_args(bench):
    args = bench.parse_args(["--flash-methods", "split,mask", "--full-causal", "32K,128K", "--skip", "flex"])
    assert args.flash_methods == ["split", "mask"] and args.full_causal == ["32K", "128K"]
    assert args.skip == {"flex"} and args.contexts == ["32K", "64K", "128K", "256K"]
    assert bench.parse_args(["--contexts", ""]).contexts == []
    for argv in (
        ["--contexts", "1K"],
        ["--full-causal", "100K"],
        ["--flash-methods", "fused"],
        ["--skip", "ws"],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
