"""Benchmark `decode_attention` (the query pass and decoding steps over one host's keys) on one GPU.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, bf16, batch 1), t query rows (1: a
decoding step, 64: the query pass) over a host's keys, every key visible (an earlier host's cache) or causal
over the rows' own keys at the end (the last host's store, a strided view of a buffer with room after it).
Per setting: the split-key kernel `decode_attention` runs (`apb.kernels.triton_decode`), the prefill
kernel's decoding form that ran before it (`apb_attention_triton` with the diagonal shifted past the last
key), FlashAttention-4 (all visible, when installed) and SDPA (all visible, no log-sum-exp). ms per call:
30 calls back to back between CUDA events, best of 3; at small sizes that is the CPU's launch rate, not
GPU time. Errors: max |out - fp32 reference|.

    python scripts/bench_decode.py --json decode.json     (or python -m apb.bench.decode)
    TRITON_INTERPRET=1 python scripts/bench_decode.py --tiny     # CPU smoke test through Triton's interpreter
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial

import torch

from apb.bench.common import Clock, best_time


def timed_ms(fn: Callable[[], object], clock: Clock, calls: int = 30, rounds: int = 3) -> float:
    """Best of `rounds` of `calls` back-to-back calls, ms per call (`best_time`, after one warm-up call)."""
    return best_time(fn, clock, repeats=calls, trials=rounds) * 1000.0


def prefill_kernel_form(q, k, v, *, num_prefix):
    """What `decode_attention` ran before the split-key kernel: the prefill kernel, every key visible as a
    causal mask shifted past the last key."""
    from apb.kernels.triton_apb import apb_attention_triton

    strided = not (k.is_contiguous() and v.is_contiguous())
    tiles = {} if q.is_cuda else {"block_m": 16, "block_n": 16}  # the interpreter: no autotuning
    use_tma = False if strided or not q.is_cuda else None
    if num_prefix is not None:
        return apb_attention_triton(q, k, v, num_passing=num_prefix, num_anchor=0, use_tma=use_tma, **tiles)
    t = q.shape[2]
    return apb_attention_triton(
        q, k, v, num_passing=k.shape[2] - t, num_anchor=0, causal_shift=t, use_tma=use_tma, **tiles
    )


def fa4_function() -> Callable | None:
    try:
        from flash_attn.cute.interface import flash_attn_func
    except Exception:  # noqa: BLE001 - not installed, or not for this GPU
        return None
    return flash_attn_func


def measure(q, k, v, num_prefix: int | None, clock: Clock, calls: int, fa4: Callable | None) -> dict:
    """One setting's errors and ms per call (see the module docstring)."""
    from apb.kernels import decode_attention_ref
    from apb.kernels.triton_decode import decode_attention_split

    ref_out, ref_lse = decode_attention_ref(q, k, v, num_prefix=num_prefix)
    row = {}
    for name, fn in (
        ("split", partial(decode_attention_split, q, k, v, num_prefix=num_prefix)),
        ("prefill_kernel", partial(prefill_kernel_form, q, k, v, num_prefix=num_prefix)),
    ):
        out, lse = fn()
        row[f"{name}_err"] = (out.float() - ref_out.float()).abs().max().item()
        row[f"{name}_lse_err"] = (lse - ref_lse).abs().max().item()
        row[f"{name}_ms"] = timed_ms(fn, clock, calls)
    if num_prefix is None:  # the baselines have no causal form over a prefix here
        if fa4 is not None:
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            row["fa4_ms"] = timed_ms(partial(fa4, qt, kt, vt, causal=False, return_lse=True), clock, calls)
        sdpa = partial(torch.nn.functional.scaled_dot_product_attention, q, k, v, enable_gqa=True)
        row["sdpa_ms"] = timed_ms(sdpa, clock, calls)
    row["prefill_kernel_over_split"] = row["prefill_kernel_ms"] / row["split_ms"]
    return row


def run(args: argparse.Namespace) -> list[dict]:
    """Every setting of `args` (`parse_args`), printed as a JSON line and written to `args.json`."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = Clock(device)
    fa4 = fa4_function() if clock.cuda else None
    meta = {"device": torch.cuda.get_device_name() if clock.cuda else "cpu", "torch": torch.__version__}
    rows = []
    for keys in args.keys:
        for t in args.rows:
            for causal in (False, True):
                gen = torch.Generator().manual_seed(keys + t)
                shape = (1, args.kv_heads, keys + args.room, args.head_dim)
                buf_k, buf_v = (torch.randn(*shape, generator=gen).to(device, dtype) for _ in range(2))
                q = torch.randn(1, args.heads, t, args.head_dim, generator=gen).to(device, dtype)
                if causal:  # the last host's store: a view of a buffer with room after it
                    k, v = buf_k[:, :, :keys], buf_v[:, :, :keys]
                else:
                    k, v = buf_k[:, :, :keys].contiguous(), buf_v[:, :, :keys].contiguous()
                row = {"keys": keys, "t": t, "causal": causal}
                row.update(measure(q, k, v, keys - t if causal else None, clock, args.calls, fa4))
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"meta": {**meta, "args": vars(args)}, "rows": rows}, f, indent=1)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; --tiny sets small CPU shapes."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64], help="query rows t")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--room", type=int, default=1024, help="free entries after the causal case's keys")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument(
        "--tiny", action="store_true", help="small shapes on the CPU (with TRITON_INTERPRET=1)"
    )
    args = parser.parse_args(argv)
    args.device = "cuda"
    if args.tiny:
        args.keys, args.rows, args.heads, args.kv_heads, args.head_dim = [40, 300], [1, 4], 4, 2, 16
        args.room, args.calls, args.dtype, args.device = 8, 1, "float16", "cpu"
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --tiny with TRITON_INTERPRET=1 for a CPU smoke test)")
    if min(args.keys) < max(args.rows) or args.heads % args.kv_heads:
        parser.error("need keys >= rows and heads a multiple of kv-heads")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
