"""Shared fixtures: tiny random-weight models of every supported family, built from configs."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=4096,
)


def tiny_config(family: str, **overrides):
    """A 2-layer, 4-query/2-KV-head config of `family`; fp32, eager-safe, no sliding window."""
    kwargs = {**_COMMON, **overrides}
    if family == "llama":
        return LlamaConfig(**kwargs)
    if family == "qwen2":
        return Qwen2Config(**kwargs, use_sliding_window=False)
    if family == "qwen3":
        return Qwen3Config(**kwargs, head_dim=16, use_sliding_window=False)
    if family == "mistral":
        return MistralConfig(**kwargs, sliding_window=None)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@contextmanager
def script_module(path: str | Path) -> Iterator[ModuleType]:
    """A script file (scripts/x.py, train/retain.py) imported as a module for a test.

    It is registered in sys.modules under ``<stem>_script`` (dataclasses look their module up by name),
    with its folder first on sys.path (scripts import their neighbours); both are undone on exit.
    """
    path = Path(path)
    folder = str(path.parent)
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(folder)
