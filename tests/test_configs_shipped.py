"""Every shipped training config loads (unknown keys and bad values are errors), and the random-weight
benchmark configs have the parameter count of the model they stand in for (built on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from apb.train.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads(path):
    config = load_config(path)
    assert config.output_dir and config.data.sources


@pytest.mark.parametrize(
    ("name", "billions"),
    [("llama8b_random", 8.03), ("qwen14b_random", 14.77), ("yi34b_random", 34.39)],
)
def test_random_configs_have_the_real_models_size(name, billions):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(yaml.safe_load((CONFIGS[0].parent / f"{name}.yaml").read_text())["model"]["from_config"])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters()) / 1e9
    assert count == pytest.approx(billions, rel=0.005)
