"""Prefill speed with real hosts: one host per torch.distributed rank (NCCL on GPUs, gloo on the CPU).

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 8 -m apb.bench.dist \\
        --lengths 32768 65536 131072 --out runs/bench/dist.json --markdown runs/bench/dist.md \\
        --simulated-json benchmarks/prefill_results.json
    torchrun --nproc-per-node 2 -m apb.bench.dist --tiny --out runs/bench/d.json   # CPU, gloo

(``torchrun ... scripts/bench_prefill_dist.py`` takes the same arguments.)

Same model (`MODEL_SHAPES`, random weights from one seed, then broadcast from rank 0 so every rank
surely holds the same weights), same input ids, same APB / Star configs as the simulated benchmark
(`apb.bench.prefill.Bench` on every rank). Per setting, after a warm-up with `--warmup-layers` layers
on every rank:

- context ms: each rank's decoder call over its own block (CUDA events / perf_counter via the
  decoder hooks of `DecoderRecorder`); the row reports the slowest rank;
- comm ms: time inside the per-layer all-gather of passing blocks (padding and stacking included), summed
  over layers, from the exchange marks of `APBModel.recording(clock=...)`.
  It includes waiting for slower ranks to reach the collective; the row reports the largest rank;
- query ms: the query pass (every rank over its cache, partials all-gathered), slowest rank;
- total ms: from a barrier to the end of `APBModel.prefill` on the slowest rank, in a run of its own with
  nothing recorded: what a caller waits for. The per-rank columns come from a second, recorded run; its
  recording synchronises the GPU at the end of each rank's context prefill, so there the query pass
  starts from an empty launch queue (``recorded_total_ms``), where the caller's run launches it while the
  GPU still works through the prefill.

Rank 0 also runs full attention (the unmodified model on one GPU, on its fastest SDPA kernel: cuDNN,
then FlashAttention-2, then memory-efficient, as in `apb.bench.prefill`) while the others wait;
speedup = full total / distributed total. With `--simulated-json` (an `apb.bench.prefill` results JSON) each row
carries the simulated numbers of the same method, length and host count and real / simulated ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from apb.bench.common import (
    MODEL_SHAPES,
    context_label,
    find_run,
    flop_bound_ms,
    fmt,
    median,
    method_label,
    skipped_run,
)
from apb.bench.prefill import (
    APB_METHODS,
    CALIBRATE_HELP,
    COMPILE_LAYERS_ARG,
    FULL_ATTENTION_NOTE,
    METHOD_ORDER,
    SPEEDUP_METHODS,
    Bench,
    BenchConfig,
    compiled_note,
)
from apb.bench.prefill import finalize as finalize_simulated

logger = logging.getLogger(__name__)

DIST_METHODS = ["full", "star", "exact", "apb-paper", "apb", "apb-balanced"]
"""Default methods: full attention on one GPU, Star, exact APB (all-gather context parallelism), APB as
published (equal split, every host running its own anchor), APB with the equal split and the shared
anchor, APB with the balanced split and the shared anchor (the library's default)."""


class DistBench:
    """`Bench` on every rank (model, ids, configs, timers) plus the distributed timing. `log` gets rank 0's
    lines (default: this module's logger at INFO)."""

    def __init__(self, cfg: BenchConfig, args: argparse.Namespace, command: str, log=None):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cfg = cfg
        self.args = args
        self.bench = Bench(cfg, None, command, log=(log or logger.info) if self.rank == 0 else _quiet)
        device = self.bench.device
        tensors = [
            *self.bench.model.parameters(),
            *self.bench.model.buffers(),
            *self.bench.heads.parameters(),
        ]
        for tensor in tensors:  # same seed already; the broadcast makes "same weights" certain
            if tensor.device.type == device.type:  # NCCL moves CUDA tensors only
                dist.broadcast(tensor.data, src=0)
        self.clock = self.bench.clock
        self.simulated = json.loads(Path(args.simulated_json).read_text()) if args.simulated_json else None
        meta = dict(self.bench.results["meta"])
        meta.update(
            command=command,
            simulated_hosts=False,
            world_size=self.world,
            backend_dist=dist.get_backend(),
            nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"),
            timing="per rank: decoder hooks (CUDA events / perf_counter) for context and query; comm = time "
            "inside the passing all-gather (APBModel.recording's exchange marks; includes waiting for slower "
            "ranks); total = from a barrier to the end of prefill on the slowest rank, in an unrecorded run "
            f"before each recorded one; warm-up {cfg.warmup_layers} layers; median of {cfg.repeats} run(s)",
            full_attention=FULL_ATTENTION_NOTE,
            simulated_json=str(args.simulated_json) if args.simulated_json else None,
        )
        meta.pop("comm_model", None)
        self.results: dict[str, Any] = {"meta": meta, "backend": None, "runs": []}
        self.rates: dict[str, float] | None = None
        self.done: set[tuple[str, int]] = set()
        """(method, length) measured by an earlier run that `--resume` continues: not timed again."""
        if args.resume:
            self._resume()

    RESUME_KEYS = (
        "model_shape",
        "dtype",
        "head_hidden",
        "query_len",
        "compile_layers",
        "calibrate_length",
        "world_size",
        "device",
    )
    """Settings an earlier results file must share for `--resume` to add to it."""

    def _resume(self) -> None:
        """Take over the runs of `--out` from an earlier run with the same settings (rank 0 reads and
        checks, every rank learns the outcome, so that all skip the same measurements)."""
        outcome: list[Any] = [None]
        if self.rank == 0:
            outcome[0] = self._read_earlier()
        dist.broadcast_object_list(outcome, src=0)
        earlier = outcome[0]
        if isinstance(earlier, str):
            raise SystemExit(earlier)
        if earlier is None:
            self.log(f"--resume: no {self.args.out} yet, starting afresh")
            return
        runs = [r for r in earlier["runs"] if r.get("status") == "ok"]
        self.results["runs"] = runs
        self.results["backend"] = earlier.get("backend")
        self.results["meta"]["resumed_from"] = [
            *earlier["meta"].get("resumed_from", []),
            {"command": earlier["meta"].get("command"), "date_utc": earlier["meta"].get("date_utc")},
        ]
        self.done = {(r["method"], r["length"]) for r in runs}
        self.log(f"--resume: {len(runs)} runs of {self.args.out} kept, not timed again")

    def _read_earlier(self) -> dict[str, Any] | str | None:
        """The earlier results, None when there are none, or why they cannot be continued."""
        out = self.args.out
        if out is None:
            return "--resume continues the --out file: give --out"
        if not out.exists():
            return None
        try:
            earlier = json.loads(out.read_text())
        except ValueError as err:
            return f"--resume: {out} is not JSON ({err})"
        if not isinstance(earlier, dict) or not isinstance(earlier.get("runs"), list):
            return f"--resume: {out} is not a results file of this benchmark (no runs)"
        meta, now = earlier.get("meta") or {}, self.results["meta"]
        differ = [
            f"{k} {meta.get(k)!r} there, {now.get(k)!r} now"
            for k in self.RESUME_KEYS
            if meta.get(k) != now.get(k)
        ]
        if differ:
            return (
                f"--resume: {out} was measured with other settings ({'; '.join(differ)}); use another --out"
            )
        return earlier

    def log(self, message: str) -> None:
        self.bench.log(message)  # rank 0's only

    def save(self) -> None:
        if self.rank != 0:
            return
        finalize(self.results, self.simulated)
        out = self.args.out
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, out)

    def _max(self, value: float) -> list[float]:
        """Every rank's value (gathered), in rank order."""
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, float(value))
        return values

    def time_dist(self, method: str, length: int, backend: str) -> dict[str, Any]:
        bench, hosts = self.bench, self.world
        context, query = bench.ids(length)
        config = bench.apb_config(method, length, hosts, backend)
        plan = bench.host_plan(length, hosts, config)

        def prefill():
            return bench.apbm.prefill(context, query, config=config)

        if self.cfg.warmup_layers:
            with bench.few_layers(self.cfg.warmup_layers):
                prefill()
        self.clock.sync()
        samples = []
        for _ in range(self.cfg.repeats):
            # what a caller waits for: nothing recorded, so nothing synchronises inside the prefill
            dist.barrier()
            self.clock.sync()  # every rank starts from an idle GPU right after the barrier
            start = self.clock.mark()
            wall0 = time.perf_counter()
            logits = prefill()
            end = self.clock.mark()
            self.clock.sync()
            wall = time.perf_counter() - wall0
            total_ms = self.clock.ms(start, end)
            # the same prefill recorded, for the per-rank split
            dist.barrier()
            self.clock.sync()
            with bench.recorder.recording() as calls, bench.apbm.recording(clock=self.clock.mark) as record:
                start = self.clock.mark()
                prefill()
                end = self.clock.mark()
                self.clock.sync()
            context_ms = self.clock.ms(calls[0]["start"], calls[0]["end"])
            query_ms = sum(self.clock.ms(c["start"], c["end"]) for c in calls[1:])
            sample = {
                "total": self._max(total_ms),
                "recorded_total": self._max(self.clock.ms(start, end)),
                "wall": self._max(wall * 1000.0),
                "context": self._max(context_ms),
                "query": self._max(query_ms),
                "comm": self._max(sum(self.clock.ms(a, b) for a, b in record.exchange_marks)),
                "comm_calls": len(record.exchange_marks),
            }
            samples.append((max(sample["total"]), sample))
        _, s = median(samples)
        finite = torch.tensor([int(torch.isfinite(logits).all())], device=logits.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return {
            "method": method,
            "length": length,
            "hosts": hosts,
            "status": "ok",
            "backend": backend,
            "anchor_len": config.anchor_len,
            "passing_len": config.passing_len,
            "passing_counts": plan.counts,
            "split": config.split,
            "blocks": plan.describe()["blocks"],
            "shared_anchor": plan.shares_anchor,
            "rank_context_ms": s["context"],
            "rank_comm_ms": s["comm"],
            "rank_query_ms": s["query"],
            "rank_total_ms": s["total"],
            # busy = the rank's own work; waiting = time inside the all-gather (mostly waiting for slower
            # ranks: the transfer itself is small), both within the context prefill
            "rank_busy_ms": [c - w for c, w in zip(s["context"], s["comm"], strict=True)],
            "rank_wait_share": [w / t for w, t in zip(s["comm"], s["recorded_total"], strict=True)],
            # the FLOP bound: linear work at the measured matmul rate + attention at the measured
            # attention rate (measure_rates); busy / bound is what the host forward loses beyond that
            "rank_flop_bound_ms": (bound := flop_bound_ms(plan, bench.apbm.cost_model, self.rates)),
            "rank_busy_over_bound": [
                (c - w) / b for c, w, b in zip(s["context"], s["comm"], bound, strict=True)
            ],
            "comm_calls": s["comm_calls"],
            "compute_ms": max(s["context"]),
            "comm_ms": max(s["comm"]),
            "query_ms": max(s["query"]),
            "total_ms": max(s["total"]),
            "recorded_total_ms": max(s["recorded_total"]),
            "wall_ms": max(s["wall"]),
            "finite": bool(finite.item()),
        }

    def time_full(self, length: int) -> dict[str, Any]:
        """Rank 0 only (no collectives inside); the others wait at the next barrier."""
        try:
            return self.bench.time_full(length)
        except torch.OutOfMemoryError as error:
            self.bench.free(empty_cache=True)
            return skipped_run("full", length, 1, f"oom: {str(error)[:200]}")

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        backend = self.bench.select_backend() if len(cfg.backends) > 1 else cfg.backends[0]
        chosen = [backend]
        dist.broadcast_object_list(chosen, src=0)  # every rank uses rank 0's choice
        if self.done and self.results["backend"] not in (None, chosen[0]):
            raise SystemExit(
                f"--resume: {self.args.out} was measured on the {self.results['backend']!r} backend, this run "
                f"picked {chosen[0]!r}; pass --backends {self.results['backend']} or use another --out"
            )
        self.results["backend"] = backend = chosen[0]
        self.log(f"{self.world} ranks, backend {backend!r}")
        bench = self.bench
        self.rates = bench.flop_rates(backend)
        self.results["meta"]["rates_tflops"] = {k: self.rates[k] for k in ("matmul", "attention")}
        bench.calibrate(backend)  # every rank times the hosts itself; the ranks fit their average
        if "calibration" in bench.results["meta"]:
            self.results["meta"]["calibration"] = bench.results["meta"]["calibration"]
        self.log(
            f"measured rates: matmul {self.rates['matmul']:.0f} TFLOP/s, attention ({backend}, dense causal) "
            f"{self.rates['attention']:.0f} TFLOP/s"
        )
        for length in cfg.lengths:
            if cfg.deadline_s and self.bench.elapsed() > cfg.deadline_s:
                self.log(f"deadline reached: not starting {length}")
                break
            self.bench.free(empty_cache=True)
            for method in cfg.methods:
                if (method, length) in self.done:
                    continue
                if method == "full":
                    if self.rank == 0:
                        self._record(self.time_full(length))
                    dist.barrier()
                else:
                    self._record(self.time_dist(method, length, backend))
                self.bench.free()
        self.save()
        return self.results

    def _record(self, run: dict[str, Any]) -> None:
        self.results["runs"].append(run)
        self.save()
        if self.rank == 0:
            label = f"{run['method']} {run['length']} x{run['hosts']}"
            if run.get("status") != "ok":
                self.log(f"{label}: {run['status']}")
            else:
                self.log(
                    f"{label}: total {run['total_ms']:.1f} ms (context {run['compute_ms']:.1f}, comm "
                    f"{run['comm_ms']:.2f}, query {run['query_ms']:.1f})"
                )


def finalize(results: dict[str, Any], simulated: dict[str, Any] | None) -> dict[str, Any]:
    """tokens/s, speedup over full, and the simulated numbers of the same setting with real/sim ratios."""
    query_len = results["meta"]["query_len"]
    runs = results["runs"]
    sim_runs = finalize_simulated(simulated)["runs"] if simulated else []
    for run in runs:
        if run.get("status") != "ok":
            continue
        run["tokens_per_s"] = (run["length"] + query_len) / (run["total_ms"] / 1000.0)
        full = find_run(runs, "full", run["length"], 1)
        ok = full is not None and full.get("status") == "ok"
        run["speedup_vs_full"] = full["total_ms"] / run["total_ms"] if ok else None
        if run["method"] in SPEEDUP_METHODS:
            star = find_run(runs, "star", run["length"], run["hosts"])
            ok = star is not None and star.get("status") == "ok"
            run["speedup_vs_star"] = star["total_ms"] / run["total_ms"] if ok else None
            exact = find_run(runs, "exact", run["length"], run["hosts"])
            ok = exact is not None and exact.get("status") == "ok"
            run["speedup_vs_exact"] = exact["total_ms"] / run["total_ms"] if ok else None
        sim = find_run(sim_runs, run["method"], run["length"], run["hosts"])
        if sim is None or sim.get("status") != "ok":
            run["simulated"] = None
            continue
        run["simulated"] = {
            k: sim.get(k) for k in ("compute_ms", "comm_ms", "query_ms", "total_ms", "speedup_vs_full")
        }
        run["real_over_sim_total"] = run["total_ms"] / sim["total_ms"]
        run["real_over_sim_comm"] = run["comm_ms"] / sim["comm_ms"] if sim.get("comm_ms") else None
        if run.get("speedup_vs_full") and sim.get("speedup_vs_full"):
            run["real_over_sim_speedup"] = run["speedup_vs_full"] / sim["speedup_vs_full"]
    return results


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    f = fmt
    measured = meta.get("rates_tflops") or {}
    rates = ", ".join(f"{k} {measured[k]:.0f} TFLOP/s" for k in ("matmul", "attention") if k in measured)
    rates = rates or "not measured"
    lines = [
        f"**Real multi-process run**: {meta['world_size']} ranks ({meta['backend_dist']}), model shape "
        f"`{meta['model_shape']}` ({meta['dtype']}, random weights), query {meta['query_len']} tokens, device "
        f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date_utc']}, "
        f"NCCL_NVLS_ENABLE={meta.get('nccl_nvls_enable')}. APB/Star backend `{results.get('backend')}`. "
        f"Full = {meta.get('full_attention') or 'the unmodified model (SDPA)'}, on one GPU. Wait = time inside "
        "the per-layer passing all-gather, mostly waiting for slower ranks. Busy / FLOP bound: a rank's busy "
        "time over its linear work at the measured matmul rate plus its attention at the measured attention "
        f"rate ({rates})." + compiled_note(meta),
        "",
        "| method | context | split (tokens per rank) | total ms | speedup vs full | vs Star | vs exact "
        "| busy ms per rank | busy / FLOP bound | wait ms per rank | wait share (max) | simulated total ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results["runs"], key=lambda r: (r["length"], METHOD_ORDER.get(r["method"], 9))):
        ctx = context_label(r["length"])
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {ctx} | {r['status']} |" + " |" * 9)
            continue
        if r["method"] == "full":
            label = (
                method_label(r).replace("full (", "full (1 GPU, ")
                if r.get("full_attention")
                else "full (1 GPU)"
            )
            lines.append(f"| {label} | {ctx} | {r['length']} | {f(r['total_ms'])} |" + " |" * 8)
            continue
        sim = r.get("simulated") or {}
        blocks = " / ".join(str(b) for b in r.get("blocks", []))
        busy = " / ".join(f"{x:.0f}" for x in r["rank_busy_ms"])
        wait = " / ".join(f"{x:.0f}" for x in r["rank_comm_ms"])
        over = " / ".join(f"{x:.2f}" for x in r.get("rank_busy_over_bound", []))
        lines.append(
            f"| {r['method']} | {ctx} | {blocks} | {f(r['total_ms'])} | {f(r.get('speedup_vs_full'), 'x')} "
            f"| {f(r.get('speedup_vs_star'), 'x')} | {f(r.get('speedup_vs_exact'), 'x')} | {busy} | {over} | {wait} "
            f"| {max(r['rank_wait_share']):.0%} | {f(sim.get('total_ms'))} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-shape", default="llama8b", choices=sorted(MODEL_SHAPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--query-len", type=int)
    p.add_argument(
        "--methods", nargs="+", help=f"full, {', '.join(APB_METHODS)} (default: {' '.join(DIST_METHODS)})"
    )
    p.add_argument(
        "--backends", nargs="+", help="candidates; rank 0 picks the fastest (default: triton flex)"
    )
    p.add_argument("--warmup-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--deadline-s", type=float, default=0.0)
    p.add_argument("--compile-layers", **COMPILE_LAYERS_ARG)
    p.add_argument("--calibrate", type=int, default=0, metavar="TOKENS", help=CALIBRATE_HELP)
    p.add_argument("--tiny", action="store_true", help="CPU (gloo): tiny model, fp32, short lengths")
    p.add_argument("--simulated-json", type=Path, help="apb.bench.prefill results to compare with")
    p.add_argument("--out", type=Path, help="results JSON (rank 0; rewritten after every measurement)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue --out from an earlier run with the same settings (an interrupted one, or other "
        "lengths): keep its runs and time only what it lacks",
    )
    p.add_argument("--markdown", type=Path, help="write the table here (rank 0)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace, world: int) -> BenchConfig:
    kwargs: dict[str, Any] = dict(
        model_shape=args.model_shape,
        lengths=args.lengths,
        hosts=[world],
        primary_length=max(args.lengths),
        warmup_layers=args.warmup_layers,
        repeats=args.repeats,
        breakdown=False,
        deadline_s=args.deadline_s,
        compile_layers=args.compile_layers,
        calibrate_length=args.calibrate,
    )
    if args.tiny:
        kwargs.update(
            model_shape="tiny",
            lengths=[1024] if args.lengths == parse_args([]).lengths else args.lengths,
            primary_length=1024,
            query_len=8,
            backends=["reference"],
            device="cpu",
            dtype="float32",
            head_hidden=32,
            warmup_layers=1,
        )
        kwargs["primary_length"] = max(kwargs["lengths"])
    kwargs["methods"] = DIST_METHODS
    for name in ("query_len", "methods", "backends"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    return BenchConfig(**kwargs)


def main(argv: list[str] | None = None, prog: str = "-m apb.bench.dist") -> dict[str, Any]:
    """The command line, on every rank (started by torchrun); `prog` is how the command is recorded."""
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("start with torchrun --nproc-per-node N (N >= 2): one host per rank")
    use_cuda = not args.tiny
    if use_cuda:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --tiny for the CPU (gloo) smoke test")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=15))
    try:
        if dist.get_world_size() < 2:
            raise SystemExit("needs at least 2 ranks (torchrun --nproc-per-node N, N >= 2)")
        cfg = config_from_args(args, dist.get_world_size())
        if not use_cuda:
            torch.set_num_threads(1)
        command = "torchrun --nproc-per-node {} {} {}".format(
            dist.get_world_size(), prog, " ".join(sys.argv[1:] if argv is None else argv)
        )
        results = DistBench(cfg, args, command, log=lambda line: print(line, flush=True)).run()
        if dist.get_rank() == 0:
            table = markdown(results)
            print(table, flush=True)
            if args.markdown:
                args.markdown.parent.mkdir(parents=True, exist_ok=True)
                args.markdown.write_text(table)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return results


def _quiet(_line: str) -> None:
    """The log of ranks other than 0."""


if __name__ == "__main__":
    from apb.comm import exit_rank

    main()
    exit_rank(0)
