#!/usr/bin/env python
"""Benchmark APB attention (forward) on one GPU: every backend on APB's mask, against the fastest dense
causal attention the machine has. This is the script behind the kernel table of benchmarks/RESULTS.md.

Shapes: Llama-3.1-8B attention (32 q heads, 8 kv heads, head_dim 128, bf16, batch 1), the last of 8 hosts
by the paper's defaults for a context of n tokens: block = n/8 local tokens, anchor = min(block/4, 8192),
passing = 7 earlier hosts x block/8. With --shared-anchor, the call that host makes when host 0 computes
the anchor for everyone (the default): no anchor rows, the anchor's keys in front of the block. Useful
TFLOP/s = 4 * visible (q, k) pairs * head_dim * num_heads / time; median of `triton.testing.do_bench` (warmup 50 ms, rep 300 ms).

APB mask: the Triton kernel (`apb.kernels.apb_attention`), FlashAttention-4 (`apb.kernels.flash4`, one
column per method of --flash-methods; "split" is what the flash backend runs), flex_attention (compiled,
block mask built once) and SDPA with a boolean mask. "default" is the one `apb.backends`' "auto" runs here.
Dense causal ("full attention") at the same work: the length n whose causal pairs equal the APB pairs,
each on its own pairs: SDPA with the FlashAttention-2 and the cuDNN backends (32 heads, no GQA), the
Triton kernel with passing = anchor = 0 and FA4 causal (8 kv heads). "best full" is the fastest of them.
--full-causal times the same dense baselines over a whole context (n = the context).

    python scripts/bench_kernel.py --flash-methods split,mask --full-causal 32K,64K,128K --json kernel.json
    python scripts/bench_kernel.py --sweep 128K          # tile configs of the Triton kernel at one context
    python scripts/bench_kernel.py --first-call          # cold-process first calls (fresh TRITON_CACHE_DIR)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_HOSTS = 32, 8, 128, 8
CONTEXTS = {"32K": 32768, "64K": 65536, "128K": 131072, "256K": 262144}
FLASH_METHODS = ("split", "mask")
SKIPPABLE = ("triton", "fa4", "flex", "sdpa_mask", "dense", "table")

# Column names of the row keys, in table order.
APB_NAMES = {
    "triton": "Triton",
    "fa4_split": "FA4 split",
    "fa4_mask": "FA4 mask",
    "flex": "flex",
    "sdpa_mask": "SDPA mask",
}
DENSE_NAMES = {
    "sdpa_fa2_causal": "SDPA-FA2",
    "sdpa_cudnn_causal": "SDPA-cuDNN",
    "triton_causal": "Triton",
    "fa4_causal": "FA4",
}


def apb_lengths(context: int, shared_anchor: bool = False) -> tuple[int, int, int]:
    """(num_passing, num_anchor, num_local) of the last host by the paper's defaults. `shared_anchor`: the
    call that host makes when host 0 computes the anchor (`APBConfig.share_anchor`, the default): no anchor
    rows, the anchor's keys in front of the block with the passing keys."""
    block = context // NUM_HOSTS
    passing, anchor = (NUM_HOSTS - 1) * (block // 8), min(block // 4, 8192)
    return (passing + anchor, 0, block) if shared_anchor else (passing, anchor, block)


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


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


def has_fa4() -> bool:
    from apb.kernels.flash4 import fa4_available

    return fa4_available()


def default_key() -> str:
    """The APB column of the backend "auto" runs for these shapes on this GPU."""
    from apb.kernels.flash4 import DEFAULT_METHOD

    from apb.backends import resolve_auto

    name = resolve_auto("cuda", torch.bfloat16, HEAD_DIM)
    return {"flash": f"fa4_{DEFAULT_METHOD}"}.get(name, name)


# ---------------------------------------------------------------- the APB mask


def apb_fns(q, k, v, num_passing: int, num_anchor: int, methods: list[str]) -> dict[str, Callable]:
    """Every way to run APB attention on these inputs, by row key, in table order (flex and SDPA build
    their mask / compile on first use)."""
    from apb.kernels import apb_attention

    fns = {"triton": lambda: apb_attention(q, k, v, num_passing=num_passing, num_anchor=num_anchor)}
    if methods:
        from apb.kernels.flash4 import apb_attention_fa4

        for method in methods:
            fns[f"fa4_{method}"] = lambda method=method: apb_attention_fa4(
                q, k, v, num_passing=num_passing, num_anchor=num_anchor, method=method
            )
    fns["flex"] = flex_fn(q, k, v, num_passing, num_anchor)
    fns["sdpa_mask"] = sdpa_mask_fn(q, k, v, num_passing, num_anchor)
    return fns


def flex_fn(q, k, v, num_passing, num_anchor) -> Callable:
    """flex_attention with the APB block mask; the mask is built (and the kernel compiled) on first use."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    state = {}

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + num_passing) & ((kv_idx >= num_passing) | (q_idx >= num_anchor))

    def run():
        if not state:
            state["mask"] = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device="cuda")
            state["fn"] = torch.compile(flex_attention, dynamic=False)
        return state["fn"](q, k, v, block_mask=state["mask"], enable_gqa=True)

    return run


def sdpa_mask_fn(q, k, v, num_passing, num_anchor) -> Callable:
    from apb.kernels import apb_mask

    state = {}

    def run():
        if not state:
            group = q.shape[1] // k.shape[1]
            state["k"], state["v"] = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            mask = apb_mask(num_passing, num_anchor, q.shape[2] - num_anchor, device="cuda")
            state["mask"] = mask[None, None]
        return F.scaled_dot_product_attention(q, state["k"], state["v"], attn_mask=state["mask"])

    return run


def _out(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def bench_apb_mask(row: dict, skip: set[str], methods: list[str]) -> None:
    """Every APB kernel at one context: `<key>_first_s`, `_ms`, `_tflops`, and `<key>_vs_triton_maxdiff`
    (max |out - Triton's out|, to be sure all compute APB); then each at a never-seen ragged length in the
    same process (`<key>_new_length_s`: what a new length costs once the kernel has run)."""
    num_passing, num_anchor, num_local = row["passing"], row["anchor"], row["local"]
    q, k, v = make_inputs(num_passing, num_anchor, num_local)
    fns = {
        key: fn for key, fn in apb_fns(q, k, v, num_passing, num_anchor, methods).items() if key not in skip
    }
    outs = {}
    for key, fn in fns.items():
        try:
            row[f"{key}_first_s"] = timed_first_call(fn)
            row[f"{key}_ms"] = bench_ms(fn)
            row[f"{key}_tflops"] = tflops(row["pairs"], row[f"{key}_ms"])
            outs[key] = _out(fn()).float()
        except Exception as e:  # noqa: BLE001 - a backend this machine lacks: report and go on
            row[f"{key}_error"] = short_error(e)
    for key, out in outs.items():
        if key != "triton" and "triton" in outs:
            row[f"{key}_vs_triton_maxdiff"] = (out - outs["triton"]).abs().max().item()
    if "fa4_split" in outs and "fa4_mask" in outs:
        row["fa4_mask_vs_split_maxdiff"] = (outs["fa4_mask"] - outs["fa4_split"]).abs().max().item()
    del q, k, v, fns, outs
    torch.cuda.empty_cache()

    # A new length: a ragged shape (new anchor too) in the same process, kernels already used once.
    num_passing, num_anchor, num_local = num_passing + 5, num_anchor - 3, num_local + 37
    q, k, v = make_inputs(num_passing, num_anchor, num_local, seed=1)
    for key, fn in apb_fns(q, k, v, num_passing, num_anchor, methods).items():
        if key in skip or key == "sdpa_mask" or f"{key}_ms" not in row:
            continue
        try:
            row[f"{key}_new_length_s"] = timed_first_call(fn)
        except Exception as e:  # noqa: BLE001
            row[f"{key}_new_length_error"] = short_error(e)
    torch._dynamo.reset()  # dynamo's recompile limit is per code object: start each context clean


# ---------------------------------------------------------------- dense causal


def dense_causal_fns(n: int, skip: set[str]) -> dict[str, Callable]:
    """Dense causal attention over n tokens, by row key: the full-attention baselines."""
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
    }
    if "triton" not in skip:
        # passing = anchor = 0 is APB's mask reduced to plain causal attention
        fns["triton_causal"] = lambda: apb_attention(q, k_gqa, v_gqa, num_passing=0, num_anchor=0)
    if "fa4" not in skip and has_fa4():
        from apb.kernels.flash4 import causal_attention_fa4

        fns["fa4_causal"] = lambda: causal_attention_fa4(q, k_gqa, v_gqa)
    return fns


def bench_dense(row: dict, n: int, skip: set[str]) -> None:
    """Every dense causal baseline over n tokens: `<key>_ms`, `_tflops`; the fastest is "best_full"."""
    row["dense_n"] = n
    for key, fn in dense_causal_fns(n, skip).items():
        try:
            fn()
            row[f"{key}_ms"] = bench_ms(fn)
            row[f"{key}_tflops"] = tflops(n * (n + 1) // 2, row[f"{key}_ms"])
        except Exception as e:  # noqa: BLE001 - e.g. a backend this build of torch lacks
            row[f"{key}_error"] = short_error(e)
    torch.cuda.empty_cache()
    dense = {key: row[f"{key}_tflops"] for key in DENSE_NAMES if f"{key}_tflops" in row}
    if dense:
        row["best_full"] = max(dense, key=dense.get)
        row["best_full_tflops"] = dense[row["best_full"]]


# ---------------------------------------------------------------- tables


def _cell(row: dict, key: str) -> str:
    return f"{row[key + '_ms']:.2f} ({row[key + '_tflops']:.0f})" if key + "_ms" in row else "n/a"


def _present(rows: list[dict], names: dict[str, str], suffix: str) -> list[str]:
    return [key for key in names if any(key + suffix in r for r in rows)]


def markdown_table(rows: list[dict]) -> str:
    """One line per context: APB kernels in ms (TF/s), dense baselines in TF/s, the best full attention,
    and the default backend's useful TF/s against it and its speedup over flex."""
    apb_keys = _present(rows, APB_NAMES, "_ms")
    dense_keys = _present(rows, DENSE_NAMES, "_tflops")
    head = ["context", "P/A/L", *(f"{APB_NAMES[k]} ms (TF/s)" for k in apb_keys), "default", "dense n"]
    head += [f"{DENSE_NAMES[k]} causal TF/s" for k in dense_keys]
    head += ["best full TF/s", "default / best full", "default / flex"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        default = r.get("default")
        cells = [r["context"], f"{r['passing']}/{r['anchor']}/{r['local']}"]
        cells += [_cell(r, k) for k in apb_keys]
        cells += [APB_NAMES.get(default, "n/a"), str(r.get("dense_n", "n/a"))]
        cells += [f"{r[k + '_tflops']:.0f}" if k + "_tflops" in r else "n/a" for k in dense_keys]
        best = r.get("best_full")
        ok = best and f"{default}_tflops" in r
        cells += [f"{DENSE_NAMES[best]} {r['best_full_tflops']:.0f}" if best else "n/a"]
        cells += [f"{r[default + '_tflops'] / r['best_full_tflops']:.2f}x" if ok else "n/a"]
        cells += [
            f"{r['flex_ms'] / r[default + '_ms']:.2f}x" if "flex_ms" in r and f"{default}_ms" in r else "n/a"
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_full_causal(rows: list[dict]) -> str:
    """Dense causal attention over whole contexts: ms (TF/s) of each baseline."""
    keys = _present(rows, DENSE_NAMES, "_ms")
    head = ["n (whole context)", *(f"{DENSE_NAMES[k]} causal ms (TF/s)" for k in keys), "best"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        best = r.get("best_full")
        cells = [r["context"], *(_cell(r, k) for k in keys)]
        cells += [f"{DENSE_NAMES[best]} {r['best_full_tflops']:.0f}" if best else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def first_calls_line(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        times = [
            f"{APB_NAMES[k]} {r[k + '_first_s']:.2f} / {r.get(k + '_new_length_s', float('nan')):.3f}"
            for k in APB_NAMES
            if k + "_first_s" in r and k != "sdpa_mask"
        ]
        parts.append(f"{r['context']}: " + ", ".join(times))
    return "first call / new length (s): " + "; ".join(parts)


def main_table(
    contexts: list[str],
    skip: set[str],
    methods: list[str],
    full_causal: list[str],
    out_json: str | None,
    shared_anchor: bool = False,
) -> None:
    import triton
    from apb.kernels.flash4 import DEFAULT_METHOD

    fa4 = "fa4" not in skip and has_fa4()
    # the flash backend's own method is always timed: it is the default backend's column
    methods = sorted({DEFAULT_METHOD, *methods}, key=FLASH_METHODS.index) if fa4 else []
    default = default_key()
    print(
        f"FlashAttention-4: {'installed' if fa4 else 'not used'}; 'auto' runs {APB_NAMES[default]} here",
        flush=True,
    )
    rows = []
    for name in contexts:
        num_passing, num_anchor, num_local = apb_lengths(CONTEXTS[name], shared_anchor)
        pairs = visible_pairs(num_passing, num_anchor, num_local)
        row = dict(context=name, passing=num_passing, anchor=num_anchor, local=num_local, pairs=pairs)
        row["default"], row["shared_anchor"] = default, shared_anchor
        bench_apb_mask(row, skip, methods)
        if "dense" not in skip:
            bench_dense(row, dense_equivalent_length(pairs), skip)
        rows.append(row)
        print(json.dumps(row), flush=True)
    full_rows = []
    for name in full_causal:
        row = dict(context=name, kind="full_causal")
        bench_dense(row, CONTEXTS[name], skip)
        full_rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", end="")
    print(f" flash-attn-4 {_version('flash-attn-4')} nvidia-cutlass-dsl {_version('nvidia-cutlass-dsl')}")
    if rows:
        print(markdown_table(rows))
        print(first_calls_line(rows))
    if full_rows:
        print(markdown_full_causal(full_rows))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(rows + full_rows, f, indent=1)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "-"


# ---------------------------------------------------------------- sweep, profile, first call


def main_sweep(context: str, head_dim: int, tma_modes: tuple[bool, ...]) -> None:
    """Fixed tile configs of the Triton kernel at one context (the autotuner's candidates come from here)."""
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


def main_first_call(skip: set[str]) -> None:
    """Cold-process first call of the Triton kernel and of FA4 (split) at a ragged 128K shape, then a
    second never-seen length."""
    from apb.kernels import apb_attention

    fns = {} if "triton" in skip else {"Triton": apb_attention}
    if "fa4" not in skip and has_fa4():
        from apb.kernels.flash4 import apb_attention_fa4

        fns["FA4 split"] = apb_attention_fa4
    for label, fn in fns.items():
        for i, (num_passing, num_anchor, num_local) in enumerate(
            [(14336 + 11, 4096 - 5, 16384 + 29), (14336 - 7, 4096 + 3, 16384 + 61)]
        ):
            q, k, v = make_inputs(num_passing, num_anchor, num_local, seed=i)
            seconds = timed_first_call(partial(fn, q, k, v, num_passing=num_passing, num_anchor=num_anchor))
            what = "cold-process first call" if i == 0 else "a second new length"
            print(f"{label}: {what} at a ragged 128K shape: {seconds:.3f} s", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", default="32K,64K,128K,256K", help="APB shapes to time (empty: none)")
    parser.add_argument(
        "--flash-methods",
        default="split",
        help=f"FlashAttention-4 methods to time on APB's mask, comma list of {', '.join(FLASH_METHODS)}",
    )
    parser.add_argument(
        "--full-causal", default="", help="contexts to time dense causal attention over whole (e.g. 32K,128K)"
    )
    parser.add_argument("--skip", default="", help=f"comma list of {', '.join(SKIPPABLE)}")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--sweep", default=None, help="context to sweep Triton tile configs at, e.g. 128K")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM, help="head_dim of --sweep")
    parser.add_argument("--sweep-tma", default="both", choices=["both", "1", "0"])
    parser.add_argument("--first-call", action="store_true")
    parser.add_argument(
        "--shared-anchor", action="store_true", help="time the last host's call with host 0's shared anchor"
    )
    parser.add_argument(
        "--profile", action="store_true", help="run the Triton kernel twice at 128K (for ncu)"
    )
    args = parser.parse_args(argv)
    args.contexts = [c for c in args.contexts.split(",") if c]
    args.full_causal = [c for c in args.full_causal.split(",") if c]
    args.flash_methods = [m for m in args.flash_methods.split(",") if m]
    args.skip = {s for s in args.skip.split(",") if s}
    for arg in (args.contexts, args.full_causal, [args.sweep] if args.sweep else []):
        unknown = [c for c in arg if c not in CONTEXTS]
        if unknown:
            parser.error(f"unknown context(s) {unknown}; choose from {', '.join(CONTEXTS)}")
    unknown = [m for m in args.flash_methods if m not in FLASH_METHODS]
    if unknown:
        parser.error(f"unknown --flash-methods {unknown}; choose from {', '.join(FLASH_METHODS)}")
    unknown = sorted(args.skip - set(SKIPPABLE))
    if unknown:
        parser.error(f"unknown --skip {unknown}; choose from {', '.join(SKIPPABLE)}")
    return args


if __name__ == "__main__":
    args = parse_args()
    if args.sweep:
        main_sweep(
            args.sweep, args.head_dim, {"both": (False, True), "1": (True,), "0": (False,)}[args.sweep_tma]
        )
    elif args.profile:
        main_profile()
    elif args.first_call:
        main_first_call(args.skip)
    elif "table" not in args.skip:
        main_table(
            args.contexts, args.skip, args.flash_methods, args.full_causal, args.json, args.shared_anchor
        )
