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
from conftest import script_module

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
        ("data.query_in_anchor", "yes", "data.query_in_anchor: expected true/false"),
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


def test_hub_id_round_trips_and_names_the_base():
    config = config_from_dict(_with("model.hub_id", "HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert config.model.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config.model.base_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False)))
    assert again == config
    local = copy.deepcopy(TINY)
    local["model"] = {"name_or_path": "/root/.cache/x/smollm2-hf", "dtype": "float32"}
    default = config_from_dict(local)
    assert default.model.hub_id is None and default.model.base_name == "/root/.cache/x/smollm2-hf"
    assert config_from_dict(TINY).model.base_name == ""  # from_config: no name to record


@pytest.mark.parametrize("hub_id", ["/root/.cache/smollm2-hf", "./local", "a/b/c", "has space"])
def test_hub_id_must_be_a_repo_id(hub_id):
    with pytest.raises(ValueError, match="model.hub_id: must be a Hub repo id"):
        config_from_dict(_with("model.hub_id", hub_id))


def test_set_addresses_list_elements(tmp_path):
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        {
            "data.sources[0].num_samples": 2000,
            "data.sources[0].tasks[1]": "qa_haystack",
            "optim.betas[1]": 0.99,  # not in tiny.yaml: the default (0.9, 0.95) is indexed
            "model.from_config.num_hidden_layers": 3,
        },
    )
    source = config.data.sources[0]
    assert source["num_samples"] == 2000 and source["context_length"] == 400
    assert source["tasks"][:2] == ["single_needle", "qa_haystack"] and len(source["tasks"]) == 5
    assert config.optim.betas == (0.9, 0.99) and config.model.from_config["num_hidden_layers"] == 3
    assert config.data.resolved_sources()[0].num_samples == 2000


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "data.sources[1].num_samples",
            r"data.sources\[1\]: index out of range \(data.sources has 1 element",
        ),
        ("optim.betas[2]", r"optim.betas\[2\]: index out of range \(optim.betas has 2 element"),
        ("data.max_length[0]", r"data.max_length\[0\]: data.max_length is not a list \(type int\)"),
        ("data.sources[0].num_samples[0]", r"data.sources\[0\].num_samples\[0\]: .* is not a list"),
        ("data.sourcess[0].num_samples", "unknown config key data.sourcess; known keys here: sources,"),
        ("optim.lr.warm", "unknown config key optim.lr.warm: optim.lr is not a section"),
        ("data.sources[0].num_sampless", r"data.sources\[0\]: .*unknown key"),
        ("data.sources.0.context_length", r"bad config key 'data.sources.0.context_length' \(write a list"),
        ("data.sources[-1].num_samples", "bad config key"),
    ],
)
def test_set_with_a_bad_key_is_refused_with_key_named(key, message):
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs" / "tiny.yaml", {key: 5})


def test_retain_cli_set_with_an_index(capsys):
    with script_module(ROOT / "train" / "retain.py") as retain:
        config = str(ROOT / "configs" / "tiny.yaml")
        assert retain.main(["--config", config, "--dry-run", "--set", "data.sources[0].num_samples=7"]) == 0
        resolved = yaml.safe_load(capsys.readouterr().out.split("# deepspeed config:")[0])
        assert resolved["data"]["sources"][0]["num_samples"] == 7
        assert retain.main(["--config", config, "--dry-run", "--set", "data.sources[3].seed=1"]) == 2
        assert r"data.sources[3]: index out of range" in capsys.readouterr().err


def test_retain_names_the_missing_train_extra(capsys, monkeypatch, tmp_path):
    """Without deepspeed/datasets (a core-only install) training stops at once with the pip command."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    config = str(ROOT / "configs" / "tiny.yaml")
    with script_module(ROOT / "train" / "retain.py") as retain:
        args = ["--config", config, "--set", f"output_dir={tmp_path / 'run'}"]
        assert retain.main(args) == 2
        assert "training needs deepspeed: pip install 'apb-retain[train]'" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()  # nothing written
        assert retain.main([*args, "--dry-run"]) == 0  # checking a config needs no extra
