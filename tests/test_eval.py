"""The evaluation (`apb.eval`, `python -m apb.eval`, `scripts/eval.py`) on a tiny random Llama and the tiny
tokenizer: no downloads.

The main claim checked: the teacher-forced score (one prefill over question + answer prefix + gold
answer) equals greedy decoding's verdict, for full attention and for APB (sparse, 2 and 4 hosts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import run_or_fail

import apb.eval as ev
from apb.eval import plot as plot_accuracy
from apb.eval.cli import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    args = argparse.Namespace(tiny=True, device="cpu", dtype="float32")
    model, tokenizer = load_model(args)
    return model, tokenizer


@pytest.fixture(scope="module")
def items(tiny):
    _, tokenizer = tiny
    return ev.build_items(
        tokenizer,
        tasks=("single_needle", "multi_value_needle"),
        lengths=(2048,),
        num_samples=1,
        haystack="builtin",
        progress=False,
    )


def test_items_fit_their_cell_and_spans_hold_the_expected_items(tiny, items):
    _, tokenizer = tiny
    assert [i.task for i in items] == ["single_needle", "multi_value_needle"]
    for item in items:
        total = len(item.context_ids) + len(item.question_ids) + len(item.prefix_ids) + len(item.answer_ids)
        assert item.length - ev.PROMPT_MARGIN - 64 < total <= item.length
        assert len(item.spans) == len(item.expected)
        for (start, end), expected in zip(item.spans, item.expected, strict=True):
            assert tokenizer.decode(item.answer_ids[start:end]).strip() == expected
    assert len(items[1].expected) == 4  # multi-value: four numbers, four spans


def test_items_round_trip_through_the_saved_file(items, tmp_path):
    path = tmp_path / "items.json.gz"
    ev.save_items(items, path)
    assert ev.load_items(path) == items


@pytest.mark.parametrize(("method", "num_hosts"), [("full", 1), ("apb-random", 2), ("star", 4)])
def test_teacher_forcing_equals_greedy_decoding(tiny, items, method, num_hosts):
    model, tokenizer = tiny
    torch.manual_seed(0)
    from apb import build_heads

    evaluator = ev.Evaluator(model, tokenizer, {"random": build_heads(model, hidden_size=16)})
    item = items[0]
    greedy = evaluator.generate_ids(item, method, num_hosts, max_new_tokens=6)
    assert len(greedy) >= 2
    # The model's own greedy output as "gold": every span right; one token changed: that span wrong.
    gold = dataclasses.replace(item, answer_ids=greedy, spans=[(0, 1), (1, len(greedy))], expected=["a", "b"])
    assert evaluator.score_teacher(gold, method, num_hosts) == 1.0
    wrong = (greedy[-1] + 1) % len(tokenizer)
    bad = dataclasses.replace(gold, answer_ids=greedy[:-1] + [wrong])
    assert evaluator.score_teacher(bad, method, num_hosts) == 0.5


def test_summary_and_markdown():
    scores = {
        "full": {"single_needle": {2048: [1.0, 0.0], 4096: [1.0, 1.0]}},
        "star H=2": {"single_needle": {2048: [0.0, 0.0], 4096: [0.5, 0.5]}},
    }
    summary = ev.summarise(scores, (2048, 4096))
    assert summary["full"]["cells"]["single_needle"] == {"2048": 50.0, "4096": 100.0}
    assert summary["full"]["average"] == 75.0
    assert summary["star H=2"]["per_length"] == {"2048": 0.0, "4096": 50.0}
    table = ev.markdown(summary, ("single_needle",), (2048, 4096), {"full": 0.1, "star H=2": 0.2})
    assert "| full | 50.0 | 100.0 | 75.0 | **75.0** | 0.100 |" in table
    assert "| star H=2 | 0 | 50 |" in table


def test_main_writes_every_method_and_host_count(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = [
        "--tiny",
        "--num-samples",
        "1",
        "--lengths",
        "2048",
        "--tasks",
        "qa_haystack",
        "--hosts",
        "2",
        "4",
    ]
    argv += ["--qa-adapter", str(tmp_path / "none"), "--qagn-adapter", str(tmp_path / "none")]
    assert ev.main([*argv, "--out", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {
        "full",
        *(f"{m} H={h}" for h in (2, 4) for m in ("star", "apb-random", "apb-qattn")),
    }
    assert result["samples_per_cell"] == 1
    for summary in result["results"].values():
        assert 0.0 <= summary["average"] <= 100.0
    assert "apb-random H=4" in md.read_text()


def test_main_pairs_balanced_and_equal_splits(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["--tiny", "--num-samples", "1", "--lengths", "2048", "--tasks", "single_needle", "--hosts", "4"]
    argv += ["--qa-adapter", str(tmp_path / "none"), "--qagn-adapter", str(tmp_path / "none")]
    argv += ["--methods", "apb-random", "--splits", "equal", "balanced"]
    assert ev.main([*argv, "--out", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"apb-random H=4", "apb-random/balanced H=4"}
    pairs = {(p["a"], p["b"]) for p in result["paired"]}
    assert ("apb-random/balanced H=4", "apb-random H=4") in pairs
    # the two methods really ran different splits
    evaluator = types.SimpleNamespace(backend="reference")
    assert ev.Evaluator.config(evaluator, "apb-random", 8000, 4).split == "equal"
    assert ev.Evaluator.config(evaluator, "apb-random/balanced", 8000, 4).split == "balanced"
    assert ev.heads_name("apb-random/balanced") == "random"
    # a balanced-split run alone labels its rows as such, so that it merges with an equal-split run
    argv[argv.index("equal")] = "balanced"
    assert ev.main([*argv, "--out", str(out), "--markdown", str(md)]) == 0
    assert set(json.loads(out.read_text())["results"]) == {"apb-random/balanced H=4"}


def test_divergence_is_kl_from_full_per_answer_token():
    reference = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    assert ev.divergence(reference, reference.clone()) == pytest.approx(0.0, abs=1e-7)
    other = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]])) + 3.0  # logits: any offset
    # row 0: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.1438; row 1: 0; mean over the two answer tokens
    assert ev.divergence(reference, other) == pytest.approx((0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2)


def test_main_records_each_runs_divergence_from_full_and_pairs_the_splits(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["--tiny", "--num-samples", "2", "--lengths", "2048", "--tasks", "single_needle", "--hosts", "4"]
    argv += ["--qa-adapter", str(tmp_path / "none"), "--qagn-adapter", str(tmp_path / "none")]
    argv += ["--methods", "full", "star", "apb-random", "--splits", "equal", "balanced"]
    assert ev.main([*argv, "--out", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    rows = {"star H=4", "apb-random H=4", "apb-random/balanced H=4"}
    assert set(result["divergence"]) == rows  # every run but full itself
    for key in rows:
        values = result["raw_divergence"][key]["single_needle"]["2048"]
        assert len(values) == 2 and all(v >= 0 for v in values)
        assert result["divergence"][key]["average"] == pytest.approx(sum(values) / 2)
    assert result["divergence"]["star H=4"]["average"] > 0  # star drops context: not full attention
    pairs = {(p["a"], p["b"]): p for p in result["paired_divergence"]}
    balanced, equal = "apb-random/balanced H=4", "apb-random H=4"
    want = sum(
        x - y
        for x, y in zip(
            result["raw_divergence"][balanced]["single_needle"]["2048"],
            result["raw_divergence"][equal]["single_needle"]["2048"],
            strict=True,
        )
    )
    assert pairs[(balanced, equal)]["diff"] == pytest.approx(want / 2)
    assert not any(b == "full" for _, b in pairs)  # full has no divergence of its own
    assert "Divergence from full attention" in md.read_text()
    # resumed and merged runs keep the divergences with their rows
    more = tmp_path / "more.json"
    resume = ["--resume", str(out), "--out", str(more), "--markdown", str(md)]
    assert ev.main([*argv[:2], "3", *argv[3:], *resume]) == 0
    resumed = json.loads(more.read_text())
    assert (
        resumed["raw_divergence"][equal]["single_needle"]["2048"][:2]
        == (result["raw_divergence"][equal]["single_needle"]["2048"])
    )
    assert len(resumed["raw_divergence"][equal]["single_needle"]["2048"]) == 3
    merged_json = tmp_path / "m.json"
    assert (
        ev.main([*argv, "--merge", str(out), str(more), "--out", str(merged_json), "--markdown", str(md)])
        == 0
    )
    merged = json.loads(merged_json.read_text())
    assert merged["raw_divergence"] == resumed["raw_divergence"]


def test_paired_differences_hand_computed():
    scores = {
        "full": {"single_needle": {2048: [1.0, 0.0, 1.0, 1.0]}},
        "star H=2": {"single_needle": {2048: [0.0, 0.0, 1.0, 1.0]}},
        "apb-qa H=2": {"single_needle": {2048: [1.0, 1.0, 1.0, 1.0]}},
    }
    paired = {(p["a"], p["b"]): p for p in ev.paired_differences(scores, (2,))}
    assert set(paired) == {("star H=2", "full"), ("apb-qa H=2", "full"), ("apb-qa H=2", "star H=2")}
    qa_star = paired[("apb-qa H=2", "star H=2")]  # differences 100, 100, 0, 0: mean 50, sd 57.735
    assert qa_star["diff"] == 50.0 and qa_star["n"] == 4
    assert qa_star["ci95"] == pytest.approx(1.96 * 57.735027 / 2, rel=1e-6)
    assert paired[("star H=2", "full")]["diff"] == -25.0
    assert "| apb-qa H=2 − star H=2 | +50.0 ± 56.6 | 4 |" in ev.paired_markdown(list(paired.values()))


def test_main_resumes_and_evaluates_extra_adapters(tiny, tmp_path):
    from apb import build_heads, save_adapter

    model, _ = tiny
    torch.manual_seed(1)
    save_adapter(build_heads(model, hidden_size=8), tmp_path / "extra")
    out = tmp_path / "r.json"
    argv = [
        "--tiny",
        "--lengths",
        "2048",
        "--tasks",
        "single_needle",
        "--hosts",
        "2",
        "--methods",
        "full",
        "star",
    ]
    argv += ["--adapter", f"h8={tmp_path / 'extra'}", "--out", str(out), "--markdown", str(tmp_path / "r.md")]
    argv += ["--qa-adapter", "none", "--qagn-adapter", "none"]
    assert ev.main([*argv, "--num-samples", "1"]) == 0
    first = json.loads(out.read_text())
    assert set(first["results"]) == {"full", "star H=2", "apb-h8 H=2"}
    assert ev.main([*argv, "--num-samples", "2", "--resume", str(out)]) == 0
    second = json.loads(out.read_text())
    assert second["samples_per_cell"] == 2
    for key, by_task in first["raw_scores"].items():
        kept = second["raw_scores"][key]["single_needle"]["2048"]
        assert len(kept) == 2 and kept[:1] == by_task["single_needle"]["2048"]
    assert "apb-h8 H=2 − star H=2" in (tmp_path / "r.md").read_text()
    with pytest.raises(ValueError, match="another evaluation"):
        ev.main([*argv, "--num-samples", "2", "--resume", str(out), "--hosts", "2", "4"])
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        ev.main([*argv, "--adapter", "qa=x", "--num-samples", "1"])


def test_results_keep_host_plans_and_refuse_to_mix_splits(tmp_path):
    """A results file records every APB run's host plan; resuming or merging it after the split rules
    changed (here: a file whose balanced plan differs) is refused instead of mixing samples of two splits."""
    out = tmp_path / "r.json"
    argv = [
        "--tiny",
        "--lengths",
        "2048",
        "--tasks",
        "single_needle",
        "--hosts",
        "4",
        "--methods",
        "full",
        "star",
    ]
    argv += ["apb-random", "--splits", "equal", "balanced", "--qa-adapter", "none", "--qagn-adapter", "none"]
    argv += ["--markdown", str(tmp_path / "r.md")]
    assert ev.main([*argv, "--num-samples", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    plans = result["host_plans"]
    assert set(plans) == {"star H=4", "apb-random H=4", "apb-random/balanced H=4"}
    equal, balanced = plans["apb-random H=4"]["2048"], plans["apb-random/balanced H=4"]["2048"]
    assert sum(equal["blocks"]) == sum(balanced["blocks"]) == 2048 and equal["blocks"] == [512] * 4
    assert (
        balanced["split"] == "balanced"
        and equal["shared_anchor"]
        and not plans["star H=4"]["2048"]["shared_anchor"]
    )
    # the same rules: resuming works
    assert ev.main([*argv, "--num-samples", "2", "--out", str(out), "--resume", str(out)]) == 0
    # an earlier version's balanced split (other blocks): refused, for resume and for merge
    old = json.loads(out.read_text())
    old["host_plans"]["apb-random/balanced H=4"]["2048"]["blocks"] = [600, 500, 480, 468]
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="split rules changed"):
        ev.main([*argv, "--num-samples", "3", "--out", str(tmp_path / "x.json"), "--resume", str(stale)])
    with pytest.raises(ValueError, match="split rules changed"):
        ev.main([*argv, "--merge", str(out), str(stale), "--out", str(tmp_path / "m.json")])


def test_resume_with_a_subset_of_methods_keeps_the_others(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--tiny", "--lengths", "2048", "--tasks", "single_needle", "--hosts", "2", "--out", str(out)]
    argv += ["--markdown", str(tmp_path / "r.md"), "--qa-adapter", "none", "--qagn-adapter", "none"]
    assert ev.main([*argv, "--num-samples", "1", "--methods", "full", "star", "apb-random"]) == 0
    first = json.loads(out.read_text())
    assert ev.main([*argv, "--num-samples", "2", "--methods", "full", "star", "--resume", str(out)]) == 0
    second = json.loads(out.read_text())
    assert second["samples_per_method"] == {"full": 2, "star H=2": 2, "apb-random H=2": 1}
    kept = second["raw_scores"]["apb-random H=2"]
    assert kept == first["raw_scores"]["apb-random H=2"]
    paired = {(p["a"], p["b"]): p["n"] for p in second["paired"]}
    assert paired[("apb-random H=2", "full")] == 1 and paired[("star H=2", "full")] == 2
    assert "| 1 |" in (tmp_path / "r.md").read_text()


def test_plot_accuracy_bars_and_intervals(tmp_path):
    result = {
        "hosts": [2],
        "raw_scores": {
            "full": {"single_needle": {"2048": [1.0, 0.0, 1.0, 0.0]}},
            "apb-qa H=2": {"single_needle": {"2048": [1.0, 1.0, 1.0, 1.0]}},
            "star H=2": {"single_needle": {"2048": [0.0, 0.0, 1.0, 0.0]}},
        },
    }
    stats = plot_accuracy.method_stats(result)
    mean, half, n = stats["full"]  # values 100, 0, 100, 0: sd 57.735
    assert (mean, n) == (50.0, 4) and half == pytest.approx(1.96 * 57.735027 / 2, rel=1e-6)
    assert stats["apb-qa H=2"][:2] == (100.0, 0.0)
    labels = plot_accuracy.plot(result, tmp_path / "acc.png")
    assert labels == ["full", "star H=2", "apb-qa H=2"]
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        plot_accuracy.main([str(ROOT / "benchmarks" / "accuracy_results_gpu.json"), str(tmp_path / "b.png")])
        == 0
    )


def test_merge_runs_recomputes_averages_and_paired_differences(tmp_path):
    argv = ["--tiny", "--lengths", "2048", "--tasks", "single_needle", "--hosts", "2"]
    argv += ["--qa-adapter", "none", "--qagn-adapter", "none"]
    first, second, merged_json, md = (tmp_path / n for n in ("a.json", "b.json", "m.json", "m.md"))
    run = ["--methods", "full", "star", "--num-samples", "2", "--out", str(first), "--markdown", str(md)]
    assert ev.main([*argv, *run]) == 0
    run = [
        "--methods",
        "full",
        "apb-random",
        "--num-samples",
        "1",
        "--out",
        str(second),
        "--markdown",
        str(md),
    ]
    assert ev.main([*argv, *run]) == 0
    assert (
        ev.main([*argv, "--merge", str(first), str(second), "--out", str(merged_json), "--markdown", str(md)])
        == 0
    )
    merged = json.loads(merged_json.read_text())
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    # full: the second run's single sample equals the first's, so the first's two samples stay
    assert merged["shared_rows_agree"]["full"] == {"same": 1, "of": 1, "kept_from": "earlier"}
    assert merged["raw_scores"]["full"] == a["raw_scores"]["full"]
    assert merged["raw_scores"]["apb-random H=2"] == b["raw_scores"]["apb-random H=2"]
    assert merged["samples_per_method"] == {"full": 2, "star H=2": 2, "apb-random H=2": 1}
    paired = {(p["a"], p["b"]): p["n"] for p in merged["paired"]}
    assert paired[("apb-random H=2", "full")] == 1 and paired[("star H=2", "full")] == 2
    assert paired[("apb-random H=2", "star H=2")] == 1  # a pair no single run had
    assert merged["results"]["full"] == a["results"]["full"]
    text = md.read_text()
    assert "| apb-random H=2 − star H=2 |" in text and "| star H=2 |" in text


def test_merge_replaces_a_differing_row_and_refuses_other_eval_sets():
    def run(full, qa, lengths=(2048,)):
        scores = {
            "full": {"single_needle": {n: full for n in lengths}},
            "apb-qa H=2": {"single_needle": {n: qa for n in lengths}},
        }
        return {
            "command": "c",
            "date": "d",
            "machine": "m",
            "model": "x",
            "dtype": "float32",
            "backend": "reference",
            "torch": "t",
            "seed": 0,
            "mode": "teacher",
            "tasks": ["single_needle"],
            "lengths": list(lengths),
            "hosts": [2],
            "elapsed_s": 1.0,
            "raw_scores": {
                k: {t: {str(n): v for n, v in c.items()} for t, c in bt.items()} for k, bt in scores.items()
            },
            "raw_seconds": {"full": [0.1] * len(full), "apb-qa H=2": [0.2] * len(qa)},
        }

    merged = ev.merge_results([run([1.0, 0.0], [0.0, 0.0]), run([1.0, 0.0], [1.0, 1.0])])
    assert merged["raw_scores"]["apb-qa H=2"]["single_needle"]["2048"] == [1.0, 1.0]  # later row wins
    assert merged["shared_rows_agree"]["apb-qa H=2"]["same"] == 0
    assert merged["results"]["apb-qa H=2"]["average"] == 100.0
    with pytest.raises(ValueError, match="full attention differs"):
        ev.merge_results([run([1.0, 0.0], [0.0, 0.0]), run([0.0, 0.0], [0.0, 0.0])])
    with pytest.raises(ValueError, match="another evaluation"):
        ev.merge_results([run([1.0], [1.0]), run([1.0], [1.0], lengths=(4096,))])


def test_recall_mode_compares_every_compressor(tmp_path):
    out, md = tmp_path / "recall.json", tmp_path / "recall.md"
    argv = ["--tiny", "--num-samples", "1", "--lengths", "2048", "--tasks", "single_needle", "--hosts", "2"]
    argv += ["--qa-adapter", str(tmp_path / "none"), "--qagn-adapter", str(tmp_path / "none")]
    argv += ["--mode", "recall", "--budgets", "8", "32", "--out", str(out), "--markdown", str(md)]
    assert ev.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"heads-random", "query_attention", "random", "oracle"}
    assert {(r["hosts"], r["divisor"]) for r in rows} == {(2, 8), (2, 32)}
    oracle = [r["recall"] for r in rows if r["method"] == "oracle"]
    assert oracle and all(0.9 < v <= 1.0 + 1e-6 for v in oracle)  # max-pooled oracle ranking: near 1
    assert all(r["recall"] is None or 0.0 <= r["recall"] <= 1.0 + 1e-6 for r in rows)
    assert "| oracle | " in md.read_text() and "H=2, block/32" in md.read_text()


def test_importing_apb_eval_loads_no_optional_dependency():
    # a fresh interpreter: this one may have imported them for other tests
    code = (
        "import sys, apb, apb.eval, apb.eval.assets, apb.eval.plot, apb.eval.cli\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'gguf', 'datasets'}))"
    )
    result = run_or_fail([sys.executable, "-c", code], timeout_s=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_python_m_apb_eval_and_the_script_entry_points(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["--tiny", "--num-samples", "1", "--lengths", "2048", "--tasks", "single_needle", "--hosts", "2"]
    argv += ["--methods", "full", "star", "--qa-adapter", "none", "--out", str(out), "--markdown", str(md)]
    result = run_or_fail([sys.executable, "-m", "apb.eval", *argv], timeout_s=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(out.read_text())
    assert written["command"].startswith("python -m apb.eval --tiny")
    assert written["samples_per_method"] == {"full": 1, "star H=2": 1}
    for script, flag in (
        ("eval.py", "--num-samples"),
        ("plot_accuracy.py", "--title"),
        ("assets.py", "--no-export"),
    ):
        result = run_or_fail([sys.executable, str(ROOT / "scripts" / script), "--help"], timeout_s=120)
        assert result.returncode == 0 and flag in result.stdout, (script, result.stderr[-2000:])


def test_method_names_carry_split_and_budget():
    spec = ev.parse_method("apb-qa/balanced@block/32")
    assert (spec.name, spec.split, spec.divisor, spec.heads, spec.selector) == (
        "apb-qa",
        "balanced",
        32,
        "qa",
        "heads",
    )
    assert (
        spec.method == "apb-qa/balanced@block/32"
        and spec.renamed("apb-qattn") == "apb-qattn/balanced@block/32"
    )
    qattn = ev.parse_method("apb-qattn")
    assert (qattn.heads, qattn.selector, qattn.divisor) == (None, "query_attention", None)
    assert ev.heads_name("apb-qattn@block/8") is None and ev.heads_name("star") is None
    assert ev.with_budget("apb-random", 16) == "apb-random@block/16"
    for bad in ("star@block/8", "apb-qa@block/0", "apb-qa@block/x"):
        with pytest.raises(ValueError, match="budget"):
            ev.parse_method(bad)
    evaluator = types.SimpleNamespace(backend="reference")
    config = ev.Evaluator.config(evaluator, "apb-qattn@block/32", 8000, 4)
    assert (config.selector, config.passing_len, config.split) == ("query_attention", 2000 // 32, "equal")
    default = ev.Evaluator.config(evaluator, "apb-qa", 8000, 4)
    assert (default.selector, default.passing_len) == ("heads", 2000 // 8)
    assert ev.Evaluator.config(evaluator, "apb-qa@block/8", 8000, 4) == default  # the paper's is block/8


def test_paired_differences_compare_methods_at_the_same_budget():
    def cell(values):
        return {"single_needle": {2048: values}}

    scores = {
        "star H=4": cell([0.0, 0.0]),
        "apb-qa@block/8 H=4": cell([1.0, 1.0]),
        "apb-qattn@block/8 H=4": cell([1.0, 0.0]),
        "apb-qa@block/32 H=4": cell([1.0, 0.0]),
        "apb-qattn@block/32 H=4": cell([0.0, 0.0]),
        "apb-qagn@block/32 H=4": cell([0.0, 1.0]),
        "apb-random@block/32 H=4": cell([0.0, 0.0]),
    }
    paired = {(p["a"], p["b"]): p for p in ev.paired_differences(scores, (4,))}
    expected = {(k, "star H=4") for k in scores if k != "star H=4"} | {
        ("apb-qa@block/8 H=4", "apb-qattn@block/8 H=4"),
        ("apb-qa@block/32 H=4", "apb-qagn@block/32 H=4"),
        ("apb-qa@block/32 H=4", "apb-qattn@block/32 H=4"),
        ("apb-qa@block/32 H=4", "apb-random@block/32 H=4"),
        ("apb-qagn@block/32 H=4", "apb-qattn@block/32 H=4"),
        ("apb-qagn@block/32 H=4", "apb-random@block/32 H=4"),
        ("apb-qattn@block/32 H=4", "apb-random@block/32 H=4"),
    }
    assert set(paired) == expected  # never across budgets
    assert paired[("apb-qa@block/8 H=4", "apb-qattn@block/8 H=4")]["diff"] == 50.0


def test_main_runs_query_attention_and_every_budget_on_the_same_items(tiny, tmp_path):
    from apb import build_heads, save_adapter

    model, _ = tiny
    torch.manual_seed(2)
    save_adapter(build_heads(model, hidden_size=8), tmp_path / "qa")
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["--tiny", "--num-samples", "1", "--lengths", "2048", "--tasks", "single_needle", "--hosts", "2"]
    argv += ["--qa-adapter", str(tmp_path / "qa"), "--qagn-adapter", "none", "--backend", "sdpa"]
    argv += ["--methods", "full", "star", "apb-qa", "apb-qattn", "--budgets", "8", "32"]
    assert ev.main([*argv, "--out", str(out), "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    rows = {f"apb-{m}@block/{d} H=2" for m in ("qa", "qattn") for d in (8, 32)}
    assert set(result["results"]) == {"full", "star H=2", *rows}
    assert all(n == 1 for n in result["samples_per_method"].values())
    pairs = {(p["a"], p["b"]) for p in result["paired"]}
    for d in (8, 32):
        assert (f"apb-qa@block/{d} H=2", f"apb-qattn@block/{d} H=2") in pairs
    assert "| apb-qa@block/32 H=2 − apb-qattn@block/32 H=2 |" in md.read_text()
    with pytest.raises(ValueError, match="NAME other than qa, qagn, random, qattn"):
        ev.main([*argv, "--adapter", "qattn=x"])


def _run_result(hosts, scores):
    """A results dict as an accuracy run writes it (one task, 2K)."""
    return {
        "command": "c",
        "date": "d",
        "machine": "m",
        "model": "x",
        "dtype": "float32",
        "backend": "reference",
        "torch": "t",
        "seed": 0,
        "mode": "teacher",
        "tasks": ["single_needle"],
        "lengths": [2048],
        "hosts": hosts,
        "elapsed_s": 1.0,
        "raw_scores": {k: {"single_needle": {"2048": v}} for k, v in scores.items()},
        "raw_seconds": {k: [0.1] * len(v) for k, v in scores.items()},
    }


def test_merge_joins_runs_of_different_host_counts():
    four = _run_result([4], {"full": [1.0, 0.0], "apb-qa@block/8 H=4": [1.0, 1.0]})
    eight = _run_result(
        [8], {"full": [1.0], "apb-qa@block/8 H=8": [0.0], "apb-qattn@block/8 H=8": [1.0], "star H=8": [0.0]}
    )
    merged = ev.merge_results([four, eight])
    assert merged["hosts"] == [4, 8]
    assert merged["samples_per_method"]["full"] == 2  # the longer full row stays
    pairs = {(p["a"], p["b"]): p for p in merged["paired"]}
    assert pairs[("apb-qa@block/8 H=8", "apb-qattn@block/8 H=8")]["diff"] == -100.0
    assert ("apb-qa@block/8 H=4", "full") in pairs and ("apb-qa@block/8 H=8", "star H=8") in pairs


def test_recall_mode_runs_in_rounds_resumes_and_merges(tmp_path):
    first, second, merged = (tmp_path / n for n in ("a.json", "b.json", "m.json"))
    argv = ["--tiny", "--num-samples", "1", "--lengths", "2048", "--tasks", "single_needle", "qa_haystack"]
    argv += ["--hosts", "2", "--qa-adapter", "none", "--qagn-adapter", "none", "--mode", "recall"]
    argv += [
        "--budgets",
        "16",
        "--recall-methods",
        "query_attention",
        "oracle",
        "--markdown",
        str(tmp_path / "r.md"),
    ]
    assert ev.main([*argv, "--out", str(first), "--time-budget", "0.001"]) == 0  # stops after one item
    rows = json.loads(first.read_text())["rows"]
    assert {(r["task"], r["method"]) for r in rows} == {
        ("single_needle", "query_attention"),
        ("single_needle", "oracle"),
    }
    assert ev.main([*argv, "--out", str(second), "--resume", str(first)]) == 0
    result = json.loads(second.read_text())
    assert result["samples_done"] == 2 and result["methods"] == ["query_attention", "oracle"]
    assert result["rows"][:2] == rows  # the earlier item is kept, not rerun
    assert {r["task"] for r in result["rows"]} == {"single_needle", "qa_haystack"}
    with pytest.raises(ValueError, match="another recall evaluation"):
        ev.main([*argv, "--out", str(second), "--resume", str(second), "--budgets", "8"])
    with pytest.raises(ValueError, match="--recall-methods heads-qa: not available"):
        ev.main([*argv, "--recall-methods", "heads-qa", "--out", str(second)])
    assert (
        ev.main(
            ["--merge", str(first), str(second), "--out", str(merged), "--markdown", str(tmp_path / "m.md")]
        )
        == 0
    )
    joined = json.loads(merged.read_text())
    assert len(joined["rows"]) == 4 and joined["samples_done"] == 2 and joined["budgets"] == [16]
    assert "| oracle | " in (tmp_path / "m.md").read_text()


def test_recall_mode_records_its_host_split_and_keeps_splits_apart(tmp_path):
    """--mode recall runs one split (the paper's equal blocks unless --splits balanced), records it, and
    neither resumes nor merges a file of another split; files from before the split was recorded ran
    the equal split."""
    equal, balanced = tmp_path / "e.json", tmp_path / "b.json"
    argv = ["--tiny", "--num-samples", "1", "--lengths", "2048", "--tasks", "single_needle", "--hosts", "3"]
    argv += ["--qa-adapter", "none", "--qagn-adapter", "none", "--mode", "recall", "--budgets", "16"]
    argv += ["--recall-methods", "oracle", "--markdown", str(tmp_path / "r.md")]
    assert ev.main([*argv, "--out", str(equal)]) == 0
    assert ev.main([*argv, "--splits", "balanced", "--out", str(balanced)]) == 0
    e, b = json.loads(equal.read_text()), json.loads(balanced.read_text())
    assert (e["split"], b["split"]) == ("equal", "balanced")
    assert [r["recall"] for r in e["rows"]] != [r["recall"] for r in b["rows"]]  # other blocks, other recall
    with pytest.raises(ValueError, match="another recall evaluation"):
        ev.main([*argv, "--out", str(tmp_path / "x.json"), "--resume", str(balanced)])
    with pytest.raises(ValueError, match="different host splits cannot be merged"):
        ev.main(["--merge", str(equal), str(balanced), "--out", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit, match="one host split at a time"):
        ev.main([*argv, "--splits", "equal", "balanced", "--out", str(tmp_path / "y.json")])
    old = {k: v for k, v in e.items() if k != "split"}  # written before the split was recorded
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert ev.main([*argv, "--out", str(tmp_path / "z.json"), "--resume", str(tmp_path / "old.json")]) == 0
