"""Turn a `Sample` into token ids with the model's tokenizer and chat template.

With a chat template (the tokenizer has one and ``use_chat_template=True``) the prompt is one user
turn holding ``context + "\\n\\n" + question`` (both stripped), rendered with
``add_generation_prompt=True`` and tokenised as one string (``add_special_tokens=False``, as
transformers does for chat prompts; the template adds BOS where the model wants it). The token ids
are split where the context ends: ``context_ids`` are the tokens that start before the context's
last character ends (so the chat header, any system prompt and a token straddling the boundary are
context), ``question_ids`` the rest (separator, question, end of turn, assistant header). Hence
``context_ids + question_ids`` is exactly the tokenised prompt. ``answer_ids`` is the answer's tokens
followed by ``eos_token_id``.

Without a chat template: ``context_ids = tokenizer(context)`` (with the tokenizer's own special tokens,
e.g. BOS), ``question_ids = encode("\\n\\n" + question + "\\nAnswer:")``, ``answer_ids = encode(" " +
answer) + [eos]``.

Truncation to ``max_length`` removes context tokens only, by default from the middle (LongBench's
convention: the chat header and the document's start and end stay, and the question is never cut);
``truncation="end"`` keeps the context's start instead. The synthetic tasks are fitted to a token
budget when made, so they need no truncation when the budget leaves room for question and answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from apb.data.sample import Sample, TokenizedSample

QUESTION_SEPARATOR = "\n\n"
"""Between context and question in the user turn (chat) or the plain text."""
PLAIN_ANSWER_PROMPT = "\nAnswer:"
"""After the question when there is no chat template."""
TRUNCATION_MODES = ("middle", "end")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: the answer cannot be terminated")
    return int(eos)


def render_prompt(
    context: str, question: str, tokenizer: Any, *, system_prompt: str | None = None
) -> tuple[str, int]:
    """The chat-template prompt text and the character offset where the context ends in it."""
    context, question = context.strip(), question.strip()
    user = f"{context}{QUESTION_SEPARATOR}{question}" if context else question
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user})
    rendered, start = render_and_locate(tokenizer, messages, user)
    return rendered, start + len(context)


def render_and_locate(
    tokenizer: Any, messages: list[dict[str, str]], text: str, *, last: bool = False, **template_kwargs: Any
) -> tuple[str, int]:
    """The chat-template prompt of `messages` (with the generation prompt) and the character offset of
    `text` (a user message's content) in it: the first occurrence, or with `last` the last one."""
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **template_kwargs
    )
    if not isinstance(rendered, str):
        raise ValueError(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}, not str")
    start = rendered.rfind(text) if last else rendered.find(text)
    if start < 0:
        which = "last user message" if last else "user message"
        raise ValueError(f"the chat template changed the {which}; cannot locate it in the prompt")
    return rendered, start


def split_at_char(tokenizer: Any, text: str, char_end: int) -> tuple[list[int], list[int]]:
    """Token ids of `text`, split after the last token that starts before `char_end`."""
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        offsets = encoding["offset_mapping"]
        split = 0
        for i, (start, end) in enumerate(offsets):
            if start < char_end and end > start:
                split = i + 1
        return ids[:split], ids[split:]
    # No offsets: the longest common prefix of the whole text's ids and the context part's ids.
    ids = _encode(tokenizer, text)
    prefix = _encode(tokenizer, text[:char_end])
    split = 0
    while split < min(len(ids), len(prefix)) and ids[split] == prefix[split]:
        split += 1
    return ids[:split], ids[split:]


def _truncate(context_ids: list[int], budget: int, mode: str) -> list[int]:
    if len(context_ids) <= budget:
        return context_ids
    if mode == "end":
        return context_ids[:budget]
    head = budget // 2
    tail = budget - head
    return context_ids[:head] + (context_ids[-tail:] if tail else [])


def tokenize_sample(
    sample: Sample,
    tokenizer: Any,
    *,
    use_chat_template: bool = True,
    max_length: int | None = None,
    truncation: str = "middle",
    system_prompt: str | None = None,
) -> TokenizedSample:
    """Token ids of `sample`: ``context_ids + question_ids + answer_ids`` (see the module docstring).

    `max_length`: the most tokens in all three parts together; context tokens are removed
    (`truncation`: ``"middle"`` or ``"end"``) to fit. ValueError if question and answer alone
    leave no room for a context token. `system_prompt`: an optional system turn (chat only).
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    eos = _eos_id(tokenizer)
    if use_chat_template and has_chat_template(tokenizer):
        rendered, context_end = render_prompt(
            sample.context, sample.question, tokenizer, system_prompt=system_prompt
        )
        context_ids, question_ids = split_at_char(tokenizer, rendered, context_end)
        answer_ids = _encode(tokenizer, sample.answer.strip()) + [eos]
    else:
        context_ids = list(tokenizer(sample.context.strip())["input_ids"])
        question_ids = _encode(
            tokenizer, f"{QUESTION_SEPARATOR}{sample.question.strip()}{PLAIN_ANSWER_PROMPT}"
        )
        answer_ids = _encode(tokenizer, " " + sample.answer.strip()) + [eos]
    num_truncated = 0
    if max_length is not None:
        budget = max_length - len(question_ids) - len(answer_ids)
        if budget < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for context: question {len(question_ids)} "
                f"and answer {len(answer_ids)} tokens (task {sample.task!r})"
            )
        num_truncated = max(len(context_ids) - budget, 0)
        context_ids = _truncate(context_ids, budget, truncation)
    return TokenizedSample(
        context_ids=context_ids,
        question_ids=question_ids,
        answer_ids=answer_ids,
        task=sample.task,
        num_truncated=num_truncated,
    )


class TokenizedDataset(torch.utils.data.Dataset):
    """Map-style view of `samples` (a list or a `SyntheticDataset`) tokenised on access.

    Item ``i`` is ``tokenize_sample(samples[i], tokenizer, **options)``, a `TokenizedSample` of lists.
    Pair it with `ResumableSampler` for training: the sampler owns the order and the resume point.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenizer: Any,
        *,
        use_chat_template: bool = True,
        max_length: int | None = None,
        truncation: str = "middle",
        system_prompt: str | None = None,
    ) -> None:
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
        self.samples = samples
        self.tokenizer = tokenizer
        self.options = {
            "use_chat_template": use_chat_template,
            "max_length": max_length,
            "truncation": truncation,
            "system_prompt": system_prompt,
        }

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> TokenizedSample:
        return tokenize_sample(self.samples[index], self.tokenizer, **self.options)


def prompt_overhead(
    tokenizer: Any, *, use_chat_template: bool = True, question: str = "", system_prompt: str | None = None
) -> int:
    """Tokens a prompt adds around the context: chat header, separator, `question`, assistant header.

    ``total_length - prompt_overhead(tok, question=q) - answer_tokens`` is the `context_length` to ask
    the synthetic tasks for when a whole sequence must fit ``total_length`` (e.g. a model's window).
    """
    probe = Sample(context="x", question=question or "?", answer="")
    tokenized = tokenize_sample(
        probe, tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt
    )
    return (
        len(tokenized.context_ids)
        + len(tokenized.question_ids)
        - len(tokenizer.encode("x", add_special_tokens=False))
    )
