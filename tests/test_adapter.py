"""The adapter format: save -> load round trip, file contents, legacy .bin, and every strict-load refusal."""

from __future__ import annotations

import json
import logging
import types

import pytest
import torch
import yaml
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import apb
from apb.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, load_heads, save_adapter
from apb.heads import ProjectionCapture, build_heads

HIDDEN = 32


def _scores(model, heads) -> list[torch.Tensor]:
    """Every layer's scores on a fixed input: [batch, seq, num_kv_heads] each."""
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    capture = ProjectionCapture(model)
    try:
        with torch.no_grad(), capture.capturing():
            model(ids)
            return [heads(i, *capture.pop(i)) for i in range(len(heads.layers))]
    finally:
        capture.remove()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def saved(llama, tmp_path):
    torch.manual_seed(7)
    heads = build_heads(llama, hidden_size=HIDDEN)
    folder = save_adapter(
        heads,
        tmp_path / "adapter",
        base_model_name_or_path="meta-llama/Llama-3.1-8B-Instruct",
        apb_defaults={"anchor_len": 1024, "passing_len": 512, "pool_kernel": 5, "query_in_anchor": True},
        training={"lr": 5e-4, "steps": 3},
        metrics={"val_loss": 0.123456},
    )
    return heads, folder


def test_round_trip_gives_identical_scores(family, tmp_path):
    model = tiny_model(family)
    heads = build_heads(model, hidden_size=HIDDEN)
    folder = save_adapter(heads, tmp_path / family)
    loaded, config = load_heads(model, folder)
    assert config.model_type == family and config.head_hidden_size == HIDDEN
    for before, after in zip(_scores(model, heads), _scores(model, loaded), strict=True):
        assert torch.equal(before, after)


def test_save_accepts_object_holding_heads_and_load_casts_dtype(llama, saved, tmp_path):
    heads, _ = saved
    wrapper = types.SimpleNamespace(heads=heads, model=llama)  # stands for the APB model
    folder = save_adapter(wrapper, tmp_path / "wrapped")
    loaded, _ = load_heads(llama, folder, dtype=torch.bfloat16)
    assert loaded.layers[0].fc1.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.layers[1].fc2.weight, heads.layers[1].fc2.weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="expected RetainingHeads"):
        save_adapter(llama, tmp_path / "nope")


