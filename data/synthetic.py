"""Synthetic long-context tasks in the style of RULER, generated offline and deterministic under a seed.

Tasks (`TASK_NAMES`):

- ``single_needle``: one "special magic number" for a key is hidden in the haystack; asked for it.
- ``multi_key_needle``: four needles with different keys; asked for one key's number.
- ``multi_value_needle``: four numbers for the same key at different depths; asked for all of them.
- ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (plus a distractor chain);
  asked which variables hold the value.
- ``qa_haystack``: facts "<person> lives in the city of <city>." for four people; asked where one lives.

Each sample is made by ``make_sample(task, index=i, ...)`` from its own RNG, seeded by the string
``"{task}|{split}|{seed}|{index}"``, so sample ``i`` is the same in every process and on every
machine, and can be made alone (a lazy `SyntheticDataset` uses that).

The context is fitted to `context_length` tokens, counted with the model's tokenizer (or any
``str -> int`` function): haystack units are added until one more would pass the budget (binary
search over the number of units), so a context has at most `context_length` tokens and falls short by
at most about one word plus a needle boundary. Needles go in at a depth fraction of the haystack
(0 = start, 1 = end), moved forward to the next sentence or line end.

Train/eval disjointness is by construction, not by luck of seeds: every value that decides the answer
comes from a vocabulary owned by one split. Needle keys are ``<adjective>-<noun>`` with nouns from
that split's half of `vocab.KEY_NOUNS`; magic numbers and variable values are 7-digit numbers in
``[1000000, 5500000)`` for ``train`` and ``[5500000, 10000000)`` for ``eval``; QA people have surnames
from that split's half of `vocab.SURNAMES`. So no eval question (key, value or person) occurs in any
training sample, whatever seeds or sample counts either side uses.

Scoring (`score`) is RULER's: the fraction of the expected strings (``sample.meta["expected"]``)
found in the prediction, case-insensitively and as whole words (``12345678`` does not contain the
answer ``2345678``).
"""

from __future__ import annotations

import logging
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from apb.data import vocab
from apb.data.haystack import Haystack, load_haystack
from apb.data.sample import Sample

logger = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]

VALUE_RANGES = {"train": (1_000_000, 5_500_000), "eval": (5_500_000, 10_000_000)}
"""Half-open ranges of the 7-digit numbers each split uses as needle values."""

_SENTENCE_END = re.compile(r"([.!?]['\")\]]?\s+$)|\n")
_MAX_BOUNDARY_SHIFT = 64


@dataclass(frozen=True, slots=True)
class _Problem:
    needles: list[str]
    """Needle sentences, in the order they must appear in the context."""
    depths: list[float]
    """Depth fraction of each needle; non-decreasing where order matters."""
    question: str
    answer: str
    expected: list[str]
    meta: dict[str, Any]


def _values(rng: random.Random, split: str, k: int) -> list[int]:
    lo, hi = VALUE_RANGES[split]
    return rng.sample(range(lo, hi), k)


def _keys(rng: random.Random, split: str, k: int) -> list[str]:
    nouns = vocab.split_half(vocab.KEY_NOUNS, split)
    pairs = rng.sample([(a, n) for a in vocab.KEY_ADJECTIVES for n in nouns], k)
    return [f"{a}-{n}" for a, n in pairs]


def _magic_needle(key: str, value: int) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _single_needle(rng: random.Random, split: str, depth: float | None) -> _Problem:
    (key,) = _keys(rng, split, 1)
    (value,) = _values(rng, split, 1)
    depth = rng.random() if depth is None else depth
    return _Problem(
        needles=[_magic_needle(key, value)],
        depths=[depth],
        question=f"What is the special magic number for {key} mentioned in the provided text?",
        answer=str(value),
        expected=[str(value)],
        meta={"keys": [key], "values": [str(value)]},
    )


