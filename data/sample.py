"""A long-context training/evaluation sample, as text and as token ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class Sample:
    """One long context, a question about it and the expected answer."""

    context: str
    """The long document (what APB splits over hosts)."""
    question: str
    """The question asked after the context (spliced into the anchor in query-aware mode)."""
    answer: str
    """The reference answer."""
    task: str | None = None
    """Synthetic task name or source name; None for plain local records."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form details; synthetic tasks store ``expected`` (strings the scorer looks for), the
    split, seed, index, needle depths and the context's token count."""


@dataclass(slots=True)
class TokenizedSample:
    """A `Sample` in token ids: ``context_ids + question_ids + answer_ids`` is the full sequence.

    With a chat template, ``context_ids + question_ids`` is exactly the tokenised prompt (chat header,
    user turn holding context and question, assistant header) and ``answer_ids`` is the answer followed
    by EOS. Each field is a list of ints or a 1-D LongTensor.
    """

    context_ids: list[int] | torch.Tensor
    """[num_context_tokens]: chat header (if any) and context."""
    question_ids: list[int] | torch.Tensor
    """[num_question_tokens]: separator, question, end of user turn, assistant header (if any)."""
    answer_ids: list[int] | torch.Tensor
    """[num_answer_tokens]: the answer and EOS."""
    task: str | None = None
    """Copied from the `Sample`."""
    num_truncated: int = 0
    """Context tokens removed to fit ``max_length``."""

    def __len__(self) -> int:
        return len(self.context_ids) + len(self.question_ids) + len(self.answer_ids)

    @property
    def input_ids(self) -> list[int]:
        """[len(self)]: the whole sequence."""
        return [int(i) for part in (self.context_ids, self.question_ids, self.answer_ids) for i in part]

    def to_tensors(self) -> TokenizedSample:
        """A copy whose id fields are 1-D int64 tensors."""

        def as_tensor(ids: list[int] | torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(ids, dtype=torch.long).reshape(-1)

        return TokenizedSample(
            context_ids=as_tensor(self.context_ids),
            question_ids=as_tensor(self.question_ids),
            answer_ids=as_tensor(self.answer_ids),
            task=self.task,
            num_truncated=self.num_truncated,
        )
