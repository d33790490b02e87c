"""`chat_inputs`: a chat prompt -> APB's two inputs, the long context and the query after it.

APB prefills the context across hosts and runs the query on top (spliced into every host's anchor
too), so a chat prompt must be cut in two: everything up to the end of the document, then the question,
the end of the user turn and the assistant header. The cut is the one training used
(`apb.data.tokenize_sample`): the prompt is rendered with the tokenizer's chat template and tokenised
once, and the tokens that start before the document's last character ends are the context. Hence
``context_ids + query_ids`` is exactly ``tokenizer.apply_chat_template(messages,
add_generation_prompt=True)``: the model sees the prompt it would see without APB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

Messages = Sequence[Mapping[str, Any]]


def chat_inputs(
    tokenizer: Any,
    messages: Messages | Sequence[Messages],
    *,
    question: str | Sequence[str] | None = None,
    return_tensors: str | None = None,
    **template_kwargs: Any,
) -> tuple[Any, Any]:
    """Split a chat prompt into ``(context_ids, query_ids)`` for `APBModel.prefill` / `generate`.

    `messages`: a conversation, a list of ``{"role", "content"}`` dicts whose last one is the user's
    message holding a long document followed by a question (earlier turns and a system prompt belong to
    the context), or a list of such conversations (a batch).
    `question`: the end of the last user message that is the question (per conversation for a batch);
    the blank line(s) before it go to the query. By default the question is the last paragraph: the text
    after the last blank line (``"\\n\\n"``, the separator training used).
    `return_tensors`: None gives lists of ints (lists of lists for a batch, rows may differ in length);
    ``"pt"`` gives long tensors [batch, seq] (a batch must then have equal lengths).
    `template_kwargs` go to ``tokenizer.apply_chat_template`` (e.g. ``enable_thinking=False``).

    ``context_ids + query_ids`` equals ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``.
    `ValueError` when the tokenizer has no chat template, the last message is not the user's, no
    document precedes the question, or `question` does not end the last user message.
    """
    if return_tensors not in (None, "pt"):
        raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
    if _is_batch(messages):
        questions = [None] * len(messages) if question is None else question
        if isinstance(questions, str) or len(questions) != len(messages):
            raise ValueError(
                f"for a batch of {len(messages)} conversations, question must be None or a list of as many "
                f"strings, got {question!r}"
            )
        rows = [
            _split(tokenizer, conversation, q, template_kwargs)
            for conversation, q in zip(messages, questions, strict=True)
        ]
    else:
        if question is not None and not isinstance(question, str):
            raise ValueError(f"question must be a string for one conversation, got {type(question).__name__}")
        rows = [_split(tokenizer, messages, question, template_kwargs)]
    contexts = [context for context, _ in rows]
    queries = [query for _, query in rows]
    if return_tensors == "pt":
        for name, parts in (("context", contexts), ("query", queries)):
            if len({len(p) for p in parts}) > 1:
                raise ValueError(
                    f"return_tensors='pt' needs equal lengths, but the {name} rows have "
                    f"{[len(p) for p in parts]} tokens; leave return_tensors=None (APBModel takes rows of "
                    "different lengths as lists)"
                )
        return torch.tensor(contexts, dtype=torch.long), torch.tensor(queries, dtype=torch.long)
    if _is_batch(messages):
        return contexts, queries
    return contexts[0], queries[0]


def _is_batch(messages: Any) -> bool:
    """A list of conversations rather than one (whose items are message mappings)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of {{'role', 'content'}} dicts (or a list of such lists), got "
            f"{type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty: it needs at least the user's message")
    return not isinstance(messages[0], Mapping)


def _split(
    tokenizer: Any, messages: Messages, question: str | None, template_kwargs: Mapping[str, Any]
) -> tuple[list[int], list[int]]:
    from apb.data.tokenization import QUESTION_SEPARATOR, has_chat_template, render_and_locate, split_at_char

    if not has_chat_template(tokenizer):
        raise ValueError(
            "the tokenizer has no chat template; without one, tokenize the two parts yourself: "
            "context_ids = tokenizer(document).input_ids, query_ids = "
            "tokenizer(question, add_special_tokens=False).input_ids"
        )
    if not messages or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError("a conversation must be a non-empty list of {'role', 'content'} dicts")
    last = messages[-1]
    if last.get("role") != "user" or not isinstance(last.get("content"), str):
        raise ValueError(
            f"the last message must be the user's, with text content (the document and the question), got "
            f"role {last.get('role')!r}"
        )
    text = last["content"].strip()  # templates may trim the content (Llama 3 does): find the stripped text
    if question is None:
        cut = text.rfind(QUESTION_SEPARATOR)
        if cut < 0:
            raise ValueError(
                "cannot tell the document from the question: the last user message has no blank line; "
                "pass question=... (the text that ends the message)"
            )
        document = text[:cut].rstrip()
    else:
        asked = question.strip()
        if not asked or not text.endswith(asked):
            raise ValueError(f"question {question[:60]!r} does not end the last user message")
        document = text[: len(text) - len(asked)].rstrip()
    if not document:
        raise ValueError("the last user message holds no document before the question")
    rendered, start = render_and_locate(tokenizer, list(messages), text, last=True, **template_kwargs)
    return split_at_char(tokenizer, rendered, start + len(document))
