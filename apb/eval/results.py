"""Results of an evaluation: averages per cell, length and task, paired differences between methods
with 95% intervals, markdown tables, the results JSON, and merging / resuming runs on one eval set.

Scores are kept raw, ``method label -> task -> length -> [score per sample]`` (scores in [0, 1]); every
derived number is recomputed from them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from apb.eval.scoring import METHODS, parse_method
from apb.eval.tasks import TASK_SHORT


def method_keys(hosts: tuple[int, ...], methods: tuple[str, ...]) -> list[tuple[str, int]]:
    """(method, host count) of every run: full attention once on one host, the others per host count."""
    keys = [("full", 1)] if "full" in methods else []
    keys += [(m, h) for h in hosts for m in methods if m != "full"]
    return keys


def label(method: str, num_hosts: int) -> str:
    """A run's row name: ``full``, or ``<method> H=<hosts>``."""
    return method if method == "full" else f"{method} H={num_hosts}"


def summarise(
    scores: dict[str, dict[str, dict[int, list[float]]]], lengths: tuple[int, ...]
) -> dict[str, Any]:
    """Mean score (in points, 0-100) per method, cell, length, task, and overall."""
    out = {}
    for key, by_task in scores.items():
        cells = {
            t: {str(n): 100 * sum(v) / len(v) for n, v in by_len.items() if v}
            for t, by_len in by_task.items()
        }
        per_length = {}
        for n in lengths:
            vals = [cells[t][str(n)] for t in cells if str(n) in cells[t]]
            if vals:
                per_length[str(n)] = sum(vals) / len(vals)
        per_task = {t: sum(c.values()) / len(c) for t, c in cells.items() if c}
        all_cells = [v for c in cells.values() for v in c.values()]
        out[key] = {
            "cells": cells,
            "per_length": per_length,
            "per_task": per_task,
            "average": sum(all_cells) / len(all_cells) if all_cells else float("nan"),
        }
    return out


def markdown(
    summary: dict[str, Any],
    tasks: tuple[str, ...],
    lengths: tuple[int, ...],
    times: dict[str, float],
    counts: dict[str, int] | None = None,
) -> str:
    """The results tables; `counts` (samples per cell of each method) adds an n column."""

    def k(n: int) -> str:
        return f"{n // 1024}K"

    lines = [
        "| method | " + " | ".join(k(n) for n in lengths) + " | " + " | ".join(TASK_SHORT[t] for t in tasks)
    ]
    lines[0] += " | **avg** | s/run |" + (" n |" if counts else "")
    lines.append("|" + "---|" * (len(lengths) + len(tasks) + 3 + bool(counts)))
    for key, s in summary.items():
        row = [key] + [f"{s['per_length'].get(str(n), float('nan')):.1f}" for n in lengths]
        row += [f"{s['per_task'].get(t, float('nan')):.1f}" for t in tasks]
        row += [f"**{s['average']:.1f}**", f"{times.get(key, float('nan')):.3f}"]
        row += [str(counts.get(key, 0))] if counts else []
        lines.append("| " + " | ".join(row) + " |")
    detail = ["", "Every cell (task × length):", ""]
    header = "| method | " + " | ".join(f"{TASK_SHORT[t]} {k(n)}" for t in tasks for n in lengths) + " |"
    detail += [header, "|" + "---|" * (len(tasks) * len(lengths) + 1)]
    for key, s in summary.items():
        row = [key] + [
            f"{s['cells'].get(t, {}).get(str(n), float('nan')):.0f}" for t in tasks for n in lengths
        ]
        detail.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + detail) + "\n"


