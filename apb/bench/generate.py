"""Generation speed: APB's decoding steps (eager and CUDA-graph) against transformers' own, on one GPU;
APB's alone over several GPUs under torchrun (one host per rank).

    python scripts/bench_generate.py --json generate.json           (or python -m apb.bench.generate)
    torchrun --nproc-per-node 4 scripts/bench_generate.py --methods apb-eager apb-graphs --json dist.json
    python scripts/bench_generate.py --tiny                          # CPU smoke test, seconds
    python scripts/bench_generate.py --from-json a.json b.json --plot generate.png   # plot earlier results

Random bf16 weights of a benchmark shape (`apb.bench.common.MODEL_SHAPES`, Llama-3.1-8B by default), a
context of `--length` random tokens and a `--query` of 64, then `--new-tokens` tokens greedily. Methods:

- full: the unmodified model as transformers runs generation: one forward over context + query that fills a
  `DynamicCache`, then one forward per token over the cache (SDPA attention), each followed by the
  argmax; what ``model.generate`` does per step, without its logits processors;
- full-static: transformers' fastest own path, ``model.generate(cache_implementation="static")``: a
  preallocated cache, and the step compiled by torch.compile with CUDA graphs (transformers does so by
  itself for a static cache on a GPU); the first steps compile, the median leaves them out;
- apb-eager: `APBModel.generate(cuda_graphs=False)`, hosts simulated one after another on this GPU: each
  step runs every layer once, each host's attention over its store, and the merge;
- apb-graphs: the same with its steps replayed from a CUDA graph (`apb.steps`, the default on a GPU).

Under torchrun every rank is one APB host (NCCL; gloo with --tiny), `--hosts` is the number of ranks, and
apb-graphs asks for graphed steps (`cuda_graphs=True`: each rank records its step with its collectives).
transformers' methods need the whole model in one process and are skipped there. The weights are the same
on every rank (one seed), and rank 0, which streams the tokens, writes the results.

transformers' methods run first, before APB is loaded onto the model. Per run: the time to the first token
(from the call; with simulated hosts APB's prefill runs them one after another, so this is not a multi-GPU
time) and the time per token after it, as the median of the intervals between tokens (the first graphed
step records the graph, a median ignores it) and their mean. A token is taken when it reaches the CPU (a
streamer's `put`), so every interval covers a whole step. Simulated hosts read every host's store in turn,
so APB's step reads as many K/V as full attention's; on real ranks each reads its own. Best of `--repeats`
runs per method (by median step).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from apb.bench.common import TokenClock, build_model, package_version

METHODS = ("full", "full-static", "apb-eager", "apb-graphs")


def full_generate(model, ids: torch.Tensor, new_tokens: int, clock: TokenClock) -> None:
    """transformers' generation loop, greedy: a prefill that fills a DynamicCache, then a step per token."""
    from transformers import DynamicCache

    # transformers renamed `past_key_values` to `cache` (5.2x); take whichever this version's forward has
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {name: DynamicCache()}
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache).logits
    clock.put(ids)
    for step in range(new_tokens):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        clock.put(token.cpu())
        if step == new_tokens - 1:
            break
        logits = model(input_ids=token, use_cache=True, **cache).logits


