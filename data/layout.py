"""What one APB host sees, as a training sequence.

Query-aware layout (APB, arXiv 2502.12085, host h > 0)::

    [ anchor: context[:offset] + question + context[offset:...] | context block | question | answer ]
      positions 0 .. anchor_len-1                                  true positions  following the block

The anchor is the first tokens of the context with the question spliced in after `query_offset`
tokens, `anchor_len` tokens in all. The block is the context slice the host owns, at its true
positions; the question and the answer follow it. The heads score the block's tokens; the labels'
query rows are the question and answer tokens. Query-agnostic mode (Locret) drops the question from
the anchor (the anchor is then simply `context[:anchor_len]`).

The anchor and the ``[anchor | block]`` ids and positions come from `apb.plan` (`splice_anchor`,
`HostView`), the code the APB prefill runs, so a sample is exactly what an inference host sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from apb.config import APBConfig
from apb.plan import HostView, splice_anchor


@dataclass(kw_only=True, slots=True)
class LayoutParams:
    """How a sample is laid out as one host's view."""

    anchor_len: int
    """Tokens in the anchor block (positions 0..anchor_len-1), the spliced question included."""
    block_len: int | None = None
    """Context tokens in the block; None: every context token after `block_start` (up to the length budget)."""
    block_start: int | None = None
    """Position in the context where the block starts; None: right after the anchor (`anchor_len`)."""
    query_offset: int = 16
    """Context tokens in the anchor before the spliced question (APB's reference uses 16)."""
    query_in_anchor: bool = True
    """Splice the question into the anchor (APB); False drops it (Locret)."""
    max_length: int | None = None
    """Total sequence budget; the block is shortened to fit it (never below `min_block_len`)."""
    min_block_len: int = 1
    """A sample whose block would be shorter than this is refused."""

    def __post_init__(self) -> None:
        if self.anchor_len < 0:
            raise ValueError(f"anchor_len must be >= 0, got {self.anchor_len}")
        if self.block_len is not None and self.block_len < 1:
            raise ValueError(f"block_len must be >= 1 or None, got {self.block_len}")
        if self.block_start is not None and self.block_start < self.anchor_len:
            raise ValueError(
                f"block_start ({self.block_start}) must not overlap the anchor (anchor_len {self.anchor_len})"
            )
        if not 0 <= self.query_offset <= self.anchor_len:
            raise ValueError(
                f"query_offset must be in [0, anchor_len={self.anchor_len}], got {self.query_offset}"
            )
        if self.min_block_len < 1:
            raise ValueError(f"min_block_len must be >= 1, got {self.min_block_len}")


@dataclass(kw_only=True, slots=True)
class HostLayout:
    """One training sequence and its index ranges."""

    input_ids: torch.Tensor
    """[seq] token ids."""
    position_ids: torch.Tensor
    """[seq] positions: anchor 0..anchor_len-1, the block at its true positions, then question/answer."""
    anchor: tuple[int, int]
    """[start, end) of the anchor in the sequence."""
    block: tuple[int, int]
    """[start, end) of the block tokens (scored by the heads)."""
    label_rows: tuple[int, int]
    """[start, end) of the question and answer tokens (the labels' query rows)."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def build_host_layout(
    context_ids: Sequence[int] | torch.Tensor,
    question_ids: Sequence[int] | torch.Tensor,
    answer_ids: Sequence[int] | torch.Tensor,
    params: LayoutParams,
) -> HostLayout:
    """Lay out one sample as an APB host sees it (module docstring); ValueError if it is too short."""
    context, question, answer = _as_list(context_ids), _as_list(question_ids), _as_list(answer_ids)
    if not question and not answer:
        raise ValueError("sample has neither question nor answer tokens: no label rows")
    la = params.anchor_len
    query_in_anchor = params.query_in_anchor and la > 0
    if query_in_anchor and len(question) > la - params.query_offset:
        raise ValueError(
            f"question ({len(question)} tokens) does not fit in the anchor after query_offset "
            f"{params.query_offset} (anchor_len {la}); raise anchor_len"
        )
    config = APBConfig(anchor_len=la, query_in_anchor=query_in_anchor, query_offset=params.query_offset)
    anchor = splice_anchor(
        torch.tensor([context], dtype=torch.long), torch.tensor([question], dtype=torch.long), config, la
    )
    block_start = la if params.block_start is None else params.block_start
    available = len(context) - block_start
    block_len = available if params.block_len is None else params.block_len
    if params.max_length is not None:
        block_len = min(block_len, params.max_length - la - len(question) - len(answer))
    needed = max(params.min_block_len, 1 if params.block_len is None else params.block_len)
    if anchor.shape[1] < la or available < needed or block_len < params.min_block_len:
        raise ValueError(
            f"sample too short for the layout: context {len(context)} tokens, question {len(question)}, "
            f"answer {len(answer)}; needs anchor {la} + block of >= {needed} tokens starting at "
            f"{block_start}" + (f" within max_length {params.max_length}" if params.max_length else "")
        )
    view = HostView(
        host=1,  # a host with an anchor
        block=(block_start, block_start + block_len),
        num_anchor=la,
        num_excluded=0,
        passing_count=0,
        reads=(),
    )
    tail = torch.tensor(question + answer, dtype=torch.long)
    block_end_pos = block_start + block_len
    ids = torch.cat([view.input_ids(torch.tensor([context], dtype=torch.long), anchor)[0], tail])
    positions = torch.cat([view.position_ids(), torch.arange(block_end_pos, block_end_pos + len(tail))])
    return HostLayout(
        input_ids=ids,
        position_ids=positions,
        anchor=(0, la),
        block=(la, la + block_len),
        label_rows=(la + block_len, len(ids)),
    )
