"""Scoring one eval item with one method: full attention, Star Attention or APB (a head set or the
training-free ``query_attention`` selector, equal or balanced split, a passing budget) on simulated hosts, teacher-forced (one prefill over question + answer prefix + gold
answer) or by greedy decoding."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from apb.eval.tasks import EvalItem

METHODS = ("full", "star", "apb-qa", "apb-qagn", "apb-random", "apb-qattn")
"""Built-in methods; every ``--adapter NAME=PATH`` adds ``apb-NAME``."""

TRAINING_FREE = {"apb-qattn": "query_attention"}
"""APB methods that need no heads: method -> `apb.selectors` name."""

BALANCED_SUFFIX = "/balanced"
"""Added to an APB method run with the balanced split of the context into host blocks (``--splits
balanced``); APB methods without it run the paper's equal split (the library's default is the balanced
one, `APBConfig.split`; the eval keeps the paper's split unless asked, so its rows compare with the paper)."""

BUDGET_MARK = "@block/"
"""``apb-X@block/N``: APB with passing_len = block / N (``--budgets``); APB methods without it pass the
paper's block / 8 (`APBConfig.for_length`)."""


@dataclasses.dataclass(frozen=True, slots=True)
class MethodSpec:
    """What a method name (``apb-qa/balanced@block/32``) asks for."""

    name: str
    """The method without split or budget: ``full``, ``star``, ``apb-qa``, ``apb-qattn``, ``apb-NAME``."""
    split: str = "equal"
    """APB's host split (`APBConfig.split`)."""
    divisor: int | None = None
    """passing_len = block // divisor; None: the paper's default (block / 8)."""

    @property
    def heads(self) -> str | None:
        """The head set it runs with (``qa``); None for full, Star and the training-free selectors."""
        if not self.name.startswith("apb-") or self.name in TRAINING_FREE:
            return None
        return self.name[len("apb-") :]

    @property
    def selector(self) -> str:
        return TRAINING_FREE.get(self.name, "heads")

    @property
    def method(self) -> str:
        """The method name (inverse of `parse_method`)."""
        name = self.name + (BALANCED_SUFFIX if self.split == "balanced" else "")
        return name if self.divisor is None else with_budget(name, self.divisor)

    def renamed(self, name: str) -> str:
        """Method `name` at this method's split and budget."""
        return dataclasses.replace(self, name=name).method


def parse_method(method: str) -> MethodSpec:
    """``apb-qa/balanced@block/32`` -> MethodSpec("apb-qa", "balanced", 32)."""
    name, mark, divisor = method.partition(BUDGET_MARK)
    if mark and (not name.startswith("apb-") or not divisor.isdigit() or int(divisor) < 1):
        raise ValueError(f"method {method!r}: a budget ({BUDGET_MARK}N, N >= 1) is for APB methods only")
    split = "balanced" if name.endswith(BALANCED_SUFFIX) else "equal"
    return MethodSpec(
        name=name.removesuffix(BALANCED_SUFFIX), split=split, divisor=int(divisor) if mark else None
    )


def with_budget(method: str, divisor: int) -> str:
    """The name of `method` run with passing_len = block // `divisor`."""
    return f"{method}{BUDGET_MARK}{divisor}"


def heads_name(method: str) -> str | None:
    """The head set an APB method runs with (``apb-qa``, ``apb-qa/balanced@block/32`` -> ``qa``); None for
    full, Star and the training-free selectors (``apb-qattn``)."""
    return parse_method(method).heads


def token_tensor(ids: list[int], device: torch.device) -> torch.Tensor:
    """[1, len(ids)] int64 ids on `device`."""
    return torch.tensor([ids], dtype=torch.long, device=device)


def teacher_forced_hits(logits: torch.Tensor, item: EvalItem) -> list[bool]:
    """Per expected item: does greedy argmax equal every gold token of its span?

    logits: [num_answer, vocab], row j predicts answer token j.
    """
    right = logits.argmax(-1).cpu() == torch.tensor(item.answer_ids)
    return [bool(right[s:e].all()) for s, e in item.spans]


