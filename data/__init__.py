"""Data for training retaining heads and for the accuracy evaluation (`apb.data`).

- `Sample` / `TokenizedSample`: context, question, answer as text and as token ids.
- `load_local`: json/jsonl/parquet files through `datasets` (fields or chat ``messages``).
- `make_sample` / `make_samples` / `SyntheticDataset`: RULER-style synthetic tasks (`TASK_NAMES`),
  fitted to a token budget, deterministic under a seed, train/eval splits disjoint; `score`.
- `load_haystack` / `fetch_shakespeare`: filler text, built-in or Gutenberg.
- `tokenize_sample`: token ids with the model's chat template, truncation to ``max_length``.
- `ResumableSampler`: deterministic, resumable, sharded over ranks.
- `build_tiny_tokenizer`: a 512-id tokenizer for tests and the tiny config.
"""

from apb.data.haystack import (
    GeneratedHaystack,
    Haystack,
    TextHaystack,
    fetch_shakespeare,
    generate_text,
    load_haystack,
)
from apb.data.sample import Sample, TokenizedSample
from apb.data.sampler import ResumableSampler
from apb.data.sources import LocalSource, SyntheticSource, load_local, load_samples, source_from_dict
from apb.data.synthetic import (
    TASK_NAMES,
    VALUE_RANGES,
    SyntheticDataset,
    as_token_counter,
    make_sample,
    make_samples,
    score,
)
from apb.data.tiny_tokenizer import TINY_CHAT_TEMPLATE, TINY_VOCAB_SIZE, build_tiny_tokenizer
from apb.data.tokenization import (
    QUESTION_SEPARATOR,
    TokenizedDataset,
    has_chat_template,
    prompt_overhead,
    render_prompt,
    tokenize_sample,
)

__all__ = [
    "TASK_NAMES",
    "TINY_CHAT_TEMPLATE",
    "TINY_VOCAB_SIZE",
    "VALUE_RANGES",
    "QUESTION_SEPARATOR",
    "GeneratedHaystack",
    "Haystack",
    "LocalSource",
    "ResumableSampler",
    "Sample",
    "SyntheticDataset",
    "SyntheticSource",
    "TextHaystack",
    "TokenizedDataset",
    "TokenizedSample",
    "as_token_counter",
    "build_tiny_tokenizer",
    "fetch_shakespeare",
    "generate_text",
    "has_chat_template",
    "load_haystack",
    "load_local",
    "load_samples",
    "make_sample",
    "make_samples",
    "prompt_overhead",
    "render_prompt",
    "score",
    "source_from_dict",
    "tokenize_sample",
]
