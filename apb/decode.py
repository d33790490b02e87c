"""Token choice and stopping for APB generation (run on the last host, then broadcast)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

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
    check_sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    if not do_sample:
        return logits.argmax(dim=-1)
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


def is_int(value: object) -> bool:
    """A Python or NumPy integer, not a bool (True would silently count as 1)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_generation(*, max_new_tokens: object, seed: object = None) -> None:
    """`max_new_tokens` an int >= 1 and `seed` None or an int: `TypeError`/`ValueError` naming the argument
    (checked before the prefill, so a bad value costs nothing)."""
    if not is_int(max_new_tokens):
        raise TypeError(
            f"max_new_tokens must be an int >= 1, got {max_new_tokens!r} ({type(max_new_tokens).__name__})"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if seed is not None and not is_int(seed):
        raise TypeError(f"seed must be an int or None, got {seed!r} ({type(seed).__name__})")


def check_sampling(*, do_sample: object, temperature: object, top_k: object, top_p: object) -> None:
    """Types always (a typo like temperature="0.7" is refused even when greedy); ranges when sampling:
    temperature > 0, top_k >= 0 (0 = off), top_p in (0, 1]. `TypeError`/`ValueError` naming the argument."""
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r} ({type(do_sample).__name__})")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if not is_int(top_k):
        raise TypeError(f"top_k must be an int >= 0 (0 = off), got {top_k!r} ({type(top_k).__name__})")
    if not do_sample:
        return
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")


def eos_ids(eos_token_id: object) -> list[int]:
    """None, an int or a sequence of ints (or an integer tensor) -> a list of ids >= 0. A string such as
    "</s>" is a `TypeError`: it would never equal a generated id, so generation would never stop."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        if eos_token_id.is_floating_point() or eos_token_id.is_complex() or eos_token_id.dtype == torch.bool:
            raise TypeError(f"eos_token_id must hold integer ids, got a {eos_token_id.dtype} tensor")
        eos_token_id = eos_token_id.flatten().tolist()
    if isinstance(eos_token_id, (str, bytes)):
        raise TypeError(
            f"eos_token_id must be an int or a sequence of ints, got the string {eos_token_id!r}; pass the "
            "token's id (tokenizer.eos_token_id, or tokenizer.convert_tokens_to_ids(...)) or tokenizer=..."
        )
    ids = [eos_token_id] if not isinstance(eos_token_id, Sequence) else list(eos_token_id)
    for value in ids:
        if not is_int(value):
            raise TypeError(
                f"eos_token_id must be an int or a sequence of ints, got {eos_token_id!r} (holding "
                f"{type(value).__name__}); pass token ids such as tokenizer.eos_token_id"
            )
        if value < 0:
            raise ValueError(f"eos_token_id must be ids >= 0, got {eos_token_id!r}")
    return [int(value) for value in ids]


class StopCriteria:
    """EOS ids and stop strings; a row stops at its first EOS or once its text holds a stop string."""

    def __init__(
        self,
        batch_size: int,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer=None,
        pad_token_id: int | None = None,
    ):
        self.eos_ids = eos_ids(eos_token_id)
        if pad_token_id is not None and not is_int(pad_token_id):
            raise TypeError(f"pad_token_id must be an int or None, got {pad_token_id!r}")
        if pad_token_id is not None and pad_token_id < 0:
            raise ValueError(f"pad_token_id must be >= 0, got {pad_token_id}")
        self._pad_token_id = None if pad_token_id is None else int(pad_token_id)
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self.stop_strings = list(stop_strings or [])
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise TypeError(
                f"stop_strings must be a non-empty string or a sequence of them, got {stop_strings!r}"
            )
        if self.stop_strings and tokenizer is None:
            raise ValueError(
                "stop_strings need a tokenizer to decode the generated tokens (pass tokenizer=...)"
            )
        self.tokenizer = tokenizer
        self.finished = [False] * batch_size

    @property
    def pad_token_id(self) -> int | None:
        """What finished rows get from then on: `pad_token_id` if given, else the first EOS id (as
        transformers does when the model has no pad token)."""
        if self._pad_token_id is not None:
            return self._pad_token_id
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