def test_safetensors_holds_only_head_weights_with_pt_metadata(saved):
    heads, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    with safe_open(folder / WEIGHTS_NAME, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(heads.state_dict())
        assert sorted(f.keys()) == [
            "layers.0.fc1.weight",
            "layers.0.fc2.weight",
            "layers.1.fc1.weight",
            "layers.1.fc2.weight",
        ]


def test_non_contiguous_weights_are_saved(llama, tmp_path):
    heads = build_heads(llama, hidden_size=HIDDEN)
    weight = heads.layers[0].fc1.weight
    heads.layers[0].fc1.weight = torch.nn.Parameter(weight.detach().t().contiguous().t())
    assert not heads.layers[0].fc1.weight.is_contiguous()
    folder = save_adapter(heads, tmp_path / "adapter")
    assert torch.equal(load_file(folder / WEIGHTS_NAME)["layers.0.fc1.weight"], weight)


def test_adapter_config_json_sorted_and_complete(saved):
    _, folder = saved
    text = (folder / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert text == json.dumps(data, sort_keys=True, indent=2) + "\n"
    assert data["format_version"] == 1
    assert data["library_version"] == apb.__version__
    assert data["base_model_name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert {k: data[k] for k in ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim")} == {
        "model_type": "llama",
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
    }
    assert data["head_hidden_size"] == HIDDEN and data["head_act"] == "silu"
    assert data["apb"]["passing_len"] == 512 and data["training"] == {"lr": 5e-4, "steps": 3}


def test_model_card_front_matter(saved):
    _, folder = saved
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "apb-retain"
    assert front["base_model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert {"apb", "retaining-heads", "long-context", "llama"} <= set(front["tags"])
    assert "apb.load(model," in card
    assert '"passing_len": 512' in card  # APB settings
    assert '"lr": 0.0005' in card  # training config
    assert "| val_loss | 0.1235 |" in card  # metrics


def test_model_card_omits_local_path_as_base_model(llama, tmp_path):
    folder = save_adapter(
        build_heads(llama, hidden_size=HIDDEN), tmp_path / "a", base_model_name_or_path="/models/x/y"
    )
    front = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
    assert "base_model" not in front  # the Hub only accepts repo ids there


def test_config_drops_unknown_keys_with_warning_and_requires_the_rest(saved, caplog):
    _, folder = saved
    data = json.loads((folder / CONFIG_NAME).read_text())
    with caplog.at_level(logging.WARNING, logger="apb.adapter"):
        config = AdapterConfig.from_dict({**data, "from_the_future": 1})
    assert "from_the_future" in caplog.text
    assert config.to_dict() == data
    with pytest.raises(ValueError, match=r"missing required keys \['head_dim', 'head_act'\]"):
        AdapterConfig.from_dict({k: v for k, v in data.items() if k not in ("head_dim", "head_act")})
    with pytest.raises(ValueError, match="format_version 2 is newer"):
        AdapterConfig.from_dict({**data, "format_version": 2})
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int, got 0"):
        AdapterConfig.from_dict({**data, "num_kv_heads": 0})
    with pytest.raises(ValueError, match="training must be JSON-serialisable"):
        AdapterConfig.from_dict({**data, "training": {"out": object()}})
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        AdapterConfig.from_dict({**data, "num_heads": 6, "num_kv_heads": 4})


# ---------------------------------------------------------------------------------- legacy checkpoints


def _legacy_state(heads) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.{i}.self_attn.{name}.weight": getattr(head, name).weight.detach().to(torch.bfloat16)
        for i, head in enumerate(heads.layers)
        for name in ("fc1", "fc2")
    }


def test_legacy_bin_loads_with_inferred_hidden_size_and_model_act(llama, tmp_path):
    heads = build_heads(llama, hidden_size=48)
    path = tmp_path / "retaining_heads.bin"
    torch.save(_legacy_state(heads), path)
    loaded, config = load_heads(llama, path)
    assert config.head_hidden_size == 48 and config.head_act == llama.config.hidden_act
    assert loaded.layers[0].fc1.weight.dtype == torch.bfloat16  # the stored dtype is kept
    for before, after in zip(_scores(llama, heads.to(torch.bfloat16)), _scores(llama, loaded), strict=True):
        assert torch.equal(before, after)


def test_legacy_bin_refuses_missing_layer_and_extra_key(llama, tmp_path):
    state = _legacy_state(build_heads(llama, hidden_size=HIDDEN))
    del state["model.layers.1.self_attn.fc2.weight"]
    state["model.embed_tokens.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.bin"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_heads(llama, path)
    message = str(err.value)
    assert "2 difference(s)" in message
    assert f"missing layers.1.fc2.weight: expected shape [2, {HIDDEN}], found nothing" in message
    assert "unexpected key model.embed_tokens.weight (shape [3, 3])" in message


def test_legacy_bin_for_another_model_size_is_refused(llama, tmp_path):
    # A checkpoint of a model with 4 KV heads instead of 2: fc1 is wider and fc2 has 4 outputs.
    other = tiny_model("llama", num_key_value_heads=4)
    path = tmp_path / "other.bin"
    torch.save(_legacy_state(build_heads(other, hidden_size=HIDDEN)), path)
    with pytest.raises(ValueError) as err:
        load_heads(llama, path)
    message = str(err.value)
    assert f"layers.0.fc1.weight: expected shape [{HIDDEN}, 128], found [{HIDDEN}, 192]" in message
    assert f"layers.1.fc2.weight: expected shape [2, {HIDDEN}], found [4, {HIDDEN}]" in message


# ------------------------------------------------------------------------------- strict-load refusals


def _rewrite_weights(folder, edit):
    state = load_file(folder / WEIGHTS_NAME)
    edit(state)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def test_refuses_wrong_shape(llama, saved):
    _, folder = saved
    _rewrite_weights(folder, lambda s: s.update({"layers.1.fc1.weight": torch.zeros(HIDDEN, 100)}))
    with pytest.raises(
        ValueError,
        match=rf"layers\.1\.fc1\.weight: expected shape \[{HIDDEN}, 128\], found \[{HIDDEN}, 100\]",
    ):
        load_heads(llama, folder)


def test_refuses_missing_layer(llama, saved):
    _, folder = saved
    _rewrite_weights(folder, lambda s: [s.pop(k) for k in ("layers.1.fc1.weight", "layers.1.fc2.weight")])
    with pytest.raises(ValueError) as err:
        load_heads(llama, folder)
    assert f"missing layers.1.fc1.weight: expected shape [{HIDDEN}, 128], found nothing" in str(err.value)
    assert f"missing layers.1.fc2.weight: expected shape [2, {HIDDEN}], found nothing" in str(err.value)


def test_refuses_extra_key(llama, saved):
    _, folder = saved
    _rewrite_weights(folder, lambda s: s.update({"layers.2.fc1.weight": torch.zeros(HIDDEN, 128)}))
    with pytest.raises(ValueError, match=r"unexpected key layers\.2\.fc1\.weight \(shape \[32, 128\]\)"):
        load_heads(llama, folder)


def test_refuses_other_model_type(saved):
    _, folder = saved
    mistral = tiny_model("mistral")  # same shape as the tiny llama, other model type
    with pytest.raises(
        ValueError, match=r"model_type: expected 'mistral' \(the model\), found 'llama' \(the adapter\)"
    ):
        load_heads(mistral, folder)


def test_refuses_other_model_shape_listing_every_difference(saved):
    _, folder = saved
    bigger = tiny_model("llama", num_hidden_layers=3, num_key_value_heads=4)
    with pytest.raises(ValueError) as err:
        load_heads(bigger, folder)
    message = str(err.value)
    assert "num_layers: expected 3 (the model), found 2 (the adapter)" in message
    assert "num_kv_heads: expected 4 (the model), found 2 (the adapter)" in message
    assert f"missing layers.2.fc1.weight: expected shape [{HIDDEN}, 192], found nothing" in message
    assert f"layers.0.fc2.weight: expected shape [4, {HIDDEN}], found [2, {HIDDEN}]" in message


def test_missing_paths_are_clear_errors(llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder, and not a Hub repo id"):
        load_heads(llama, str(tmp_path / "runs" / "nothing"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_heads(llama, "./adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"missing {CONFIG_NAME}, {WEIGHTS_NAME}"):
        load_heads(llama, tmp_path / "empty")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="must be a legacy Locret/APB .bin"):
        load_heads(llama, tmp_path / "weights.safetensors")


def test_apb_defaults_may_be_a_config_dataclass(llama, tmp_path):
    from apb.config import APBConfig

    folder = save_adapter(build_heads(llama, hidden_size=HIDDEN), tmp_path / "a", apb_defaults=APBConfig())
    config = AdapterConfig.from_file(folder)
    assert config.apb["pool_kernel"] == APBConfig().pool_kernel and "anchor_len" in config.apb