def divergence(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || logits) in nats, averaged over the answer tokens: how far a method's prediction
    of the gold answer is from full attention's (0 = the same distributions). Unlike the task score it
    does not reward a method for departing from the model: a compressed prefill that happens to answer
    better than full attention on a small model still counts as a departure.

    reference, logits: [num_answer, vocab] (`Evaluator.answer_logits`)."""
    ref, out = reference.float().log_softmax(-1), logits.float().log_softmax(-1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


class Evaluator:
    """Runs one item with one method and host count; returns the item's score in [0, 1]."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        heads: dict[str, Any],
        backend: str = "reference",
    ):
        from apb import APBModel

        self.model = model
        self.tokenizer = tokenizer
        self.heads = heads
        self.backend = backend
        first = next(iter(heads.values()))
        self.apb = APBModel(model, first)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def config(self, method: str, num_context: int, num_hosts: int) -> Any:
        from apb import APBConfig

        if method == "star":
            return APBConfig.star(num_context, num_hosts, backend=self.backend)
        spec = parse_method(method)
        overrides: dict[str, Any] = {"backend": self.backend, "split": spec.split, "selector": spec.selector}
        if spec.divisor is not None:  # as apb.recall.recall_runs sizes it
            overrides["passing_len"] = max(1, (num_context // num_hosts) // spec.divisor)
        return APBConfig.for_length(num_context, num_hosts, **overrides)

    def host_plans(self, keys: list[tuple[str, int]], lengths: tuple[int, ...]) -> dict[str, dict[str, Any]]:
        """Every APB run's host plan at each nominal length (`apb.HostPlan.describe`: blocks, anchor,
        shared anchor, passing counts), by row name. A results file keeps them so that a resumed run can
        tell when the split rules changed in between (its new samples would come from other splits)."""
        from apb.eval.results import label

        plans: dict[str, dict[str, Any]] = {}
        for method, num_hosts in keys:
            if method == "full" or num_hosts < 2:
                continue
            plans[label(method, num_hosts)] = {
                str(n): self.apb.plan(n, 0, num_hosts, self.config(method, n, num_hosts)).describe()
                for n in lengths
            }
        return plans

    def _use_heads(self, method: str) -> None:
        name = heads_name(method)
        if name:
            self.apb.heads = self.heads[name]

    @torch.no_grad()
    def answer_logits(self, item: EvalItem, method: str, num_hosts: int) -> torch.Tensor:
        """[num_answer, vocab] logits predicting each gold answer token (one prefill call)."""
        device = self.device
        tail = item.question_ids + item.prefix_ids + item.answer_ids[:-1]
        first = len(item.question_ids) + len(item.prefix_ids) - 1  # row that predicts answer token 0
        if method == "full":
            ids = token_tensor(item.context_ids + tail, device)
            hidden = self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            hidden = hidden[:, len(item.context_ids) + first :]
            return self.model.get_output_embeddings()(hidden)[0].float()
        self._use_heads(method)
        # The anchor gets the question only; the answer prefix and gold answer run on the last host after
        # the prefill, like tokens being decoded.
        logits = self.apb.prefill(
            token_tensor(item.context_ids, device),
            token_tensor(tail, device),
            config=self.config(method, len(item.context_ids), num_hosts),
            num_hosts=num_hosts,
            anchor_query_ids=token_tensor(item.question_ids, device),
        )
        return logits[0, first:].float()

    def score_teacher(self, item: EvalItem, method: str, num_hosts: int) -> float:
        return self.teacher(item, method, num_hosts)[0]

    def teacher(self, item: EvalItem, method: str, num_hosts: int) -> tuple[float, torch.Tensor]:
        """(score, answer logits [num_answer, vocab]) of one teacher-forced run."""
        logits = self.answer_logits(item, method, num_hosts)
        hits = teacher_forced_hits(logits, item)
        return sum(hits) / len(hits), logits

    @torch.no_grad()
    def generate_ids(
        self, item: EvalItem, method: str, num_hosts: int, max_new_tokens: int = 48
    ) -> list[int]:
        """Greedy continuation after question + answer prefix (EOS and what follows dropped).

        APB: the anchor gets the question only, as in teacher mode, so that the two modes agree exactly.
        """
        device = self.device
        eos = self.tokenizer.eos_token_id
        if method == "full":
            ids = token_tensor(item.context_ids + item.question_ids + item.prefix_ids, device)
            out = self.model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
            new = [int(t) for t in out[0, ids.shape[1] :]]
        else:
            self._use_heads(method)
            config = self.config(method, len(item.context_ids), num_hosts)
            out = self.apb.generate(
                token_tensor(item.context_ids, device),
                token_tensor(item.question_ids + item.prefix_ids, device),
                config=config,
                num_hosts=num_hosts,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                anchor_query_ids=token_tensor(item.question_ids, device),
            )
            new = [int(t) for t in out[0]]
        return new[: new.index(eos)] if eos in new else new

    def generate_text(self, item: EvalItem, method: str, num_hosts: int, max_new_tokens: int = 48) -> str:
        ids = self.generate_ids(item, method, num_hosts, max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def score_generate(self, item: EvalItem, method: str, num_hosts: int) -> tuple[float, str]:
        from apb.data import Sample, score

        text = self.generate_text(item, method, num_hosts)
        sample = Sample(
            context="", question="", answer=item.expected[0], task=item.task, meta={"expected": item.expected}
        )
        return score(text, sample), text
