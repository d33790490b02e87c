"""Time APB prefill of a Llama-3.1-8B-shaped random-weight bf16 model, hosts simulated on one GPU.

    python scripts/bench_apb_prefill.py --tokens 32768 --hosts 4 8 --out results.json

Random weights and random retaining heads (the time and memory do not depend on what the weights
are). For each host count: one warm-up prefill (flex compiles per shape), then a timed one; prints
and writes per-host context-prefill times, the query pass, and peak GPU memory. Also times the
unmodified model's single forward over context + query (sdpa) for scale, and Star / exact modes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_prefill import MODEL_SHAPES
from transformers import AutoModelForCausalLM, LlamaConfig

from apb import APBConfig, APBModel, build_heads

LLAMA_8B = {k: v for k, v in MODEL_SHAPES["llama8b"].items() if k != "family"}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--query", type=int, default=64)
    p.add_argument("--hosts", type=int, nargs="+", default=[4, 8])
    p.add_argument("--modes", nargs="+", default=["apb"], help="apb, star, exact")
    p.add_argument("--backend", default="flex")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--full", action="store_true", help="also time the unmodified model's forward")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test with --layers 1")
    p.add_argument("--out")
    args = p.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": args.layers})
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval()
    heads = build_heads(model, dtype=torch.bfloat16)
    apbm = APBModel(model, heads)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    weights_gib = torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    print(f"model + heads: {weights_gib:.1f} GiB on {name}", flush=True)
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, config.vocab_size, (1, args.tokens), generator=g).to(args.device)
    query = torch.randint(0, config.vocab_size, (1, args.query), generator=g).to(args.device)
    results: dict = {
        "device": name,
        "torch": torch.__version__,
        "tokens": args.tokens,
        "query": args.query,
        "layers": args.layers,
        "weights_gib": round(weights_gib, 2),
        "runs": [],
    }

    if args.full:

        def full():
            with torch.no_grad():
                return model(torch.cat([context, query], dim=1), logits_to_keep=args.query).logits

        timed(full)
        reset_peak()
        _, seconds = timed(full)
        peak = peak_gib()
        print(f"full attention (one forward, sdpa): {seconds * 1000:.0f} ms, peak {peak:.1f} GiB", flush=True)
        results["full"] = {"seconds": seconds, "peak_gib": peak}

    for mode in args.modes:
        for num_hosts in args.hosts:
            if mode == "apb":
                cfg = APBConfig.for_length(args.tokens, num_hosts, backend=args.backend)
            elif mode == "star":
                cfg = APBConfig.star(args.tokens, num_hosts, backend=args.backend)
            else:
                cfg = APBConfig.exact(backend=args.backend)
            _, warm = timed(lambda c=cfg, h=num_hosts: apbm.prefill(context, query, config=c, num_hosts=h))
            reset_peak()
            logits, seconds = timed(
                lambda c=cfg, h=num_hosts: apbm.prefill(context, query, config=c, num_hosts=h)
            )
            peak = peak_gib()
            hosts = {h: round(t * 1000, 1) for h, t in sorted(apbm.last_prefill_times.items())}
            query_ms = seconds * 1000 - sum(hosts.values())
            run = {
                "mode": mode,
                "hosts": num_hosts,
                "anchor_len": cfg.anchor_len,
                "passing_len": cfg.passing_len,
                "backend": args.backend,
                "host_ms": hosts,
                "max_host_ms": max(hosts.values()),
                "query_ms": round(query_ms, 1),
                "total_ms": round(seconds * 1000, 1),
                "warmup_s": round(warm, 1),
                "peak_gib": round(peak, 2),
                "finite": bool(torch.isfinite(logits).all()),
            }
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
