"""The evaluation's tasks and items: RULER-style samples from `apb.data`, tokenised with RULER's answer
prefix and the gold answer's token spans, saved and loaded as gzipped JSON."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

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
    from tqdm.auto import tqdm

    from apb.data import load_haystack, make_sample, tokenize_sample

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
