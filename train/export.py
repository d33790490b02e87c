"""Adapter export: from the live heads at the end of training, or from any checkpoint's heads file."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from apb.train.config import RunConfig
from safetensors.torch import save_file

from apb.adapter import read_weights, save_adapter
from apb.config import APBConfig
from apb.heads import ModelShape, RetainingHeads

logger = logging.getLogger(__name__)

HEADS_NAME = "heads.safetensors"
"""The full (gathered) heads state dict inside each checkpoint folder: what export reads."""


TRAINED_LAYOUT = ("anchor_len", "query_in_anchor", "query_offset")
"""The `apb.APBConfig` fields training fixes (the layout of `apb.data.layout`): what an adapter's `apb`
section records. Run-time choices (split, backend, passing length, anchor sharing) are not recorded, so
`apb.load` gives them the library's defaults of the day."""


def apb_defaults(config: RunConfig) -> dict[str, Any]:
    """The layout the heads were trained for (`TRAINED_LAYOUT`), as a dict."""
    d = config.data
    trained = APBConfig(
        anchor_len=d.anchor_len,
        query_in_anchor=d.query_in_anchor and d.anchor_len > 0,
        query_offset=d.query_offset,
    )
    return {k: v for k, v in trained.to_dict().items() if k in TRAINED_LAYOUT}


def gathered(heads: torch.nn.Module, zero3: bool):
    """Context in which `heads`' parameters are whole on every rank (a no-op below ZeRO-3)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(heads.parameters()), modifier_rank=None)


def heads_state(heads: RetainingHeads, zero3: bool) -> dict[str, torch.Tensor]:
    """The whole heads state dict on the CPU (collective under ZeRO-3)."""
    with gathered(heads, zero3):
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in heads.state_dict().items()}


def save_heads_file(state: dict[str, torch.Tensor], folder: str | Path) -> Path:
    path = Path(folder) / HEADS_NAME
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def export_heads(
    heads: RetainingHeads,
    config: RunConfig,
    *,
    steps: int,
    tokens_seen: int,
    final_loss: float | None,
    zero3: bool = False,
    folder: str | Path | None = None,
    config_changes: list[dict[str, Any]] | None = None,
) -> Path:
    """Write the adapter (config, weights, model card) and push it when `export.push_to_hub` is set.

    `config_changes`: the settings a rerun changed and from which step (recorded in `training`).
    Collective under torch.distributed: rank 0 writes, every rank returns the folder.
    """
    folder = Path(folder) if folder is not None else config.adapter_folder
    base = config.model.base_name  # model.hub_id, else name_or_path; "" for a from_config model
    training = {
        "config": config.to_dict(),
        "steps": steps,
        "tokens_seen": tokens_seen,
        "final_loss": final_loss,
    }
    if config_changes:
        training["config_changes"] = config_changes
    metrics = {"steps": steps, "tokens seen": tokens_seen, "final loss": final_loss}
    with gathered(heads, zero3):
        save_adapter(
            heads,
            folder,
            base_model_name_or_path=base,
            apb_defaults=apb_defaults(config),
            training=training,
            metrics=metrics,
        )
        if config.export.push_to_hub:
            from apb.hub import push_to_hub

            push_to_hub(folder, config.export.push_to_hub, private=config.export.private)
            logger.info("pushed adapter to the Hub: %s", config.export.push_to_hub)
    return folder


def shape_from_config(config: RunConfig) -> ModelShape:
    """The base's ModelShape without loading weights (a meta-device model from its config)."""
    from apb.train.trainer import _model_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_model_config(config))
    return ModelShape.from_model(model)


def heads_from_checkpoint(config: RunConfig, checkpoint: str | Path) -> RetainingHeads:
    """Rebuild the heads saved in a checkpoint folder (its heads.safetensors)."""
    path = Path(checkpoint) / HEADS_NAME
    if not path.is_file():
        raise ValueError(f"{checkpoint}: no {HEADS_NAME}; is it a checkpoint folder of apb.train?")
    state = read_weights(path)
    heads = RetainingHeads(
        shape_from_config(config), hidden_size=config.heads.hidden_size, act=config.heads.act
    )
    heads.to(next(iter(state.values())).dtype)
    heads.load_state_dict(state, strict=True)
    return heads