def resume_from(
    path: str,
    scores: dict[str, dict[str, dict[int, list[float]]]],
    seconds: dict[str, list[float]],
    tasks: tuple[str, ...],
    lengths: tuple[int, ...],
    hosts: tuple[int, ...],
    divergences: dict[str, dict[str, dict[int, list[float]]]] | None = None,
    host_plans: dict[str, dict[str, Any]] | None = None,
) -> int:
    """Fill `scores` / `seconds` (and `divergences`, where the earlier run has them) with an earlier
    run's raw values; returns its samples per cell.

    This run may evaluate a subset of the earlier methods (say an adapter is no longer at hand): the
    others keep their earlier samples, get no new ones, and are written out as they were.

    `host_plans` (`Evaluator.host_plans`): this run's; a `ValueError` when a run both files hold was
    planned otherwise in the earlier one (the split rules changed since: new samples would not pair with
    the old ones). Files written before plans were recorded are not checked."""
    earlier = json.loads(Path(path).read_text())
    if "raw_scores" not in earlier:
        raise ValueError(f"{path} has no raw scores to resume from (written by an older evaluation)")
    check_same_plans(earlier.get("host_plans", {}), host_plans or {}, path, "write to a new results file")
    same = (earlier["tasks"], earlier["lengths"], earlier["hosts"]) == (
        list(tasks),
        list(lengths),
        list(hosts),
    )
    if not same or not set(scores) <= set(earlier["raw_scores"]):
        raise ValueError(
            f"{path} is another evaluation: tasks/lengths/hosts {earlier['tasks']}/{earlier['lengths']}/"
            f"{earlier['hosts']} and methods {sorted(earlier['raw_scores'])}; this run has {list(tasks)}/"
            f"{list(lengths)}/{list(hosts)} and {sorted(scores)}"
        )
    extend_raw(scores, earlier["raw_scores"], tasks, lengths)
    for key in earlier["raw_scores"]:
        seconds.setdefault(key, []).extend(earlier["raw_seconds"][key])
    if divergences is not None:
        extend_raw(divergences, earlier.get("raw_divergence", {}), tasks, lengths)
    return int(earlier["samples_per_cell"])


def check_same_plans(
    earlier: dict[str, dict[str, Any]], plans: dict[str, dict[str, Any]], where: str, advice: str
) -> None:
    """`ValueError` when a run that both `earlier` and `plans` (row name -> length -> `HostPlan.describe`)
    hold was planned otherwise: the split rules changed in between, so their samples would not pair."""
    for key, by_length in plans.items():
        before = earlier.get(key)
        if before is not None and before != by_length:
            n = next((n for n in by_length if before.get(n) != by_length[n]), next(iter(by_length)))
            raise ValueError(
                f"{where} ran {key} with other host plans (at {n} tokens: {before.get(n)} against "
                f"{by_length[n]}): the split rules changed in between, so their samples would not pair; {advice}"
            )


def empty_raw(tasks: tuple[str, ...], lengths: tuple[int, ...]) -> dict[str, dict[int, list[float]]]:
    """One method's raw values before any sample: task -> length -> []."""
    return {t: {n: [] for n in lengths} for t in tasks}


def extend_raw(
    raw: dict[str, dict[str, dict[int, list[float]]]],
    earlier: dict[str, dict[str, dict[str, list[float]]]],
    tasks: tuple[str, ...],
    lengths: tuple[int, ...],
) -> None:
    """Append an earlier run's raw values (as its JSON keeps them) to `raw`, method by method."""
    for key, by_task in earlier.items():
        raw.setdefault(key, empty_raw(tasks, lengths))
        for task, by_len in raw_from_json(by_task).items():
            for n, values in by_len.items():
                raw[key][task][n].extend(values)


def raw_from_json(by_task: dict[str, dict[str, list[float]]]) -> dict[str, dict[int, list[float]]]:
    """One method's raw scores as the JSON keeps them (lengths as strings) -> task -> length -> scores."""
    return {t: {int(n): list(v) for n, v in by_len.items()} for t, by_len in by_task.items()}


def derived_results(
    scores: dict[str, dict[str, dict[int, list[float]]]],
    seconds: dict[str, list[float]],
    lengths: tuple[int, ...],
    hosts: tuple[int, ...],
    divergences: dict[str, dict[str, dict[int, list[float]]]] | None = None,
) -> dict[str, Any]:
    """The results JSON's fields computed from the raw scores and times (a run's and a merge's alike).

    `divergences` (teacher mode with full attention among the methods: every other method's
    `apb.eval.scoring.divergence` from full, per sample) adds ``divergence`` (mean KL per method and
    length), ``paired_divergence`` (the same comparisons as ``paired``, in nats) and the raw values."""
    out = {
        "samples_per_method": samples_per_method(scores),
        "seconds_per_run": {k: (sum(v) / len(v) if v else float("nan")) for k, v in seconds.items()},
        "results": summarise(scores, lengths),
        "paired": paired_differences(scores, hosts),
        "raw_scores": _raw_to_json(scores),
        "raw_seconds": seconds,
    }
    divergences = {
        k: v for k, v in (divergences or {}).items() if any(x for d in v.values() for x in d.values())
    }
    if divergences:
        out["divergence"] = {k: divergence_summary(v, lengths) for k, v in divergences.items()}
        out["paired_divergence"] = paired_differences(divergences, hosts, scale=1.0)
        out["raw_divergence"] = _raw_to_json(divergences)
    return out


