"""Quick start on a built-in default: no downloads, a few seconds on a CPU.

Builds a tiny random-weight Llama from a config, attaches fresh retaining heads, saves them as an
adapter, loads the adapter back (strictly) and prints every layer's score shape.

    python scripts/quickstart.py [--out runs/quickstart/adapter]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import apb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/quickstart/adapter"), help="adapter folder to write"
    )
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)

    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=4096,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    print(
        f"[1/4] built a random-weight llama: {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} query / {config.num_key_value_heads} KV heads"
    )

    heads = apb.build_heads(model, hidden_size=256)
    num_params = sum(p.numel() for p in heads.parameters())
    print(
        f"[2/4] attached retaining heads: {len(heads.layers)} x fc1 {heads.shape.input_size}->256, "
        f"fc2 256->{heads.shape.num_kv_heads} ({num_params / 1e3:.0f}K parameters)"
    )

    folder = apb.save_adapter(
        heads,
        args.out,
        base_model_name_or_path="tiny-random-llama",
        training={"note": "untrained quick-start heads"},
    )
    print(f"[3/4] saved adapter to {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")

    loaded, adapter_config = apb.load_heads(model, folder)
    capture = apb.ProjectionCapture(model)
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len))
    with torch.no_grad(), capture.capturing():
        model(ids)
        scores = [loaded(i, *capture.pop(i)) for i in range(len(loaded.layers))]
    capture.remove()
    same = all(
        torch.equal(a, b)
        for a, b in zip(heads.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    print(
        f"[4/4] reloaded ({adapter_config.model_type}, weights identical: {same}); scores per layer "
        f"[batch, seq, num_kv_heads] = {list(scores[0].shape)} x {len(scores)} layers "
        f"({time.perf_counter() - start:.1f} s)"
    )
    if not same:
        raise SystemExit("reloaded heads differ from the saved ones")


if __name__ == "__main__":
    main()
