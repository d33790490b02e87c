"""Pushing an adapter to the Hugging Face Hub (pulling is `apb.adapter.resolve_adapter`)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apb.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    _heads_of,
    _is_main_process,
    write_adapter,
)

logger = logging.getLogger(__name__)


def push_to_hub(
    folder_or_model: str | os.PathLike | Any,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    base_model_name_or_path: str | None = None,
    apb_defaults: Any = None,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Any:
    """Upload an adapter to the Hub repo `repo_id` (created if needed) and return the commit info.

    `folder_or_model` is an adapter folder written by `save_adapter`, or `RetainingHeads` / an object
    holding them as `.heads`, which is first saved to a temporary folder (the keyword arguments after
    `commit_message` go into that adapter's config and card). `revision` names a branch, created if
    needed. Only the main process pushes; the others return None without waiting.
    """
    if not _is_main_process():
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    message = commit_message or "Upload retaining heads (apb-retain adapter)"
    with tempfile.TemporaryDirectory(prefix="apb-adapter-") as tmp:
        if isinstance(folder_or_model, (str, os.PathLike)):
            folder = Path(folder_or_model)
            missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder} is not an adapter folder: missing {', '.join(missing)}")
        else:
            heads = _heads_of(folder_or_model)
            config = AdapterConfig.from_heads(
                heads,
                base_model_name_or_path=base_model_name_or_path,
                apb_defaults=apb_defaults,
                training=training,
            )
            folder = write_adapter(heads, tmp, config, metrics)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=message,
        )
    logger.info(
        "pushed %s to %s",
        folder_or_model if isinstance(folder_or_model, (str, os.PathLike)) else "heads",
        repo_url,
    )
    return commit