def _raw_to_json(raw: dict[str, dict[str, dict[int, list[float]]]]) -> dict[str, Any]:
    return {
        k: {t: {str(n): v for n, v in by_len.items()} for t, by_len in by_task.items()}
        for k, by_task in raw.items()
    }


def divergence_summary(
    by_task: dict[str, dict[int, list[float]]], lengths: tuple[int, ...]
) -> dict[str, Any]:
    """One method's mean divergence from full attention (nats per answer token), overall and per
    length, over every sample."""
    per_length = {}
    for n in lengths:
        vals = [x for by_len in by_task.values() for x in by_len.get(n, [])]
        if vals:
            per_length[str(n)] = sum(vals) / len(vals)
    every = [x for by_len in by_task.values() for v in by_len.values() for x in v]
    return {"per_length": per_length, "average": sum(every) / len(every) if every else float("nan")}


def write_result_files(result: dict[str, Any], out: str, markdown_path: str | None) -> None:
    """The results JSON at `out`, and the tables RESULTS.md shows at `markdown_path`."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    if markdown_path:
        table = markdown(
            result["results"],
            tuple(result["tasks"]),
            tuple(result["lengths"]),
            result["seconds_per_run"],
            result["samples_per_method"],
        )
        Path(markdown_path).write_text(
            table + paired_markdown(result["paired"]) + divergence_markdown(result)
        )


def samples_per_method(scores: dict[str, dict[str, dict[int, list[float]]]]) -> dict[str, int]:
    """Samples per cell of each method (the fewest over its cells)."""
    return {
        k: min(len(v) for by_len in by_task.values() for v in by_len.values())
        for k, by_task in scores.items()
    }


def paired_differences(
    scores: dict[str, dict[str, dict[int, list[float]]]], hosts: tuple[int, ...], scale: float = 100.0
) -> list[dict[str, Any]]:
    """Mean per-sample score difference (points) with a 95% normal interval, for the comparisons the
    targets name: every method vs full; at the same host count: APB vs Star, and at the same split and
    passing budget: trained heads (qa, qagn) vs the training-free ``apb-qattn`` and vs random heads,
    qa vs qagn, ``apb-qattn`` vs random heads, each ``--adapter`` head set vs ``apb-qa``, and the
    balanced split vs the equal one.

    Samples are paired: the same item under both methods. The interval is 1.96 standard errors of
    the mean difference over all items (every cell has the same number of items). Differences are the
    values times `scale` (100: scores in [0, 1] as points)."""

    def flat(a: str, b: str) -> tuple[list[float], list[float]]:  # the samples both have, cell by cell
        xa, xb = [], []
        for task, by_len in scores[a].items():
            for n, va in by_len.items():
                vb = scores[b][task][n]
                xa += va[: len(vb)]
                xb += vb[: len(va)]
        return xa, xb

    # (method, the methods it is compared with at the same host count, split and budget)
    against = {
        "apb-qa": ("apb-qagn", "apb-random", "apb-qattn"),
        "apb-qagn": ("apb-random", "apb-qattn"),
        "apb-qattn": ("apb-random",),
    }
    pairs: list[tuple[str, str]] = []
    for key in scores:
        if key != "full" and "full" in scores:
            pairs.append((key, "full"))
    for h in hosts:
        star = label("star", h)
        for key in scores:
            if not (key.startswith("apb-") and key.endswith(f" H={h}")):
                continue
            if star in scores:
                pairs.append((key, star))
            spec = parse_method(key[: -len(f" H={h}")])

            for other in against.get(spec.name, ()):
                if label(spec.renamed(other), h) in scores:
                    pairs.append((key, label(spec.renamed(other), h)))
            equal = dataclasses.replace(spec, split="equal").method
            if spec.split == "balanced":
                if label(equal, h) in scores:
                    pairs.append((key, label(equal, h)))  # balanced vs equal
            elif spec.name not in METHODS and label(spec.renamed("apb-qa"), h) in scores:
                pairs.append((key, label(spec.renamed("apb-qa"), h)))  # an --adapter head set vs the main one
    out = []
    for a, b in pairs:
        xa, xb = flat(a, b)
        if not xa:
            continue
        diffs = [scale * (p - q) for p, q in zip(xa, xb, strict=True)]
        mean = sum(diffs) / len(diffs)
        var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
        half = 1.96 * (var / len(diffs)) ** 0.5
        out.append({"a": a, "b": b, "diff": mean, "ci95": half, "n": len(diffs)})
    return out


def paired_markdown(paired: list[dict[str, Any]]) -> str:
    lines = ["", "Paired differences (points, mean over every sample, ± 95% interval):", ""]
    lines += ["| comparison | difference | n |", "|---|---|---|"]
    lines += [f"| {p['a']} − {p['b']} | {p['diff']:+.1f} ± {p['ci95']:.1f} | {p['n']} |" for p in paired]
    return "\n".join(lines) + "\n"


def divergence_markdown(result: dict[str, Any]) -> str:
    """The divergence-from-full tables (empty without divergences)."""
    if "divergence" not in result:
        return ""
    lengths = result["lengths"]
    lines = [
        "",
        "Divergence from full attention (KL, nats per gold-answer token; lower = closer to full):",
        "",
    ]
    lines += ["| method | " + " | ".join(f"{n // 1024}K" for n in lengths) + " | **avg** |"]
    lines += ["|" + "---|" * (len(lengths) + 2)]
    for key, d in result["divergence"].items():
        row = [f"{d['per_length'].get(str(n), float('nan')):.4f}" for n in lengths]
        lines.append(f"| {key} | " + " | ".join(row) + f" | **{d['average']:.4f}** |")
    lines += ["", "| comparison | KL difference | n |", "|---|---|---|"]
    lines += [
        f"| {p['a']} − {p['b']} | {p['diff']:+.4f} ± {p['ci95']:.4f} | {p['n']} |"
        for p in result["paired_divergence"]
    ]
    return "\n".join(lines) + "\n"


def merge_results(results: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, Any]:
    """One results dict from several runs on the same eval set (same seed, mode, tasks and lengths; the
    host counts may differ, say one run per host count, and are joined): every method's raw scores, a later run's rows replacing an earlier one's, and the averages and
    paired differences recomputed from them. Rows that two runs share are compared sample by sample
    (``shared_rows_agree``): a row that agrees on every shared sample and has fewer samples than the
    earlier one only confirms it, so the longer one stays. Full attention is deterministic, so a
    mismatch there means another eval set (an error).
    """
    names = names or [f"run {i}" for i in range(len(results))]
    first = results[0]
    fields = ("seed", "mode", "tasks", "lengths")  # the eval set; runs may split the host counts
    for name, other in zip(names[1:], results[1:], strict=True):
        if "raw_scores" not in other or any(other[f] != first[f] for f in fields):
            raise ValueError(
                f"{name} is another evaluation than {names[0]} (or has no raw scores): "
                + ", ".join(f"{f} {other.get(f)} vs {first[f]}" for f in fields if other.get(f) != first[f])
            )
    lengths, hosts = tuple(first["lengths"]), tuple(sorted({h for r in results for h in r["hosts"]}))
    scores: dict[str, dict[str, dict[int, list[float]]]] = {}
    seconds: dict[str, list[float]] = {}
    divergences: dict[str, dict[str, dict[int, list[float]]]] = {}
    agree: dict[str, dict[str, Any]] = {}
    for name, run in zip(names, results, strict=True):
        for key, by_task in run["raw_scores"].items():
            new = raw_from_json(by_task)
            if key in scores:
                pairs = [
                    (x, y)
                    for t, by_len in new.items()
                    for n, v in by_len.items()
                    for x, y in zip(scores[key][t][n], v, strict=False)  # shared samples
                ]
                same = sum(x == y for x, y in pairs)
                longer = samples_per_method({key: scores[key]})[key] > samples_per_method({key: new})[key]
                keep = same == len(pairs) and longer  # the same row, and the earlier one has more samples
                agree[key] = {"same": same, "of": len(pairs), "kept_from": "earlier" if keep else name}
                if keep:
                    continue
            scores[key] = new
            seconds[key] = list(run["raw_seconds"][key])
            if key in run.get("raw_divergence", {}):  # a row's divergences travel with its scores
                divergences[key] = raw_from_json(run["raw_divergence"][key])
            else:
                divergences.pop(key, None)
    if "full" in agree and agree["full"]["same"] != agree["full"]["of"]:
        raise ValueError(f"full attention differs between the runs ({agree['full']}): not the same items")
    plans: dict[str, dict[str, Any]] = {}
    for name, run in zip(names, results, strict=True):
        check_same_plans(plans, run.get("host_plans", {}), name, "merge runs of one version")
        plans.update(run.get("host_plans", {}))
    derived = derived_results(scores, seconds, lengths, hosts, divergences)
    return {
        "command": " && ".join(r["command"] for r in results),
        "merged_from": [
            {"file": n, "date": r["date"], "machine": r["machine"], "command": r["command"]}
            for n, r in zip(names, results, strict=True)
        ],
        "shared_rows_agree": agree,
        **{f: first[f] for f in ("model", "dtype", "backend", "torch", *fields)},
        "hosts": list(hosts),
        "machine": first["machine"],
        "date": max(r["date"] for r in results),
        "samples_per_cell": max(derived["samples_per_method"].values()),
        "elapsed_s": round(sum(r["elapsed_s"] for r in results), 1),
        "host_plans": plans,
        "examples": [e for r in results for e in r.get("examples", [])],
        **derived,
    }


# ---------------------------------------------------------------- recall mode (apb.recall)
# A recall results JSON holds one row per (item, host count, budget, method), apb.recall.recall_runs's row
# plus the item's ``task``, ``cell`` (length) and ``index``; hosts, budgets, methods and split say what ran.

RECALL_SETTINGS = ("hosts", "budgets", "methods", "split")


def recall_split(results: dict[str, Any]) -> str:
    """The host split a recall results file ran (files from before the split was recorded: equal)."""
    return results.get("split", "equal")


def recall_items_done(rows: list[dict[str, Any]]) -> set[tuple[str, int, int]]:
    """(task, cell, index) of every item `rows` hold."""
    return {(r["task"], r["cell"], r["index"]) for r in rows}


def recall_resume_rows(path: str, settings: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The rows of an earlier recall run with the same host counts, budgets and methods."""
    earlier = json.loads(Path(path).read_text())
    if earlier.get("mode") != "recall" or "rows" not in earlier:
        raise ValueError(f"{path} is not a recall results file (written by --mode recall)")
    theirs = {k: earlier.get(k) for k in RECALL_SETTINGS} | {"split": recall_split(earlier)}
    if theirs != settings:
        raise ValueError(f"{path} is another recall evaluation: {theirs}; this run has {settings}")
    return list(earlier["rows"])


