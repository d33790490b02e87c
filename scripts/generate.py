"""Answer a question about a long document with APB (or Star / exact / full attention for comparison).

One process simulating H hosts:
    python scripts/generate.py --model PATH --adapter ADAPTER --context-file doc.txt --question "..." --hosts 4
One host per rank:
    torchrun --nproc-per-node 4 scripts/generate.py --model PATH --adapter ADAPTER --context-file doc.txt --question "..."
Smoke test without downloads (random tiny Llama, random heads, byte tokenizer):
    python scripts/generate.py --tiny --hosts 3 --max-new-tokens 8

With a tokenizer that has a chat template (instruct models), the document and the question go in one user
message, cut into context and query by `apb.chat_inputs` (the prompt the model would see without APB);
otherwise, or with ``--prompt-format plain``, the document is followed by "Question: ... Answer:".
Prints the answer and the context-prefill time of every host.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

import torch
import torch.distributed as dist

import apb
from apb import APBConfig, APBModel
from apb.bench.common import TokenClock
from apb.config import SPLITS
from apb.fusion import COMPILE_LAYERS_ARG
from apb.fusion import check_backend as check_compile_backend


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 (0 pad, 1 bos, 2 eos): the --tiny model's tokenizer."""

    eos_token_id = 2
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model path or id (omit with --tiny)")
    p.add_argument("--gguf-file", help="load --model's weights from this GGUF file in the model folder")
    p.add_argument("--adapter", help="retaining-heads adapter: folder, Hub id or legacy .bin")
    p.add_argument("--tiny", action="store_true", help="random tiny Llama + random heads, no downloads")
    p.add_argument("--context-file", help="text file holding the context (default with --tiny: generated)")
    p.add_argument("--question", default="What is the secret word?", help="the question (the query)")
    p.add_argument(
        "--prompt-format",
        choices=["auto", "chat", "plain"],
        default="auto",
        help="chat: one user message through the tokenizer's chat template (apb.chat_inputs); plain: the "
        "document, then 'Question: ... Answer:'; auto (default): chat when the tokenizer has a template",
    )
    p.add_argument(
        "--hosts", type=int, default=None, help="hosts simulated in one process (not under torchrun)"
    )
    p.add_argument("--mode", choices=["apb", "star", "exact", "full"], default="apb")
    p.add_argument("--anchor-len", type=int, help="override the preset's anchor length (apb mode)")
    p.add_argument("--passing-len", type=int, help="override the preset's passing length (apb mode)")
    p.add_argument(
        "--split",
        choices=SPLITS,
        help="how the context is cut into host blocks (apb and exact modes; default: the library's, balanced)",
    )
    p.add_argument(
        "--calibrate",
        type=int,
        metavar="TOKENS",
        help="fit the balanced split to this GPU and backend first (APBModel.calibrate at TOKENS tokens, about "
        "6 simulated prefills); it prints the --attention-weight to pass next time",
    )
    p.add_argument(
        "--attention-weight",
        type=float,
        help="the balanced split's attention weight (what --calibrate printed; default: the library's)",
    )
    p.add_argument(
        "--backend", default="auto", help="attention backend: auto, reference, flex, flash, triton"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--compile-layers", **COMPILE_LAYERS_ARG)
    p.add_argument(
        "--cuda-graphs",
        choices=["auto", "on", "off"],
        default="auto",
        help="replay APB's decoding steps from a CUDA graph: auto = on a GPU with hosts in one process; "
        "on = also under torchrun (NCCL); off = eager steps",
    )
    args = p.parse_args(argv)
    if not args.tiny and not args.model:
        p.error("--model is required (or --tiny)")
    if args.compile_layers is not None:
        try:
            check_compile_backend(args.compile_layers)
        except ValueError as err:
            p.error(str(err))
    if args.calibrate is not None and args.attention_weight is not None:
        p.error("--calibrate fits the attention weight: give it or --attention-weight, not both")
    if args.calibrate is not None and (args.mode in ("star", "full") or args.split == "equal"):
        p.error("--calibrate fits the balanced split, which --mode star / full and --split equal do not use")
    if args.calibrate is not None and args.calibrate < 2:
        p.error(f"--calibrate needs a context length of at least 2 tokens, got {args.calibrate}")
    if args.attention_weight is not None and not args.attention_weight > 0:
        p.error(f"--attention-weight must be > 0, got {args.attention_weight}")
    return args


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE: one host per rank. Otherwise one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def load(args: argparse.Namespace, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    if args.tiny:
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=ByteTokenizer.vocab_size,
            max_position_embeddings=1 << 16,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
        tokenizer = ByteTokenizer()
    else:
        kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation="sdpa", **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(args.model, **kwargs)
    model = model.to(device).eval()
    heads = None
    if args.adapter:
        heads, _ = apb.load_heads(model, args.adapter)
    elif args.tiny:
        heads = apb.build_heads(model, hidden_size=64)
    return model, tokenizer, heads


def prompt_ids(
    tokenizer: Any, context_text: str, question: str, prompt_format: str = "auto"
) -> tuple[list[int], list[int], str]:
    """``(context_ids, query_ids, the format used)`` for `context_text` and `question`."""
    from apb.data import has_chat_template

    if prompt_format == "chat" or (prompt_format == "auto" and has_chat_template(tokenizer)):
        message = {"role": "user", "content": f"{context_text.strip()}\n\n{question.strip()}"}
        context_ids, query_ids = apb.chat_inputs(tokenizer, [message], question=question)
        return context_ids, query_ids, "chat"
    context_ids = tokenizer.encode(context_text, add_special_tokens=False)
    query_ids = tokenizer.encode(f"\n\nQuestion: {question}\nAnswer:", add_special_tokens=False)
    return context_ids, query_ids, "plain"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    print0 = print if rank == 0 else (lambda *a, **k: None)
    model, tokenizer, heads = load(args, device)
    if args.compile_layers is not None:  # fewer launches per step: decoding is bound by them on a GPU
        num_compiled = apb.compile_layers(model, backend=args.compile_layers)
        print0(f"compile_layers: {num_compiled} modules ({args.compile_layers}), compiled on the first call")

    if args.context_file:
        with open(args.context_file, encoding="utf-8") as f:
            context_text = f.read()
    else:
        context_text = (
            "The grass is green. The sky is blue. " * 40
            + "The secret word is 'apple'. "
            + ("The sun is yellow. " * 40)
        )
    try:
        context_ids, query_ids, used = prompt_ids(tokenizer, context_text, args.question, args.prompt_format)
    except ValueError as err:  # --prompt-format chat without a chat template, no document, ...
        raise SystemExit(f"prompt: {err}") from err
    num_hosts = world if world > 1 else (args.hosts or 1)
    print0(
        f"context {len(context_ids)} tokens, query {len(query_ids)} tokens ({used} prompt), mode {args.mode}, "
        f"{num_hosts} hosts"
    )

    gen = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
    )
    started = time.perf_counter()
    if args.mode == "full":
        if world > 1:
            raise SystemExit("--mode full runs in one process (the unmodified model); drop torchrun")
        torch.manual_seed(args.seed)
        prompt = torch.tensor([context_ids + query_ids], device=device)
        clock = TokenClock()
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            pad_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stop_strings=args.stop,
            tokenizer=tokenizer if args.stop else None,
            streamer=clock,
            **gen,
        )
        ids = out[0, prompt.shape[1] :].tolist()
        times = {}
    else:
        n = len(context_ids)
        split = {"split": args.split} if args.split else {}
        if args.mode == "exact":
            config = APBConfig.exact(backend=args.backend, **split)
        elif args.mode == "star":
            config = APBConfig.star(n, num_hosts, backend=args.backend)
        else:
            sizes = (("anchor_len", args.anchor_len), ("passing_len", args.passing_len))
            overrides = {k: v for k, v in sizes if v is not None}
            config = APBConfig.for_length(n, num_hosts, backend=args.backend, **overrides, **split)
        apbm = APBModel(model, heads)
        if args.attention_weight is not None:
            apbm.cost_model = apb.CostModel.from_model_config(
                model.config, attention_weight=args.attention_weight
            )
        elif args.calibrate is not None:
            # the rates are the GPU's and the backend's: time the default APB layout at that length
            hosts = None if world > 1 else num_hosts
            timed = apbm.default_config(args.calibrate, num_hosts, len(query_ids))
            timed = dataclasses.replace(timed, backend=args.backend)
            try:
                fit = apbm.calibrate(
                    args.calibrate, hosts, num_query=len(query_ids), config=timed, progress=rank == 0
                )
            except ValueError as err:
                raise SystemExit(f"--calibrate {args.calibrate}: {err}") from err
            print0(
                f"calibrated: attention weight {fit.cost.attention_weight:.3f} (linear {fit.linear_tflops:.3g}, "
                f"attention {fit.attention_tflops:.3g} TFLOP/s, fit within {fit.max_error:.1%}); next time "
                f"pass --attention-weight {fit.cost.attention_weight:.3f}"
            )
        clock = TokenClock()  # from here: the time to the first token leaves out a calibration
        with apbm.recording() as record:  # per-host prefill times (hosts of this process)
            out = apbm.generate(
                context_ids,
                query_ids,
                config=config,
                num_hosts=None if world > 1 else num_hosts,
                eos_token_id=tokenizer.eos_token_id,
                stop_strings=args.stop,
                tokenizer=tokenizer,
                seed=args.seed,
                streamer=clock,  # called on host 0's rank only
                cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs],
                **gen,
            )
        ids = out[0].tolist()
        times = dict(record.host_seconds)
        if world > 1:
            gathered: list[dict] = [{} for _ in range(world)]
            dist.all_gather_object(gathered, times)
            times = {h: t for d in gathered for h, t in d.items()}
        print0(f"config: {config}")
        print0(
            f"host blocks: {' / '.join(str(v.block_len) for v in record.plan.hosts)} tokens ({config.split} split)"
        )
    elapsed = time.perf_counter() - started
    for host in sorted(times):
        print0(f"prefill host {host}: {times[host] * 1000:.1f} ms")
    token_times = clock.summary()
    if token_times:
        print0(token_times)
    print0(
        f"answer ({len(ids)} tokens, {elapsed:.2f}s total): {tokenizer.decode(ids, skip_special_tokens=True)!r}"
    )
    if world > 1:
        dist.barrier()  # leave together: gloo can abort a process whose peer tears the group down first
        dist.destroy_process_group()


if __name__ == "__main__":
    from apb.comm import exit_rank

    main()
    exit_rank(0)
