#!/usr/bin/env python
"""Benchmark APB attention (forward) on one GPU: our Triton kernel vs flex_attention, SDPA and the fastest
dense causal attention the machine has.

Shapes: Llama-3.1-8B attention (32 q heads, 8 kv heads, head_dim 128), the last of 8 hosts by the paper's
defaults for a context of n tokens: block = n/8 local tokens, anchor = min(block/4, 8192), passing =
7 earlier hosts x block/8. Useful TFLOP/s = 4 * visible (q, k) pairs * head_dim * num_heads / time.
Dense causal baselines run at the "dense equivalent" length: the n whose causal pairs equal the APB
pairs (so the same work), each on its own pairs: SDPA with the FlashAttention-2 and the cuDNN backends
(32 heads, no GQA), our kernel with passing = anchor = 0 (plain causal; 8 kv heads), and the `flash`
backend of apb.backends when it is installed (FlashAttention-4 or -2, 8 kv heads).

    python scripts/bench_kernel.py                       # the table (32K/64K/128K/256K)
    python scripts/bench_kernel.py --variants 128K,32K   # every kernel variant, then the table
    python scripts/bench_kernel.py --sweep 128K          # time fixed tile configs at one context
    python scripts/bench_kernel.py --first-call          # cold-process first call (run with a fresh TRITON_CACHE_DIR)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_HOSTS = 32, 8, 128, 8
CONTEXTS = {"32K": 32768, "64K": 65536, "128K": 131072, "256K": 262144}

# Ways to run our kernel (keyword arguments of apb_attention_triton). "default" is what apb.kernels runs
# on this GPU (autotuned); the others fix the tile, warps and stages. split: an unmasked and a masked key
# loop; fused: one loop masked on every tile, Q/K/V through TMA (the form warp specialization takes);
# ws: fused + warp_specialize (producer warp group + two consumers, 12 warps); persistent: one program
# per SM striding over the query tiles.
VARIANTS = {  # in the order they run: the most telling first, in case the time budget runs out
    "default": {},
    "split-128x128-w8-s3": dict(block_m=128, block_n=128, num_warps=8, num_stages=3, use_tma=True),
    "ws-128x128-w4-s2": dict(block_m=128, block_n=128, num_warps=4, num_stages=2, warp_specialize=True),
    "ws-128x64-w4-s3": dict(block_m=128, block_n=64, num_warps=4, num_stages=3, warp_specialize=True),
    "ws-persistent-128x128-w4-s2": dict(
        block_m=128, block_n=128, num_warps=4, num_stages=2, warp_specialize=True, persistent=True
    ),
    "fused-128x128-w8-s3": dict(
        block_m=128, block_n=128, num_warps=8, num_stages=3, use_tma=True, fused=True
    ),
    "ws-128x64-w4-s4": dict(block_m=128, block_n=64, num_warps=4, num_stages=4, warp_specialize=True),
    "ws-persistent-128x64-w4-s3": dict(
        block_m=128, block_n=64, num_warps=4, num_stages=3, warp_specialize=True, persistent=True
    ),
    "split-persistent-128x128-w8-s3": dict(
        block_m=128, block_n=128, num_warps=8, num_stages=3, use_tma=True, persistent=True
    ),
    "ws-autotuned": dict(warp_specialize=True),
}
# The variant every other one is checked against (max |out - out_ref|): the tested split-loop kernel.
CHECK_VARIANT = "split-128x128-w8-s3"


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


def dense_equivalent_length(pairs: int) -> int:
    """The causal length (a multiple of 64) whose n (n + 1) / 2 pairs are closest to `pairs`."""
    return int(round(math.sqrt(2 * pairs) / 64)) * 64


def tflops(pairs: int, ms: float, head_dim: int = HEAD_DIM) -> float:
    return 4 * pairs * head_dim * NUM_HEADS / (ms * 1e-3) / 1e12


def make_inputs(num_passing, num_anchor, num_local, head_dim=HEAD_DIM, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n_q, n_k = num_anchor + num_local, num_passing + num_anchor + num_local
    q = torch.randn(1, NUM_HEADS, n_q, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(1, NUM_KV_HEADS, n_k, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(1, NUM_KV_HEADS, n_k, head_dim, device="cuda", dtype=dtype, generator=gen)
    return q, k, v


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def timed_first_call(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def flash_backend() -> tuple[str, object] | None:
    """apb.backends' FlashAttention backend ("flash4", or "flash": FA4 when flash-attn-4 is installed)."""
    try:
        from apb import backends

        names = backends.available_backends("cuda")
        for name in ("flash4", "flash"):
            if name in names:
                return name, backends.get_backend(name, "cuda")
    except Exception as e:  # noqa: BLE001 - optional: report and go on without it
        print(f"no flash backend: {e!r}"[:200], flush=True)
    return None


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