def merge_recall_results(results: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, Any]:
    """One recall results dict from several runs (say one per length or per GPU): every row, a later run's
    row replacing an earlier one's of the same item, host count, budget and method."""
    names = names or [f"run {i}" for i in range(len(results))]
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for name, run in zip(names, results, strict=True):
        if "rows" not in run:
            raise ValueError(f"{name} is not a recall results file (written by --mode recall)")
    splits = {name: recall_split(run) for name, run in zip(names, results, strict=True)}
    if len(set(splits.values())) > 1:
        raise ValueError(f"recall results of different host splits cannot be merged: {splits}")
    for run in results:
        for row in run["rows"]:
            rows[(row["task"], row["cell"], row["index"], row["hosts"], row["divisor"], row["method"])] = row
    merged = list(rows.values())
    return {
        "command": " && ".join(r["command"] for r in results),
        "merged_from": [
            {"file": n, "date": r["date"], "machine": r["machine"], "command": r["command"]}
            for n, r in zip(names, results, strict=True)
        ],
        "mode": "recall",
        "machine": results[0]["machine"],
        "date": max(r["date"] for r in results),
        "torch": results[0]["torch"],
        "dtype": results[0]["dtype"],
        "backend": results[0].get("backend"),
        "hosts": sorted({r["hosts"] for r in merged}),
        "budgets": sorted({r["divisor"] for r in merged}),
        "methods": list(dict.fromkeys(r["method"] for r in merged)),
        "split": recall_split(results[0]),
        "elapsed_s": round(sum(r["elapsed_s"] for r in results), 1),
        "samples_done": len(recall_items_done(merged)),
        "rows": merged,
    }