def _multi_key_needle(rng: random.Random, split: str, depth: float | None, num_keys: int = 4) -> _Problem:
    keys = _keys(rng, split, num_keys)
    values = _values(rng, split, num_keys)
    depths = [rng.random() for _ in keys]
    if depth is not None:
        depths[0] = depth
    # The asked-for needle is keys[0]; order in the text follows the depths.
    order = sorted(range(num_keys), key=lambda i: depths[i])
    return _Problem(
        needles=[_magic_needle(keys[i], values[i]) for i in order],
        depths=[depths[i] for i in order],
        question=f"What is the special magic number for {keys[0]} mentioned in the provided text?",
        answer=str(values[0]),
        expected=[str(values[0])],
        meta={"keys": keys, "values": [str(v) for v in values]},
    )


def _multi_value_needle(rng: random.Random, split: str, depth: float | None, num_values: int = 4) -> _Problem:
    (key,) = _keys(rng, split, 1)
    values = [str(v) for v in _values(rng, split, num_values)]
    depths = sorted(rng.random() for _ in values)
    return _Problem(
        needles=[_magic_needle(key, int(v)) for v in values],
        depths=depths,
        question=f"What are all the special magic numbers for {key} mentioned in the provided text?",
        answer=", ".join(values),
        expected=values,
        meta={"keys": [key], "values": values},
    )


def _variable_tracking(
    rng: random.Random, split: str, depth: float | None, num_hops: int = 4, num_chains: int = 2
) -> _Problem:
    names: set[str] = set()
    while len(names) < num_hops * num_chains:
        names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
    pool = sorted(names)
    rng.shuffle(pool)
    values = _values(rng, split, num_chains)
    chains = [pool[c * num_hops : (c + 1) * num_hops] for c in range(num_chains)]
    placed: list[tuple[float, int, str]] = []
    for c, chain in enumerate(chains):
        statements = [f"VAR {chain[0]} = {values[c]}."]
        statements += [f"VAR {chain[h]} = VAR {chain[h - 1]}." for h in range(1, num_hops)]
        depths = sorted(rng.random() for _ in statements)
        placed += [(d, c * num_hops + h, s) for h, (d, s) in enumerate(zip(depths, statements, strict=True))]
    placed.sort()  # by depth; ties keep chain order through the second key
    return _Problem(
        needles=[s for _, _, s in placed],
        depths=[d for d, _, _ in placed],
        question=f"Find all variables that are assigned the value {values[0]} in the text above.",
        answer=" ".join(chains[0]),
        expected=list(chains[0]),
        meta={"values": [str(v) for v in values], "chains": chains},
    )


def _qa_haystack(rng: random.Random, split: str, depth: float | None, num_people: int = 4) -> _Problem:
    surnames = rng.sample(vocab.split_half(vocab.SURNAMES, split), num_people)
    people = [f"{rng.choice(vocab.FIRST_NAMES)} {s}" for s in surnames]
    cities = rng.sample(vocab.CITIES, num_people)
    depths = [rng.random() for _ in people]
    if depth is not None:
        depths[0] = depth
    order = sorted(range(num_people), key=lambda i: depths[i])
    return _Problem(
        needles=[f"{people[i]} lives in the city of {cities[i]}." for i in order],
        depths=[depths[i] for i in order],
        question=f"In which city does {people[0]} live?",
        answer=cities[0],
        expected=[cities[0]],
        meta={"people": people, "cities": cities},
    )


_BUILDERS: dict[str, Callable[..., _Problem]] = {
    "single_needle": _single_needle,
    "multi_key_needle": _multi_key_needle,
    "multi_value_needle": _multi_value_needle,
    "variable_tracking": _variable_tracking,
    "qa_haystack": _qa_haystack,
}
TASK_NAMES: tuple[str, ...] = tuple(_BUILDERS)


# ---------------------------------------------------------------------------------------------- scoring


def _found(expected: str, prediction: str) -> bool:
    pattern = r"(?<![0-9A-Za-z])" + re.escape(expected.strip()) + r"(?![0-9A-Za-z])"
    return re.search(pattern, prediction, flags=re.IGNORECASE) is not None


def score_fraction_found(prediction: str, sample: Sample) -> float:
    """Fraction of ``sample.meta["expected"]`` (default ``[sample.answer]``) found in `prediction`."""
    expected = sample.meta.get("expected") or [sample.answer]
    return sum(_found(e, prediction) for e in expected) / len(expected)


