"""Benchmark one training step of retaining heads against a plain no-grad forward of the base.

    PYTHONUNBUFFERED=1 python scripts/bench_train.py --out bench.json

Llama-3.1-8B-shaped model with random bf16 weights, built on the GPU from a config (no download);
one 10K-token sample in the APB host layout. Timed, each after warm-up, median of `--iters`:

- `forward_full`: the plain base, `model(input_ids)` under no_grad (logits included);
- `forward_decoder`: the same without the LM head (`model.model(input_ids)`), what a step really runs;
- `base_with_labels`: the step's no-grad base forward with labels and q/k/v capture (`train.step.base_forward`);
- `train_step`: that + heads forward/backward + AdamW step on fp32 master weights (bf16 compute), i.e.
  `train.step.micro_step` + backward + optimizer: the same step function the DeepSpeed trainer runs,
  here in a plain torch loop (DeepSpeed is not installed on the benchmark machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from apb.data.layout import LayoutParams, build_host_layout
from apb.train.step import HeadsStack, base_forward, micro_step, prepare_base

from apb.heads import ModelShape, RetainingHeads


def llama8b_config(num_layers: int, smoke: bool = False):
    from transformers import LlamaConfig

    if smoke:  # a CPU check of the script itself
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128256,
            max_position_embeddings=131072,
        )
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        hidden_act="silu",
        tie_word_embeddings=False,
    )


def timed(fn, iters: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


class MasterAdamW:
    """AdamW on fp32 master copies of bf16 parameters (what DeepSpeed's bf16 mode does)."""

    def __init__(self, params, **kwargs):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, fused=self.master[0].is_cuda, **kwargs)

    def step(self) -> None:
        for m, p in zip(self.master, self.params, strict=True):
            m.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(self.master, 1.0, foreach=True)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)
        for p in self.params:
            p.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description="training step vs plain forward")
    parser.add_argument("--seq", type=int, default=10240, help="tokens per sample (laid out)")
    parser.add_argument("--anchor", type=int, default=1024)
    parser.add_argument("--question", type=int, default=64)
    parser.add_argument("--answer", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script only")
    args = parser.parse_args()

    import transformers

    torch.manual_seed(0)
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.cuda.synchronize = lambda *a: None  # noqa: E731 (CPU check: nothing to wait for)
        torch.cuda.get_device_name = lambda *a: "cpu"  # noqa: E731
        torch.cuda.reset_peak_memory_stats = lambda *a: None  # noqa: E731
        torch.cuda.max_memory_allocated = lambda *a: 0  # noqa: E731
    with device:
        model = transformers.AutoModelForCausalLM.from_config(
            llama8b_config(args.layers, args.smoke), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.eval().requires_grad_(False)
    num_params = sum(p.numel() for p in model.parameters())

    context_len = args.seq - args.question - args.answer  # the anchor is cut from the context
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 128000, (context_len + args.question + args.answer,), generator=gen).tolist()
    context, question, answer = (
        ids[:context_len],
        ids[context_len : context_len + args.question],
        ids[context_len + args.question :],
    )
    layout = build_host_layout(
        context, question, answer, LayoutParams(anchor_len=args.anchor, query_offset=16, query_in_anchor=True)
    )
    num_tokens = layout.num_tokens
    plain_ids = layout.input_ids.to(device)[None]

    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": f"Llama-3.1-8B-shaped, {args.layers} layers, {num_params / 1e9:.2f}B params, bf16, random weights",
        "tokens": num_tokens,
        "block_tokens": layout.block[1] - layout.block[0],
        "label_rows": layout.label_rows[1] - layout.label_rows[0],
    }

    with torch.no_grad():
        results["forward_full_s"] = timed(lambda: model(input_ids=plain_ids, use_cache=False), args.iters)
        results["forward_decoder_s"] = timed(
            lambda: model.model(input_ids=plain_ids, use_cache=False), args.iters
        )

    capture = prepare_base(model)
    heads = HeadsStack(RetainingHeads(ModelShape.from_model(model), hidden_size=1024)).to(
        device, torch.bfloat16
    )
    optimizer = MasterAdamW(heads.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.01)
    results["head_params_m"] = sum(p.numel() for p in heads.parameters()) / 1e6

    results["base_with_labels_s"] = timed(lambda: base_forward(model, capture, layout), args.iters)
    losses = []

    def step():
        result = micro_step(model, capture, heads, layout, smooth_weight=0.0025)
        result.loss.backward()
        optimizer.step()
        losses.append(float(result.loss))

    torch.cuda.reset_peak_memory_stats()
    results["train_step_s"] = timed(step, args.iters)
    results["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["losses"] = losses

    med = {k[:-2]: statistics.median(v) for k, v in results.items() if k.endswith("_s")}
    results["median_s"] = med
    results["ratio_step_vs_forward_full"] = med["train_step"] / med["forward_full"]
    results["ratio_step_vs_forward_decoder"] = med["train_step"] / med["forward_decoder"]
    results["train_tokens_per_s"] = num_tokens / med["train_step"]
    results["train_tokens_per_gpu_hour_m"] = num_tokens / med["train_step"] * 3600 / 1e6
    results["forward_full_tokens_per_s"] = num_tokens / med["forward_full"]
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
