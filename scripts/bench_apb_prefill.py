"""Time APB prefill of a Llama-3.1-8B-shaped random-weight bf16 model, hosts simulated on one GPU.

    python scripts/bench_apb_prefill.py --tokens 32768 --hosts 4 8 --out results.json
    python scripts/bench_apb_prefill.py --selectors heads query_attention random --tokens 131072 --hosts 4 \\
        --backend triton --out selectors.json --markdown selectors.md

Random weights and random retaining heads (the time and memory do not depend on what the weights
are). For each host count: one warm-up prefill (flex compiles per shape), then a timed one; prints
and writes per-host context-prefill times, the query pass, and peak GPU memory. Also times the
unmodified model's single forward over context + query (sdpa) for scale, and Star / exact modes.

``--selectors``: the passing-block selectors' cost instead (`apb.selectors`). For each selector, one APB
prefill at the paper's sizes and equal split for the length and host count (`APBConfig.for_length`; the
same blocks for every selector, which the balanced split would size apart) with
``APBModel.recording(regions=True)``: per host, the selector's scoring (``score``), pooling and top-k
(``top_k``) and gathering the passed K/V (``gather``), summed over the layers, next to the host's whole
context prefill. The training-free ``query_attention`` also runs host 0's anchor as a probe (host 0 has
none otherwise), which shows in host 0's prefill time, not in ``score``. A warm-up prefill at 1/8 of the
length runs first for each selector (the Triton kernel does not recompile for a new length).
``--shape tiny --device cpu`` is a smoke test.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from bench_prefill import MODEL_SHAPES
from transformers import AutoModelForCausalLM, LlamaConfig

from apb import APBConfig, APBModel, build_heads

LLAMA_8B = {k: v for k, v in MODEL_SHAPES["llama8b"].items() if k != "family"}
SELECTION_REGIONS = ("score", "top_k", "gather")
"""`apb.attention.PREFILL_REGIONS` that choose the passing block."""


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


def clock_and_elapsed(device: str) -> tuple[Any, Any]:
    """A clock that does not synchronise (CUDA events on a GPU) and elapsed(start, end) in seconds, to be
    read after a synchronize."""
    if device.startswith("cuda"):

        def clock():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        return clock, lambda start, end: start.elapsed_time(end) / 1000
    return time.perf_counter, lambda start, end: end - start


def selector_run(apbm: APBModel, context, query, config: APBConfig, num_hosts: int, device: str) -> dict:
    """One recorded APB prefill: per host, the selection regions' ms (summed over layers), the host's
    context prefill ms, its block / anchor / passing sizes, and the selection's share of the host."""
    clock, elapsed = clock_and_elapsed(device)
    with apbm.recording(clock=clock, regions=True) as record:
        _, seconds = timed(lambda: apbm.prefill(context, query, config=config, num_hosts=num_hosts))
    sync()
    regions: dict[int, dict[str, float]] = {}
    for region in record.regions:
        if region.name in SELECTION_REGIONS:
            per_host = regions.setdefault(region.host, dict.fromkeys(SELECTION_REGIONS, 0.0))
            per_host[region.name] += elapsed(region.start, region.end) * 1000
    hosts = []
    for host, host_s in sorted(record.host_seconds.items()):
        view = record.plan.hosts[host]
        ms = {name: round(v, 2) for name, v in regions.get(host, {}).items()}
        selection = sum(ms.values())
        hosts.append(
            {
                "host": host,
                "block": view.block[1] - view.block[0],
                "anchor": view.num_anchor,  # rows this host runs (host 0 runs a shared anchor for all)
                "passing": view.passing_count,
                **{f"{name}_ms": ms.get(name, 0.0) for name in SELECTION_REGIONS},
                "selection_ms": round(selection, 2),
                "host_ms": round(host_s * 1000, 1),
                "selection_share": round(selection / (host_s * 1000), 4) if host_s else None,
            }
        )
    return {"selector": config.selector, "total_ms": round(seconds * 1000, 1), "hosts": hosts}


