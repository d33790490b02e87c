"""Run configs: typed, unknown keys and bad values refused with the key named, shipped configs load."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from apb.train.config import config_from_dict, load_config
from apb.train.trainer import check_sources

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def _with(path: str, value):
    data = copy.deepcopy(TINY)
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("optim.lrr", 1e-3, "unknown config key optim.lrr"),
        ("deepspeed.zero", 2, "unknown config key deepspeed.zero"),
        ("trainer", {}, "unknown config key trainer"),
        ("optim.lr", -1.0, "optim.lr: must be > 0"),
        ("optim.lr", "fast", "optim.lr: expected a number"),
        ("optim.betas", [0.9], "optim.betas: expected a list of 2"),
        ("optim.grad_accum", 1.5, "optim.grad_accum: expected an integer"),
        ("deepspeed.zero_stage", 4, "deepspeed.zero_stage: must be 0-3"),
        ("deepspeed.offload_param", True, "deepspeed.offload_param: needs zero_stage 3"),
        ("model.dtype", "fp8", "model.dtype: must be one of"),
        ("data.query_aware", "yes", "data.query_aware: expected true/false"),
        ("data.max_length", 100, "data.max_length: 100 leaves no room"),
        ("data.sources", [{"pathh": "x.jsonl"}], r"data.sources\[0\]: .*unknown key"),
        ("export.push_to_hub", "no-slash", "export.push_to_hub: must be user/name"),
    ],
)
def test_bad_config_is_refused_with_key_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(_with(key, value))


def test_missing_section_and_missing_data_file():
    data = copy.deepcopy(TINY)
    del data["model"]
    with pytest.raises(ValueError, match="missing config key model"):
        config_from_dict(data)
    config = config_from_dict(_with("data.sources", [{"path": "/nonexistent/train.jsonl"}]))
    with pytest.raises(ValueError, match=r"data.sources\[0\]: data file not found"):
        check_sources(config)


def test_deepspeed_json_comes_from_the_config():
    config = config_from_dict(_with("optim.grad_accum", 4))
    ds = config.deepspeed_config(world_size=2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 8
    assert ds["zero_optimization"]["stage"] == config.deepspeed.zero_stage
    assert ds["gradient_clipping"] == config.optim.grad_clip and ds["bf16"]["enabled"] is False


@pytest.mark.parametrize(
    ("name", "model_id", "stage"),
    [
        ("qwen14b", "Qwen/Qwen2.5-14B-Instruct", 1),
        ("llama8b", "meta-llama/Llama-3.1-8B-Instruct", 1),
        ("yi34b", "01-ai/Yi-34B-200K", 3),
    ],
)
def test_shipped_configs_load(name, model_id, stage):
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config.model.name_or_path == model_id and config.deepspeed.zero_stage == stage
    assert (
        config.optim.lr == 5e-4 and config.optim.betas == (0.9, 0.95) and config.optim.smooth_weight == 0.0025
    )


def test_dry_run_prints_resolved_config_and_loads_nothing():
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train" / "retain.py"),
            "--config",
            str(ROOT / "configs" / "yi34b.yaml"),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout.split("# deepspeed config:")[0])
    assert resolved["deepspeed"]["zero_stage"] == 3 and resolved["heads"]["hidden_size"] == 1024
    bad = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train" / "retain.py"),
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--dry-run",
            "--set",
            "optim.lrr=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "optim.lrr" in bad.stderr


def test_unsupported_model_type_is_refused_before_loading():
    from apb.train.trainer import check_model_supported
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="model_type 'gpt2' has no retaining-head support"):
        check_model_supported(GPT2Config())


def test_zero_stage_that_does_not_fit_is_refused(monkeypatch):
    import torch
    from apb.train import trainer
    from transformers import LlamaConfig

    yi34b = LlamaConfig(
        hidden_size=7168,
        intermediate_size=20480,
        num_hidden_layers=60,
        num_attention_heads=56,
        num_key_value_heads=8,
        vocab_size=64000,
    )  # Yi-34B's shape, counted on the meta device
    props = type("Props", (), {"total_memory": 80 * 2**30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    config = load_config(ROOT / "configs" / "yi34b.yaml")
    gpu = lambda n: trainer.DistInfo(rank=0, world_size=n, local_rank=0, device=torch.device("cuda", 0))  # noqa: E731
    config.deepspeed.zero_stage = 1
    with pytest.raises(
        ValueError,
        match=r"deepspeed.zero_stage: the base's weights need 6\d\.\d GiB.*use deepspeed.zero_stage: 3",
    ):
        trainer.check_zero_stage_fits(config, yi34b, gpu(8))
    config.deepspeed.zero_stage = 3
    trainer.check_zero_stage_fits(config, yi34b, gpu(8))  # 8.0 GiB per GPU: fits
    with pytest.raises(ValueError, match="use more GPUs"):
        trainer.check_zero_stage_fits(config, yi34b, gpu(1))
