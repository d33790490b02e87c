"""The exported adapter names its base by `model.hub_id` when set (a local copy of a Hub model)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml
from apb.train.checkpoint import STATE_NAME, checkpoint_root
from apb.train.config import config_from_dict, save_resolved
from apb.train.export import export_heads, save_heads_file, shape_from_config
from conftest import script_module, tiny_model

import apb
from apb.heads import RetainingHeads, build_heads

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _local_config(folder: Path, hub_id: str | None):
    data = copy.deepcopy(TINY)
    data["model"] = {"name_or_path": str(folder), "dtype": "float32"}
    if hub_id is not None:
        data["model"]["hub_id"] = hub_id
    return config_from_dict(data)


def _export(tmp_path: Path, hub_id: str | None) -> tuple[Path, torch.nn.Module]:
    model = tiny_model("llama")
    local = tmp_path / "smollm2-135m-instruct-hf"
    model.config._name_or_path = str(local)  # as if loaded from a converted local folder
    config = _local_config(local, hub_id)
    out = tmp_path / ("hub" if hub_id else "default")
    export_heads(
        build_heads(model, hidden_size=16), config, steps=3, tokens_seen=99, final_loss=0.5, folder=out
    )
    return out, model


def test_export_records_hub_id_and_loads_into_the_local_model(tmp_path):
    out, model = _export(tmp_path, HUB_ID)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == HUB_ID
    assert f'from_pretrained("{HUB_ID}"' in card
    heads, adapter_config = apb.load_heads(model, out)  # a model named by its folder takes it
    assert adapter_config.base_model_name_or_path == HUB_ID and isinstance(heads, RetainingHeads)


def test_export_without_hub_id_records_name_or_path(tmp_path):
    out, _ = _export(tmp_path, None)
    local = str(tmp_path / "smollm2-135m-instruct-hf")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == local
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert "base_model" not in front  # the Hub takes only repo ids there


def test_export_script_hub_id_override(tmp_path):
    run = tmp_path / "run"
    config = config_from_dict({**copy.deepcopy(TINY), "output_dir": str(run)})
    save_resolved(config, run)
    step = checkpoint_root(run) / "step_00000004"
    step.mkdir(parents=True)
    heads = RetainingHeads(shape_from_config(config), hidden_size=config.heads.hidden_size)
    save_heads_file(heads.state_dict(), step)
    (step / STATE_NAME).write_text(json.dumps({"step": 4, "tokens_seen": 10, "last_loss": 0.25}))
    with script_module(ROOT / "scripts" / "export_adapter.py") as script:
        assert script.main([str(run), "--out", str(tmp_path / "plain")]) == 0
        plain = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
        assert plain["base_model_name_or_path"] == ""  # from_config run, no hub id: nothing to name
        assert script.main([str(run), "--out", str(tmp_path / "named"), "--hub-id", "user/tiny-base"]) == 0
        named = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
        assert named["base_model_name_or_path"] == "user/tiny-base"
        assert named["training"]["steps"] == 4
        assert script.main([str(run), "--out", str(tmp_path / "bad"), "--hub-id", "/not/a/repo/id"]) == 2
        assert not (tmp_path / "bad").exists()


def test_export_records_the_trained_layout_only(tmp_path):
    """The adapter's `apb` section holds what training fixed; the split and the other run-time choices
    stay the library's (an adapter exported while the equal split was the default would pin it)."""
    from apb.train.export import TRAINED_LAYOUT

    out, model = _export(tmp_path, None)
    section = json.loads((out / "adapter_config.json").read_text())["apb"]
    assert set(section) == set(TRAINED_LAYOUT)
    assert section["anchor_len"] == TINY["data"]["anchor_len"]
    apbm = apb.load(model, out)
    assert apbm.default_config(4096, 4).split == "balanced"