def selectors_markdown(result: dict) -> str:
    """One row per (selector, host): the selection regions, the host's prefill, the share."""
    lines = [
        f"Passing-block selectors, {result['tokens']} context tokens, {result['num_hosts']} simulated hosts, "
        f"{result['shape']} shape ({result['layers']} layers), {result['device']}, backend {result['backend']}, "
        f"heads hidden {result['head_hidden']}, {result['query']} query tokens in the anchor:",
        "",
        "| selector | host | block | anchor rows run | passing | score ms | top-k ms | gather ms | selection ms "
        "| host prefill ms | selection share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for h in run["hosts"]:
            share = "—" if h["selection_share"] is None else f"{100 * h['selection_share']:.2f}%"
            lines.append(
                f"| {run['selector']} | {h['host']} | {h['block']} | {h['anchor']} | {h['passing']} "
                f"| {h['score_ms']:.1f} | {h['top_k_ms']:.1f} | {h['gather_ms']:.1f} | {h['selection_ms']:.1f} "
                f"| {h['host_ms']:.0f} | {share} |"
            )
    return "\n".join(lines) + "\n"


def run_selectors(args, apbm: APBModel, context, query, name: str) -> dict:
    result: dict = {
        "device": name,
        "torch": torch.__version__,
        "shape": args.shape,
        "layers": args.layers,
        "tokens": args.tokens,
        "query": args.query,
        "num_hosts": args.hosts[0],
        "backend": args.backend,
        "head_hidden": args.head_hidden,
        "runs": [],
    }
    num_hosts = args.hosts[0]
    # 1/8 of the length, but with room for the query in the anchor (block/4 >= query_offset + query)
    warm_tokens = min(args.tokens, max(args.tokens // 8, 4 * num_hosts * (32 + args.query)))
    for selector in args.selectors:
        same = {"backend": args.backend, "selector": selector, "split": "equal"}
        warm = APBConfig.for_length(warm_tokens, num_hosts, **same)
        _, warm_s = timed(
            lambda w=warm: apbm.prefill(context[:, :warm_tokens], query, config=w, num_hosts=num_hosts)
        )
        config = APBConfig.for_length(args.tokens, num_hosts, **same)
        run = selector_run(apbm, context, query, config, num_hosts, args.device)
        run["warmup_s"] = round(warm_s, 1)
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--query", type=int, default=64)
    p.add_argument("--hosts", type=int, nargs="+", default=[4, 8])
    p.add_argument("--modes", nargs="+", default=["apb"], help="apb, star, exact")
    p.add_argument("--backend", default="flex")
    p.add_argument("--shape", default="llama8b", choices=("llama8b", "tiny"), help="model shape")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    p.add_argument("--head-hidden", type=int, default=1024, help="retaining heads' hidden size")
    p.add_argument("--full", action="store_true", help="also time the unmodified model's forward")
    p.add_argument(
        "--selectors",
        nargs="+",
        default=None,
        metavar="NAME",
        help="time these passing-block selectors (heads, query_attention, random) on the first --hosts "
        "instead of the --modes",
    )
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test (--shape tiny)")
    p.add_argument("--out")
    p.add_argument("--markdown", help="--selectors: the table, as markdown")
    args = p.parse_args()

    torch.manual_seed(0)
    shape = {k: v for k, v in MODEL_SHAPES[args.shape].items() if k != "family"}
    args.layers = args.layers or shape["num_hidden_layers"]
    config = LlamaConfig(**{**shape, "num_hidden_layers": args.layers})
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval()
    heads = build_heads(model, hidden_size=args.head_hidden, dtype=torch.bfloat16)
    apbm = APBModel(model, heads)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    weights_gib = torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    print(f"model + heads: {weights_gib:.1f} GiB on {name}", flush=True)
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, config.vocab_size, (1, args.tokens), generator=g).to(args.device)
    query = torch.randint(0, config.vocab_size, (1, args.query), generator=g).to(args.device)
    if args.selectors:
        results = run_selectors(args, apbm, context, query, name)
        table = selectors_markdown(results)
        print(table, flush=True)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        return
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
            with apbm.recording() as record:
                logits, seconds = timed(
                    lambda c=cfg, h=num_hosts: apbm.prefill(context, query, config=c, num_hosts=h)
                )
            peak = peak_gib()
            hosts = {h: round(t * 1000, 1) for h, t in sorted(record.host_seconds.items())}
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
