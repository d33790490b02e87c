#!/usr/bin/env python
"""Benchmark APB attention (forward) on one GPU: our Triton kernel vs flex_attention vs SDPA.

Shapes: Llama-3.1-8B attention (32 q heads, 8 kv heads, head_dim 128), the last of 8 hosts by the paper's
defaults for a context of n tokens: block = n/8 local tokens, anchor = min(block/4, 8192), passing =
7 earlier hosts x block/8. Useful TFLOP/s = 4 * visible (q, k) pairs * head_dim * num_heads / time.

    python scripts/bench_kernel.py                       # the table (32K/64K/128K/256K)
    python scripts/bench_kernel.py --sweep 128K          # time fixed tile configs at one context
    python scripts/bench_kernel.py --first-call          # cold-process first call (run with a fresh TRITON_CACHE_DIR)
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing
from apb.kernels import apb_attention
from apb.kernels.triton_apb import apb_attention_triton

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_HOSTS = 32, 8, 128, 8
CONTEXTS = {"32K": 32768, "64K": 65536, "128K": 131072, "256K": 262144}


def apb_lengths(context: int) -> tuple[int, int, int]:
    """(num_passing, num_anchor, num_local) of the last host by the paper's defaults."""
    block = context // NUM_HOSTS
    return (NUM_HOSTS - 1) * (block // 8), min(block // 4, 8192), block


def visible_pairs(num_passing: int, num_anchor: int, num_local: int) -> int:
    return (
        num_anchor * (num_anchor + 1) // 2
        + num_local * (num_passing + num_anchor)
        + num_local * (num_local + 1) // 2
    )


def make_inputs(num_passing, num_anchor, num_local, head_dim=HEAD_DIM, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n_q, n_k = num_anchor + num_local, num_passing + num_anchor + num_local
    q = torch.randn(1, NUM_HEADS, n_q, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(1, NUM_KV_HEADS, n_k, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(1, NUM_KV_HEADS, n_k, head_dim, device="cuda", dtype=dtype, generator=gen)
    return q, k, v


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def tflops(pairs: int, ms: float, head_dim: int = HEAD_DIM) -> float:
    return 4 * pairs * head_dim * NUM_HEADS / (ms * 1e-3) / 1e12


def flex_fn(q, k, v, num_passing, num_anchor):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + num_passing) & ((kv_idx >= num_passing) | (q_idx >= num_anchor))

    block_mask = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def sdpa_mask_fn(q, k, v, num_passing, num_anchor):
    from apb.kernels import apb_mask

    group = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = apb_mask(num_passing, num_anchor, q.shape[2] - num_anchor, device="cuda")[None, None]
    return lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask)


def sdpa_causal_fn(pairs: int, head_dim: int = HEAD_DIM):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = int(round(math.sqrt(2 * pairs) / 64)) * 64
    q = torch.randn(1, NUM_HEADS, n, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run, n * (n + 1) // 2


def timed_first_call(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_context(name: str, skip: set[str]) -> dict:
    """Time every method at one context; returns one table row."""
    num_passing, num_anchor, num_local = apb_lengths(CONTEXTS[name])
    pairs = visible_pairs(num_passing, num_anchor, num_local)
    q, k, v = make_inputs(num_passing, num_anchor, num_local)
    row = dict(context=name, passing=num_passing, anchor=num_anchor, local=num_local, pairs=pairs)
    ours = lambda: apb_attention(q, k, v, num_passing=num_passing, num_anchor=num_anchor)  # noqa: E731
    row["ours_first_s"] = timed_first_call(ours)
    row["ours_ms"] = bench_ms(ours)
    if "flex" not in skip:
        try:
            t0 = time.perf_counter()
            fn = flex_fn(q, k, v, num_passing, num_anchor)
            row["flex_first_s"] = timed_first_call(fn) + (time.perf_counter() - t0)
            row["flex_ms"] = bench_ms(fn)
            # Same function, check agreement (flex's output vs ours) to be sure both compute APB.
            row["flex_vs_ours_maxdiff"] = (fn().float() - ours()[0].float()).abs().max().item()
        except Exception as e:  # noqa: BLE001 - report and go on
            row["flex_error"] = repr(e)[:200]
    if "sdpa_mask" not in skip:
        try:
            fn = sdpa_mask_fn(q, k, v, num_passing, num_anchor)
            row["sdpa_mask_ms"] = bench_ms(fn)
        except Exception as e:  # noqa: BLE001
            row["sdpa_mask_error"] = repr(e)[:200]
    torch.cuda.empty_cache()
    fn, causal_pairs = sdpa_causal_fn(pairs)
    row["sdpa_causal_ms"] = bench_ms(fn)
    row["sdpa_causal_tflops"] = tflops(causal_pairs, row["sdpa_causal_ms"])
    for key in ("ours", "flex", "sdpa_mask"):
        if f"{key}_ms" in row:
            row[f"{key}_tflops"] = tflops(pairs, row[f"{key}_ms"])
    # First call at a never-seen length (same process, kernel already used): a ragged shape.
    q2, k2, v2 = make_inputs(num_passing + 5, num_anchor - 3, num_local + 37, seed=1)
    row["ours_new_length_s"] = timed_first_call(
        lambda: apb_attention(q2, k2, v2, num_passing=num_passing + 5, num_anchor=num_anchor - 3)
    )
    if "flex" not in skip:
        try:
            t0 = time.perf_counter()
            fn = flex_fn(q2, k2, v2, num_passing + 5, num_anchor - 3)
            row["flex_new_length_s"] = timed_first_call(fn) + (time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001
            row["flex_new_length_error"] = repr(e)[:200]
        torch._dynamo.reset()  # dynamo's recompile limit is per code object: start each context clean
    return row


def main_table(contexts: list[str], skip: set[str], out_json: str | None) -> None:
    rows = []
    for name in contexts:
        row = bench_context(name, skip)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print(
        "| context | P/A/L | ours ms (TF/s) | flex ms (TF/s) | SDPA mask ms (TF/s) | SDPA-flash causal TF/s | ours/flex |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:

        def cell(key, r=r):
            return f"{r[key + '_ms']:.2f} ({r[key + '_tflops']:.0f})" if key + "_ms" in r else "n/a"

        ratio = f"{r['flex_ms'] / r['ours_ms']:.2f}x" if "flex_ms" in r else "n/a"
        print(
            f"| {r['context']} | {r['passing']}/{r['anchor']}/{r['local']} | {cell('ours')} | {cell('flex')} | "
            f"{cell('sdpa_mask')} | {r['sdpa_causal_tflops']:.0f} | {ratio} |"
        )
    print("first calls (s): " + "; ".join(
        f"{r['context']}: ours first {r['ours_first_s']:.2f}, ours new length {r['ours_new_length_s']:.3f}, "
        f"flex first {r.get('flex_first_s', float('nan')):.2f}, flex new length {r.get('flex_new_length_s', float('nan')):.2f}"
        for r in rows
    ))  # fmt: skip
    from apb.kernels.triton_apb import _apb_fwd_autotuned

    for key, config in _apb_fwd_autotuned.cache.items():
        print(f"autotuned {key}: {config}")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)


def main_sweep(context: str, head_dim: int, tma_modes: tuple[bool, ...]) -> None:
    num_passing, num_anchor, num_local = apb_lengths(CONTEXTS[context])
    pairs = visible_pairs(num_passing, num_anchor, num_local)
    q, k, v = make_inputs(num_passing, num_anchor, num_local, head_dim=head_dim)
    results = []
    shapes = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3),
              (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4)]  # fmt: skip
    for use_tma in tma_modes:
        for bm, bn, warps, stages in shapes:
            try:
                fn = lambda bm=bm, bn=bn, warps=warps, stages=stages, use_tma=use_tma: apb_attention_triton(  # noqa: E731
                    q, k, v, num_passing=num_passing, num_anchor=num_anchor,
                    block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, use_tma=use_tma,
                )  # fmt: skip
                fn()
                ms = bench_ms(fn)
            except Exception as e:  # noqa: BLE001 - out of shared memory etc.
                print(f"tma={use_tma} BM={bm} BN={bn} w={warps} s={stages}: {type(e).__name__}", flush=True)
                continue
            results.append((ms, bm, bn, warps, stages, use_tma))
            print(f"tma={use_tma} BM={bm} BN={bn} w={warps} s={stages}: {ms:.3f} ms "
                  f"{tflops(pairs, ms, head_dim):.0f} TF/s", flush=True)  # fmt: skip
    results.sort()
    print(f"best for {context} d={head_dim}: " + ", ".join(
        f"({bm},{bn},w{w},s{s},tma={t}) {ms:.2f}ms {tflops(pairs, ms, head_dim):.0f}TF/s"
        for ms, bm, bn, w, s, t in results[:6]
    ))  # fmt: skip


def main_profile() -> None:
    """Two launches of the default tile at 128K for Nsight Compute (profile the second)."""
    num_passing, num_anchor, num_local = apb_lengths(CONTEXTS["128K"])
    q, k, v = make_inputs(num_passing, num_anchor, num_local)
    for _ in range(2):
        apb_attention_triton(q, k, v, num_passing=num_passing, num_anchor=num_anchor,
                             block_m=128, block_n=128, num_warps=8, num_stages=3)  # fmt: skip
    torch.cuda.synchronize()


def main_first_call() -> None:
    num_passing, num_anchor, num_local = 14336 + 11, 4096 - 5, 16384 + 29
    q, k, v = make_inputs(num_passing, num_anchor, num_local)
    torch.cuda.synchronize()
    seconds = timed_first_call(lambda: apb_attention(q, k, v, num_passing=num_passing, num_anchor=num_anchor))
    print(f"cold-process first call (compile + autotune) at a ragged 128K shape: {seconds:.2f} s")
    seconds = timed_first_call(lambda: apb_attention(q, k, v, num_passing=num_passing, num_anchor=num_anchor))
    print(f"second call: {seconds * 1e3:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", default="32K,64K,128K,256K")
    parser.add_argument("--skip", default="", help="comma list of flex,sdpa_mask")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--sweep", default=None, help="context to sweep tile configs at, e.g. 128K")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--sweep-tma", default="both", choices=["both", "1", "0"])
    parser.add_argument("--first-call", action="store_true")
    parser.add_argument("--profile", action="store_true", help="run the kernel twice at 128K (for ncu)")
    args = parser.parse_args()
    if args.sweep:
        main_sweep(
            args.sweep, args.head_dim, {"both": (False, True), "1": (True,), "0": (False,)}[args.sweep_tma]
        )
    elif args.profile:
        main_profile()
    elif args.first_call:
        main_first_call()
    else:
        main_table(args.contexts.split(","), set(filter(None, args.skip.split(","))), args.json)