def dense_causal_fns(n: int, flash) -> dict:
    """Dense causal attention over n tokens, by name: the full-attention baselines."""
    from apb.kernels import apb_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, NUM_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    k_gqa, v_gqa = k[:, :NUM_KV_HEADS].contiguous(), v[:, :NUM_KV_HEADS].contiguous()

    def sdpa(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run

    fns = {
        "sdpa_fa2_causal": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn_causal": sdpa(SDPBackend.CUDNN_ATTENTION),
        # passing = anchor = 0 is APB's mask reduced to plain causal attention
        "ours_causal": lambda: apb_attention(q, k_gqa, v_gqa, num_passing=0, num_anchor=0),
    }
    if flash is not None:
        fns["flash_causal"] = lambda: flash[1](q, k_gqa, v_gqa, num_passing=0, num_anchor=0)
    return fns


DENSE_NAMES = {
    "sdpa_fa2_causal": "SDPA-FA2",
    "sdpa_cudnn_causal": "SDPA-cuDNN",
    "ours_causal": "ours",
    "flash_causal": "flash",
}


def bench_context(name: str, skip: set[str], flash) -> dict:
    """Time every method at one context; returns one table row."""
    num_passing, num_anchor, num_local = apb_lengths(CONTEXTS[name])
    pairs = visible_pairs(num_passing, num_anchor, num_local)
    row = dict(context=name, passing=num_passing, anchor=num_anchor, local=num_local, pairs=pairs)
    bench_apb_mask(row, skip, flash)
    torch.cuda.empty_cache()
    bench_dense(row, skip, flash)
    torch.cuda.empty_cache()
    bench_new_length(row, skip)
    return row


def bench_apb_mask(row: dict, skip: set[str], flash) -> None:
    """Ours, flex, SDPA with a mask tensor and the flash backend on APB's mask: fills row's *_ms, *_tflops."""
    from apb.kernels import apb_attention

    num_passing, num_anchor = row["passing"], row["anchor"]
    q, k, v = make_inputs(num_passing, num_anchor, row["local"])
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
    if flash is not None and "flash" not in skip:
        try:
            fn = lambda: flash[1](q, k, v, num_passing=num_passing, num_anchor=num_anchor)  # noqa: E731
            row["flash_first_s"] = timed_first_call(fn)
            row["flash_ms"] = bench_ms(fn)
            row["flash_vs_ours_maxdiff"] = (fn()[0].float() - ours()[0].float()).abs().max().item()
        except Exception as e:  # noqa: BLE001
            row["flash_error"] = repr(e)[:200]
    for key in ("ours", "flex", "sdpa_mask", "flash"):
        if f"{key}_ms" in row:
            row[f"{key}_tflops"] = tflops(row["pairs"], row[f"{key}_ms"])


def bench_dense(row: dict, skip: set[str], flash) -> None:
    """Every dense causal baseline at the dense-equivalent length; the fastest is "best_full"."""
    n = dense_equivalent_length(row["pairs"])
    row["dense_n"] = n
    for key, fn in dense_causal_fns(n, flash if "flash" not in skip else None).items():
        try:
            fn()
            row[f"{key}_ms"] = bench_ms(fn)
            row[f"{key}_tflops"] = tflops(n * (n + 1) // 2, row[f"{key}_ms"])
        except Exception as e:  # noqa: BLE001 - e.g. a backend this build of torch lacks
            row[f"{key}_error"] = repr(e)[:200]
    dense = {k: row[f"{k}_tflops"] for k in DENSE_NAMES if f"{k}_tflops" in row}
    if dense:
        row["best_full"] = max(dense, key=dense.get)
        row["best_full_tflops"] = dense[row["best_full"]]


def bench_new_length(row: dict, skip: set[str]) -> None:
    """First call at a never-seen length (same process, kernel already used): a ragged shape."""
    from apb.kernels import apb_attention

    num_passing, num_anchor, num_local = row["passing"], row["anchor"], row["local"]
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


def markdown_table(rows: list[dict]) -> str:
    def cell(r, key):
        return f"{r[key + '_ms']:.2f} ({r[key + '_tflops']:.0f})" if key + "_ms" in r else "n/a"

    def tf(r, key):
        return f"{r[key + '_tflops']:.0f}" if key + "_tflops" in r else "n/a"

    with_flash = any("flash_ms" in r or "flash_causal_tflops" in r for r in rows)
    head = ["context", "P/A/L", "ours ms (TF/s)", "flex ms (TF/s)", "SDPA mask ms (TF/s)"]
    head += ["flash APB ms (TF/s)"] if with_flash else []
    head += [
        "dense n",
        *(f"{DENSE_NAMES[k]} causal TF/s" for k in DENSE_NAMES if with_flash or k != "flash_causal"),
    ]
    head += ["best full", "ours / best full", "ours / flex"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["context"], f"{r['passing']}/{r['anchor']}/{r['local']}", cell(r, "ours"), cell(r, "flex")]
        cells += [cell(r, "sdpa_mask")] + ([cell(r, "flash")] if with_flash else [])
        cells += [str(r.get("dense_n", "n/a"))]
        cells += [tf(r, k) for k in DENSE_NAMES if with_flash or k != "flash_causal"]
        best = r.get("best_full")
        cells += [f"{DENSE_NAMES[best]} {r['best_full_tflops']:.0f}" if best else "n/a"]
        cells += [f"{r['ours_tflops'] / r['best_full_tflops']:.2f}x" if best else "n/a"]
        cells += [f"{r['flex_ms'] / r['ours_ms']:.2f}x" if "flex_ms" in r else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_table(contexts: list[str], skip: set[str], out_json: str | None) -> None:
    import triton

    flash = flash_backend()
    print(f"flash backend: {flash[0] if flash else 'none'}", flush=True)
    rows = []
    for name in contexts:
        row = bench_context(name, skip, flash)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print(markdown_table(rows))
    print("first calls (s): " + "; ".join(
        f"{r['context']}: ours first {r['ours_first_s']:.2f}, ours new length {r['ours_new_length_s']:.3f}, "
        f"flex first {r.get('flex_first_s', float('nan')):.2f}, flex new length {r.get('flex_new_length_s', float('nan')):.2f}"
        for r in rows
    ))  # fmt: skip
    from apb.kernels.triton_apb import _AUTOTUNED

    for autotuner in _AUTOTUNED.values():
        for key, config in autotuner.cache.items():
            print(f"autotuned {key}: {config}")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)


# ---------------------------------------------------------------- variants


def variant_child(name: str, contexts: list[str]) -> None:
    """Time one variant at each context (one JSON line each); run in its own process by `main_variants`."""
    for context in contexts:
        row = dict(variant=name, context=context, **VARIANTS[name])
        try:
            row.update(time_variant(name, context))
        except Exception as e:  # noqa: BLE001 - a compile error (out of shared memory, ...): report, go on
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        print("VARIANT " + json.dumps(row), flush=True)
        torch.cuda.empty_cache()


def time_variant(name: str, context: str) -> dict:
    from apb.kernels.triton_apb import apb_attention_triton

    num_passing, num_anchor, num_local = apb_lengths(CONTEXTS[context])
    q, k, v = make_inputs(num_passing, num_anchor, num_local)

    def run(variant):
        return apb_attention_triton(q, k, v, num_passing=num_passing, num_anchor=num_anchor, **variant)

    row = dict(first_s=timed_first_call(lambda: run(VARIANTS[name])))
    row["ms"] = bench_ms(lambda: run(VARIANTS[name]))
    row["tflops"] = tflops(visible_pairs(num_passing, num_anchor, num_local), row["ms"])
    (out, lse), (ref_out, ref_lse) = run(VARIANTS[name]), run(VARIANTS[CHECK_VARIANT])
    row["maxdiff_out"] = (out.float() - ref_out.float()).abs().max().item()
    row["maxdiff_lse"] = (lse - ref_lse).abs().max().item()
    return row


def markdown_variants(rows: list[dict], contexts: list[str]) -> str:
    """One line per variant: ms (TF/s) per context, speedup against "default" at each context."""
    by = {(r["variant"], r["context"]): r for r in rows}
    names = list(dict.fromkeys(r["variant"] for r in rows))
    head = ["variant", *(f"{c} ms (TF/s)" for c in contexts), *(f"{c} vs default" for c in contexts)]
    head += ["max diff out / lse"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in names:
        cells, ratios, diffs = [name], [], []
        for c in contexts:
            r, base = by.get((name, c), {}), by.get(("default", c), {})
            if "ms" in r:
                cells.append(f"{r['ms']:.2f} ({r['tflops']:.0f})")
                ratios.append(f"{base['ms'] / r['ms']:.3f}x" if "ms" in base else "n/a")
                diffs.append(f"{r['maxdiff_out']:.1e} / {r['maxdiff_lse']:.1e}")
            else:
                cells.append("error: " + r.get("error", "not run")[:60].replace("|", "/"))
                ratios.append("n/a")
        lines.append("| " + " | ".join(cells + ratios + [", ".join(diffs) or "n/a"]) + " |")
    return "\n".join(lines)


def main_variants(
    contexts: list[str], names: list[str], out_json: str | None, timeout_s: float, budget_s: float = math.inf
) -> None:
    """Every variant in its own process (a compiler crash takes only that one down), then one table.
    No variant starts after `budget_s` seconds; those left are reported as skipped."""
    rows = []
    t0 = time.perf_counter()
    for name in names:
        start = time.perf_counter()
        if start - t0 > budget_s:
            rows += [
                dict(variant=name, context=c, error=f"skipped: {budget_s:.0f} s budget spent")
                for c in contexts
            ]
            continue
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--variant-child",
            name,
            "--contexts",
            ",".join(contexts),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            got = [json.loads(line[8:]) for line in proc.stdout.splitlines() if line.startswith("VARIANT ")]
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                print(f"{name}: exit {proc.returncode}: " + " / ".join(tail)[-600:], flush=True)
        except subprocess.TimeoutExpired:
            got = []
            print(f"{name}: timed out after {timeout_s:.0f} s", flush=True)
        done = {r["context"] for r in got}
        got += [
            dict(variant=name, context=c, error="crashed or timed out") for c in contexts if c not in done
        ]
        for r in got:
            print(json.dumps(r), flush=True)
        rows += got
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"\nvariants ({device}; max diff against {CHECK_VARIANT}):")
    print(markdown_variants(rows, contexts))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)


# ---------------------------------------------------------------- sweep, profile, first call


def main_sweep(context: str, head_dim: int, tma_modes: tuple[bool, ...]) -> None:
    from apb.kernels.triton_apb import apb_attention_triton

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
    from apb.kernels.triton_apb import apb_attention_triton

    num_passing, num_anchor, num_local = apb_lengths(CONTEXTS["128K"])
    q, k, v = make_inputs(num_passing, num_anchor, num_local)
    for _ in range(2):
        apb_attention_triton(q, k, v, num_passing=num_passing, num_anchor=num_anchor,
                             block_m=128, block_n=128, num_warps=8, num_stages=3)  # fmt: skip
    torch.cuda.synchronize()


def main_first_call() -> None:
    from apb.kernels import apb_attention

    num_passing, num_anchor, num_local = 14336 + 11, 4096 - 5, 16384 + 29
    q, k, v = make_inputs(num_passing, num_anchor, num_local)
    torch.cuda.synchronize()
    seconds = timed_first_call(lambda: apb_attention(q, k, v, num_passing=num_passing, num_anchor=num_anchor))
    print(f"cold-process first call (compile + autotune) at a ragged 128K shape: {seconds:.2f} s")
    seconds = timed_first_call(lambda: apb_attention(q, k, v, num_passing=num_passing, num_anchor=num_anchor))
    print(f"second call: {seconds * 1e3:.1f} ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", default="32K,64K,128K,256K")
    parser.add_argument("--skip", default="", help="comma list of flex,sdpa_mask,flash,table")
    parser.add_argument("--json", default=None, help="write the table's rows here")
    parser.add_argument(
        "--variants",
        default=None,
        help="contexts (e.g. 128K,32K) to time every kernel variant at, before the table",
    )
    parser.add_argument("--variant-names", default=",".join(VARIANTS), help="comma list of variants to time")
    parser.add_argument("--variants-json", default=None, help="write the variants' rows here")
    parser.add_argument("--variant-timeout-s", type=float, default=90.0, help="per variant (its own process)")
    parser.add_argument(
        "--variants-budget-s", type=float, default=math.inf, help="start no variant after this many seconds"
    )
    parser.add_argument("--variant-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sweep", default=None, help="context to sweep tile configs at, e.g. 128K")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
    parser.add_argument("--sweep-tma", default="both", choices=["both", "1", "0"])
    parser.add_argument("--first-call", action="store_true")
    parser.add_argument("--profile", action="store_true", help="run the kernel twice at 128K (for ncu)")
    args = parser.parse_args(argv)
    for arg in (args.contexts, args.variants or ""):
        unknown = [c for c in arg.split(",") if c and c not in CONTEXTS]
        if unknown:
            parser.error(f"unknown context(s) {unknown}; choose from {', '.join(CONTEXTS)}")
    unknown = [n for n in args.variant_names.split(",") if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return args


if __name__ == "__main__":
    args = parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.variant_child:
        variant_child(args.variant_child, args.contexts.split(","))
    elif args.sweep:
        main_sweep(
            args.sweep, args.head_dim, {"both": (False, True), "1": (True,), "0": (False,)}[args.sweep_tma]
        )
    elif args.profile:
        main_profile()
    elif args.first_call:
        main_first_call()
    else:
        if args.variants:
            names = args.variant_names.split(",")
            main_variants(
                args.variants.split(","),
                names,
                args.variants_json,
                args.variant_timeout_s,
                args.variants_budget_s,
            )
        if "table" not in skip:
            main_table(args.contexts.split(","), skip, args.json)