def run_once(method: str, model, apbm, context, query, args) -> dict[str, Any]:
    clock = TokenClock()
    if method == "full":
        full_generate(model, torch.cat([context, query], dim=1), args.new_tokens, clock)
    elif method == "full-static":
        model.generate(
            torch.cat([context, query], dim=1),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            cache_implementation="static",
            streamer=clock,
            pad_token_id=0,
        )
    else:
        apbm.generate(
            context,
            query,
            num_hosts=None if args.ranks else args.hosts,  # None: the process group's ranks
            max_new_tokens=args.new_tokens,
            eos_token_id=[],
            cuda_graphs=method == "apb-graphs",
            streamer=clock,  # called on rank 0 only under torchrun
        )
    arrivals, gaps = clock.arrivals, clock.step_ms()
    return {
        "method": method,
        "first_token_s": arrivals[0] - clock.started if arrivals else None,
        "tokens": len(arrivals),
        "step_ms_median": statistics.median(gaps) if gaps else None,
        "step_ms_mean": statistics.fmean(gaps) if gaps else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apb import APBModel, build_heads

    device = torch.device("cpu" if args.tiny else "cuda")
    if args.ranks and not args.tiny:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    torch.manual_seed(0)  # the same weights on every rank
    model = build_model(args.model_shape, device, dtype)
    heads = build_heads(model, dtype=dtype)
    if args.compile_layers:
        from apb.fusion import compile_layers

        compile_layers(model)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    context = torch.randint(0, vocab, (1, args.length), generator=gen).to(device)
    query = torch.randint(0, vocab, (1, args.query), generator=gen).to(device)
    launcher = f"torchrun --nproc-per-node {args.ranks}" if args.ranks else "python"
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {
        "command": " ".join([f"{launcher} scripts/bench_generate.py", *_without_outputs(args.argv)]),
        "device": f"{args.ranks} x {name}" if args.ranks else name,
        "ranks": args.ranks,
        "date": time.strftime("%Y-%m-%d"),
        "versions": {p: package_version(p) for p in ("torch", "transformers", "triton")},
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("json", "plot", "from_json", "argv", "ranks")
        },
        "runs": [],
    }
    # transformers' methods first, on the model as loaded: once APB is loaded its attention function (which
    # torch.compile does not trace) and the heads' hooks would break the graphs of a compiled plain generate
    apbm = None
    for method in sorted(args.methods, key=METHODS.index):
        if method.startswith("apb") and apbm is None:
            apbm = APBModel(model, heads)
        results["runs"].append(measure(method, model, apbm, context, query, args))
        if _rank() == 0:
            print(summary_line(results["runs"][-1]), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


OUTPUT_FLAGS = ("--json", "--plot")
"""Where results go: not part of what ran, so neither the recorded command nor the settings hold them."""


def _without_outputs(argv: list[str]) -> list[str]:
    """The command line without `OUTPUT_FLAGS` and their paths."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in OUTPUT_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in OUTPUT_FLAGS)):
            out.append(arg)
    return out


def measure(method: str, model, apbm, context, query, args) -> dict[str, Any]:
    """The best of `args.repeats` runs of `method` (by median step), or why it did not run."""
    cuda = context.is_cuda
    if method == "apb-graphs" and not cuda:
        return {"method": method, "status": "skipped: CUDA graphs need a GPU"}
    if args.ranks and not method.startswith("apb"):
        return {"method": method, "status": "skipped: the unmodified model runs in one process (no torchrun)"}
    runs = []
    try:
        for _ in range(args.repeats):
            with torch.no_grad():
                runs.append(run_once(method, model, apbm, context, query, args))
            if cuda:
                torch.cuda.empty_cache()
    except Exception as err:  # noqa: BLE001 - one method failing (say, out of memory) leaves the others
        if cuda:
            torch.cuda.empty_cache()
        return {"method": method, "status": f"failed: {type(err).__name__}: {err}"[:500]}
    best = min(runs, key=lambda r: r["step_ms_median"] or 0.0)
    best["repeats"] = [r["step_ms_median"] for r in runs]
    return best


LABELS = {
    "full": "transformers, DynamicCache loop",
    "full-static": "transformers, static cache + compile",
    "apb-eager": "APB, eager steps",
    "apb-graphs": "APB, CUDA-graph steps",
}


def best_steps(invocations: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(method label, context length) -> the lowest median ms per token over the invocations (results of
    `run`); a `--compile-layers` run counts as a method of its own."""
    best: dict[tuple[str, int], float] = {}
    for results in invocations:
        settings = results["settings"]
        for run in results["runs"]:
            if run.get("step_ms_median") is None:
                continue
            label = LABELS.get(run["method"], run["method"])
            if settings.get("compile_layers"):
                label += " (compiled layers)"
            key = (label, settings["length"])
            best[key] = min(best.get(key, float("inf")), run["step_ms_median"])
    return best


def plot(invocations: list[dict[str, Any]], path: Path) -> None:
    """Bars of ms per token (best per method and context) for the given results, labelled with tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_steps(invocations)
    if not best:
        raise ValueError("no timed runs in these results")
    lengths = sorted({length for _, length in best})
    labels = list(dict.fromkeys(label for label, _ in sorted(best, key=lambda k: (_label_order(k[0]), k[1]))))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(5.2 + 2.2 * len(lengths), 4.2))
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(lengths))]
        ms = [best.get((label, length), float("nan")) for length in lengths]
        bars = ax.bar(xs, ms, width, label=label)
        for bar, value in zip(bars, ms, strict=True):
            if value == value:  # not NaN
                ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                            fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(lengths)), [f"{length // 1024}K context" for length in lengths])
    ax.set_ylabel("ms per generated token (median, lower is better)")
    first = invocations[0]
    hosts = first["settings"].get("hosts")
    where = first["device"] if first.get("ranks") else f"one {first['device']}"
    ax.set_title(f"Generation on {where}, {first['settings']['model_shape']} shape, {hosts} APB hosts")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _label_order(label: str) -> int:
    order = list(LABELS.values())
    base = label.replace(" (compiled layers)", "")
    return order.index(base) * 2 + (base != label) if base in order else len(order) * 2


def load_invocations(paths: list[str]) -> list[dict[str, Any]]:
    """Results files of `run` (one invocation each, or ``{"invocations": [...]}``)."""
    invocations = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        invocations += data.get("invocations", [data])
    return invocations


def summary_line(run: dict[str, Any]) -> str:
    if "status" in run:
        return f"{run['method']:>11}: {run['status']}"
    return (
        f"{run['method']:>11}: first token {run['first_token_s']:.2f} s, then {run['step_ms_median']:.2f} ms "
        f"a token (median; mean {run['step_ms_mean']:.2f} ms, {1000.0 / run['step_ms_median']:.1f} tokens/s)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", default="llama8b", help="a key of apb.bench.common.MODEL_SHAPES")
    parser.add_argument("--length", type=int, default=131072, help="context tokens")
    parser.add_argument("--query", type=int, default=64, help="query tokens")
    parser.add_argument(
        "--hosts", type=int, help="APB hosts, simulated on this GPU (default 4; under torchrun: the ranks)"
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile-layers", action="store_true", help="apb.fusion.compile_layers first")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU, short context")
    parser.add_argument("--json", help="write the results here (after every method)")
    parser.add_argument("--plot", help="a PNG of ms per token by method and context (matplotlib)")
    parser.add_argument("--from-json", nargs="+", help="plot these results instead of running (with --plot)")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else []
    if args.from_json:
        if not args.plot:
            parser.error("--from-json needs --plot")
        return args
    args.ranks = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 0  # 0: not under torchrun
    if args.ranks and args.hosts not in (None, args.ranks):
        parser.error(f"under torchrun every rank is one host: --hosts {args.hosts} != {args.ranks} ranks")
    args.hosts = args.ranks or args.hosts or 4
    if args.tiny:
        args.model_shape, args.length, args.query, args.new_tokens = "tiny", 512, 8, min(args.new_tokens, 8)
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --tiny for a CPU smoke test)")
    for name in ("length", "query", "hosts", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import sys

    args = parse_args(argv if argv is not None else sys.argv[1:])
    if args.from_json:
        invocations = load_invocations(args.from_json)
        plot(invocations, Path(args.plot))
        return {"invocations": invocations}
    if not args.ranks:
        results = run(args)
    else:
        backend = "gloo" if args.tiny else "nccl"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        try:
            results = run(args)
            dist.barrier()  # leave together: gloo can abort a process whose peer tears the group down first
        finally:
            dist.destroy_process_group()
    if args.plot and _rank() == 0:
        plot([results], Path(args.plot))
    return results


if __name__ == "__main__":
    from apb.comm import exit_rank

    main()
    exit_rank(0)
