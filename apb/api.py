"""`apb.load`: an unmodified transformers model plus a retaining-heads adapter -> an `APBModel`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from apb.adapter import load_heads
from apb.model import APBModel


def load(
    model: nn.Module,
    adapter: str | Path | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
) -> APBModel:
    """Attach retaining heads to `model` and return it ready for APB inference: the `from_pretrained`
    matching `APBModel.save_pretrained` / `push_to_hub` (`APBModel.from_pretrained` is this function).

    `adapter` is a local adapter folder, a Hub repo id (resolved with `huggingface_hub.snapshot_download`,
    honouring `HF_HUB_OFFLINE`, `revision` and `token`), or a legacy Locret/APB `.bin` file. Loading is
    strict: any mismatch with the model is one `ValueError` listing expected vs found.
    `adapter=None` gives an `APBModel` without heads: its passing blocks are chosen by the training-free
    ``query_attention`` selector (and the exact and Star Attention modes work as with heads).
    """
    if adapter is None:
        return APBModel(model)
    heads, adapter_config = load_heads(
        model, adapter, revision=revision, token=token, dtype=dtype, cache_dir=cache_dir
    )
    return APBModel(model, heads, adapter_config)