SCORERS: dict[str, Callable[[str, Sample], float]] = dict.fromkeys(TASK_NAMES, score_fraction_found)
"""Per-task scorers; all RULER-style "fraction of expected values found" today."""


def score(prediction: str, sample: Sample) -> float:
    """Score in [0, 1] of a model's `prediction` for `sample`, with its task's scorer."""
    return SCORERS.get(sample.task or "", score_fraction_found)(prediction, sample)


# ---------------------------------------------------------------------------------------------- fitting


def as_token_counter(tokenizer: Any) -> TokenCounter:
    """A ``str -> number of tokens`` function from a tokenizer (``.encode``) or such a function."""
    if hasattr(tokenizer, "encode"):

        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        return count
    if callable(tokenizer):
        return tokenizer
    raise ValueError(
        f"tokenizer must have .encode or be a str -> int function, got {type(tokenizer).__name__}"
    )


def _boundary(units: Sequence[str], position: int) -> int:
    """The first index >= position (within a window) right after a sentence or line end."""
    for i in range(position, min(position + _MAX_BOUNDARY_SHIFT, len(units)) + 1):
        if i == 0 or i == len(units) or _SENTENCE_END.search(units[i - 1]):
            return i
    return position


def _assemble(units: Sequence[str], needles: Sequence[str], depths: Sequence[float], num_units: int) -> str:
    kept = units[:num_units]
    positions = [_boundary(kept, round(d * num_units)) for d in depths]
    for i in range(1, len(positions)):  # needles stay in order
        positions[i] = max(positions[i], positions[i - 1])
    pieces: list[str] = []
    n = 0
    for i, unit in enumerate(kept):
        while n < len(needles) and positions[n] == i:
            pieces.append(needles[n] + _gap(pieces))
            n += 1
        pieces.append(unit)
    while n < len(needles):
        if pieces and not pieces[-1][-1:].isspace():
            pieces.append(" ")
        pieces.append(needles[n] + " ")
        n += 1
    return "".join(pieces).strip()


def _gap(previous: list[str]) -> str:
    """Whitespace after a needle: the same as ended the unit before it (a line break stays one)."""
    if not previous:
        return " "
    trailing = previous[-1][len(previous[-1].rstrip()) :]
    return trailing or " "


def fit_context(
    haystack: Haystack,
    rng: random.Random,
    needles: Sequence[str],
    depths: Sequence[float],
    context_length: int,
    count_tokens: TokenCounter,
) -> tuple[str, int]:
    """Haystack text with `needles` at `depths`, as long as fits in `context_length` tokens.

    Returns ``(context, num_tokens)`` with ``num_tokens <= context_length``.
    """
    base = count_tokens(_assemble([], needles, depths, 0))
    if base > context_length:
        raise ValueError(
            f"context_length={context_length} is too short for the needles alone ({base} tokens)"
        )
    probe = haystack.units(rng, 4000)
    probe_text = "".join(probe)
    chars_per_token = max(len(probe_text) / max(count_tokens(probe_text), 1), 0.5)
    min_chars = int(context_length * chars_per_token * 1.3) + 4000
    for _ in range(8):
        units = haystack.units(rng, min_chars)
        full = _assemble(units, needles, depths, len(units))
        if count_tokens(full) > context_length:
            break
        min_chars *= 2  # the text ran out before the budget: get more
    else:
        raise ValueError(
            f"{min_chars} characters of haystack {haystack.name!r} still fit in {context_length} tokens: "
            "does the token counter count this text?"
        )
    lo, hi = 0, len(units)  # count(lo) <= budget < count(hi)
    lo_tokens = base
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tokens = count_tokens(_assemble(units, needles, depths, mid))
        if tokens <= context_length:
            lo, lo_tokens = mid, tokens
        else:
            hi = mid
    return _assemble(units, needles, depths, lo), lo_tokens


# ---------------------------------------------------------------------------------------------- samples


