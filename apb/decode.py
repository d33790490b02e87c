"""Token choice and stopping for APB generation (run on the last host, then broadcast)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sample_next_token(
    logits: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: [batch, vocab] -> token ids [batch] (long). Greedy unless `do_sample`; then
    temperature, top-k (0 = off) and nucleus top-p (1.0 = off), drawn with `generator`."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (keeps >= 1)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class StopCriteria:
    """EOS ids and stop strings; a row stops at its first EOS or once its text holds a stop string."""

    def __init__(
        self,
        batch_size: int,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer=None,
    ):
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self.eos_ids = list(eos_token_id or [])
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self.stop_strings = list(stop_strings or [])
        if self.stop_strings and tokenizer is None:
            raise ValueError(
                "stop_strings need a tokenizer to decode the generated tokens (pass tokenizer=...)"
            )
        self.tokenizer = tokenizer
        self.finished = [False] * batch_size

    @property
    def pad_token_id(self) -> int | None:
        """What finished rows get from then on (the first EOS id, as transformers does)."""
        return self.eos_ids[0] if self.eos_ids else None

    def update(self, generated: torch.Tensor) -> bool:
        """generated: [batch, steps] so far. Marks finished rows; True when every row is finished."""
        last = generated[:, -1].tolist()
        for row, token in enumerate(last):
            if self.finished[row]:
                continue
            if token in self.eos_ids:
                self.finished[row] = True
            elif self.stop_strings:
                text = self.tokenizer.decode(generated[row].tolist(), skip_special_tokens=False)
                self.finished[row] = any(s in text for s in self.stop_strings)
        return all(self.finished)
