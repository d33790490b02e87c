"""Bar chart of an accuracy run (the results JSON of `apb.eval`): average score per method, grouped by
host count, with 95% intervals over the samples. matplotlib (``pip install apb-retain[eval]``) is
imported only when plotting.

    python -m apb.eval.plot benchmarks/accuracy_results_gpu.json benchmarks/accuracy_smollm2.png
    python scripts/plot_accuracy.py ...   # the same
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apb.eval.scoring import parse_method

METHOD_ORDER = ("star", "apb-qa", "apb-qagn", "apb-qattn", "apb-random")
COLORS = {
    "full": "#555555",
    "star": "#d08c2a",
    "apb-qa": "#2a6fd0",
    "apb-qagn": "#5fa8e8",
    "apb-qattn": "#3a9a5b",
    "apb-random": "#b0b0b0",
}


def _bar_order(key: str) -> tuple[int, int, str]:
    """Bars of one host count: by passing budget (the paper's first), then `METHOD_ORDER`, then name."""
    spec = parse_method(key.split(" H=")[0])
    rank = METHOD_ORDER.index(spec.name) if spec.name in METHOD_ORDER else len(METHOD_ORDER)
    return (spec.divisor or 0, rank, key)


def method_stats(result: dict) -> dict[str, tuple[float, float, int]]:
    """label -> (mean points, 95% half-interval, samples per cell) from the raw per-sample scores."""
    stats = {}
    for key, by_task in result["raw_scores"].items():
        values = [100 * v for by_len in by_task.values() for vals in by_len.values() for v in vals]
        per_cell = min(len(vals) for by_len in by_task.values() for vals in by_len.values())
        if not values:
            continue
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
        stats[key] = (mean, 1.96 * (var / len(values)) ** 0.5, per_cell)
    return stats


def plot(result: dict, out: str | Path, title: str | None = None) -> list[str]:
    """Write the PNG; returns the bar labels in plotting order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = method_stats(result)
    hosts = result["hosts"]
    groups: list[tuple[str, list[str]]] = [("1 GPU", ["full"])] if "full" in stats else []
    for h in hosts:
        keys = sorted((k for k in stats if k.endswith(f" H={h}")), key=_bar_order)
        groups.append((f"{h} hosts", keys))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    x, labels, ticks = 0.0, [], []
    for name, keys in groups:
        start = x
        for key in keys:
            mean, half, n = stats[key]
            method = key.split(" H=")[0]
            color = COLORS.get(parse_method(method).name, "#7fbf7f")
            ax.bar(x, mean, width=0.8, color=color, yerr=half, capsize=3)
            ax.text(
                x, 1, f"{method}\nn={n}", ha="center", va="bottom", fontsize=7, rotation=90, color="white"
            )
            labels.append(key)
            x += 1
        ticks.append(((start + x - 1) / 2, name))
        x += 0.8
    ax.set_xticks([t for t, _ in ticks], [n for _, n in ticks])
    ax.set_ylabel("average score (points), 95% interval")
    ax.set_title(title or f"{result.get('model', 'model')}: {result.get('mode', '')} scoring", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return labels


def main(argv: list[str] | None = None) -> int:
    """`python -m apb.eval.plot RESULTS PNG`."""
    parser = argparse.ArgumentParser(
        description="Bar chart of an accuracy run (the results JSON of apb.eval)."
    )
    parser.add_argument("results", help="JSON written by python -m apb.eval (scripts/eval.py)")
    parser.add_argument("png")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    result = json.loads(Path(args.results).read_text())
    if "raw_scores" not in result:
        parser.error(f"{args.results} has no raw per-sample scores (written by an older evaluation)")
    labels = plot(result, args.png, args.title)
    print(f"wrote {args.png}: {len(labels)} bars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