def make_sample(
    task: str,
    *,
    index: int,
    context_length: int,
    tokenizer: Any,
    seed: int = 0,
    split: str = "train",
    haystack: str | Haystack | None = "builtin",
    depth: float | None = None,
) -> Sample:
    """Sample `index` of `task` for `split` under `seed`, its context fitted to `context_length` tokens.

    `tokenizer`: a tokenizer with ``.encode`` or a ``str -> int`` token counter. `haystack`: see
    `load_haystack` (a loaded `Haystack` is reused; pass one when making many samples from files).
    `depth`: depth fraction of the asked-for needle (others random); None draws it from the RNG.
    """
    if task not in _BUILDERS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {TASK_NAMES}")
    if split not in vocab.SPLITS:
        raise ValueError(f"split must be one of {vocab.SPLITS}, got {split!r}")
    if context_length <= 0:
        raise ValueError(f"context_length must be positive, got {context_length}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{task}|{split}|{seed}|{index}")
    problem = _BUILDERS[task](rng, split, depth)
    hay = load_haystack(haystack)
    context, num_tokens = fit_context(
        hay, rng, problem.needles, problem.depths, context_length, as_token_counter(tokenizer)
    )
    meta = {
        **problem.meta,
        "expected": problem.expected,
        "needles": problem.needles,
        "depths": problem.depths,
        "split": split,
        "seed": seed,
        "index": index,
        "haystack": hay.name,
        "context_length": context_length,
        "num_context_tokens": num_tokens,
    }
    return Sample(context=context, question=problem.question, answer=problem.answer, task=task, meta=meta)


def _task_list(tasks: str | Sequence[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError("tasks must name at least one synthetic task")
    for name in names:
        if name not in _BUILDERS:
            raise ValueError(f"unknown synthetic task {name!r}; choose from {TASK_NAMES}")
    return names


class SyntheticDataset(torch.utils.data.Dataset):
    """`num_samples` synthetic samples made lazily on access; item ``i`` has task ``tasks[i % len(tasks)]``.

    Items are `Sample`s; the same arguments give the same items in any process.
    """

    def __init__(
        self,
        tasks: str | Sequence[str],
        num_samples: int,
        *,
        context_length: int,
        tokenizer: Any,
        seed: int = 0,
        split: str = "train",
        haystack: str | Haystack | None = "builtin",
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.tasks = _task_list(tasks)
        self.num_samples = num_samples
        self.context_length = context_length
        self.tokenizer = tokenizer
        self.seed = seed
        self.split = split
        self.haystack = load_haystack(haystack)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return make_sample(
            self.tasks[index % len(self.tasks)],
            index=index,
            context_length=self.context_length,
            tokenizer=self.tokenizer,
            seed=self.seed,
            split=self.split,
            haystack=self.haystack,
        )


def make_samples(
    tasks: str | Sequence[str],
    num_samples: int,
    *,
    context_length: int,
    tokenizer: Any,
    seed: int = 0,
    split: str = "train",
    haystack: str | Haystack | None = "builtin",
    workers: int = 1,
) -> list[Sample]:
    """``list(SyntheticDataset(...))``: all samples made now.

    `workers` > 1 makes them in that many forked processes; sample i depends
    only on (seed, i), so the list is the same for any number of workers. A progress bar shows from
    100 samples up.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    dataset = SyntheticDataset(
        tasks,
        num_samples,
        context_length=context_length,
        tokenizer=tokenizer,
        seed=seed,
        split=split,
        haystack=haystack,
    )
    from tqdm.auto import tqdm

    quiet = num_samples < 100  # a bar only where making them takes a while
    if workers == 1 or num_samples < 2:
        made = (dataset[i] for i in range(len(dataset)))
        return list(tqdm(made, total=num_samples, desc="synthetic samples", unit="sample", disable=quiet))
    import multiprocessing

    global _FORKED_DATASET
    _FORKED_DATASET = dataset  # inherited by the forked workers, never pickled
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, num_samples)) as pool:
            chunks = max(1, min(32, num_samples // (4 * workers)))
            made = pool.imap(_forked_sample, range(num_samples), chunksize=chunks)
            return list(tqdm(made, total=num_samples, desc="synthetic samples", unit="sample", disable=quiet))
    finally:
        _FORKED_DATASET = None


_FORKED_DATASET: SyntheticDataset | None = None


def _forked_sample(index: int) -> Sample:
    assert _FORKED_DATASET is not None
    return _FORKED_DATASET[index]
