"""Retaining heads on unmodified transformers models: attachment, output shape, refusals, no side effects."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

from apb.heads import ModelShape, ProjectionCapture, RetainingHeads, build_heads

BATCH, SEQ = 2, 7


def _ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def test_heads_attach_and_score_every_family(family):
    model = tiny_model(family)
    config = tiny_config(family)
    heads = build_heads(model, hidden_size=32)
    capture = ProjectionCapture(model)
    assert heads.shape.model_type == family
    assert len(heads.layers) == config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    with torch.no_grad(), capture.capturing():
        model(_ids())
        for layer_idx in range(config.num_hidden_layers):
            q, k, v = capture.pop(layer_idx)
            assert q.shape == (BATCH, SEQ, config.num_attention_heads * head_dim)
            assert k.shape == v.shape == (BATCH, SEQ, config.num_key_value_heads * head_dim)
            scores = heads(layer_idx, q, k, v)
            assert scores.shape == (BATCH, SEQ, config.num_key_value_heads)
            assert torch.isfinite(scores).all()
    capture.remove()


def test_qwen3_heads_read_normalised_pre_rope_q_and_k():
    model = tiny_model("qwen3")
    attn = model.model.layers[0].self_attn
    seen = {}

    def record(_module, _inputs, output):
        seen["q"] = output.flatten(2)  # returns None: the output is left alone

    handle = attn.q_norm.register_forward_hook(record)
    capture = ProjectionCapture(model)
    with torch.no_grad(), capture.capturing():
        model(_ids())
        q, _, _ = capture.pop(0)
    handle.remove()
    assert torch.equal(q, seen["q"])


@pytest.mark.parametrize(
    ("config", "model_type"),
    [
        (GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64), "gpt2"),
        (
            OPTConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                ffn_dim=64,
                vocab_size=64,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            ),
            "opt",
        ),
    ],
)
def test_unsupported_model_type_is_refused_by_name(config, model_type):
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=f"model_type '{model_type}' is not supported") as err:
        build_heads(model)
    assert "llama" in str(err.value)  # the message lists what is supported


def test_supported_type_with_wrong_attention_shape_names_what_is_missing():
    # An OPT model dressed up as "llama": its attention has out_proj, not o_proj.
    model = AutoModelForCausalLM.from_config(
        OPTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=64,
            vocab_size=64,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
    )
    model.config.model_type = "llama"
    with pytest.raises(ValueError, match=r"model_type 'llama'.*self_attn\.o_proj"):
        ModelShape.from_model(model)


def test_head_settings_are_validated():
    shape = ModelShape.from_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        RetainingHeads(shape, hidden_size=0)
    with pytest.raises(ValueError, match="unknown head activation 'nope'"):
        RetainingHeads(shape, act="nope")
    heads = RetainingHeads(shape, hidden_size=16, act="gelu")
    assert heads.act_name == "gelu" and heads.layers[0].fc1.weight.shape == (16, shape.input_size)


def test_base_logits_bit_identical_with_heads_and_capture(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
        heads = build_heads(model, hidden_size=32)
        capture = ProjectionCapture(model)
        attached_idle = model(ids).logits
        with capture.capturing():
            attached_capturing = model(ids).logits
            for layer_idx in range(len(heads.layers)):
                heads(layer_idx, *capture.pop(layer_idx))
        capture.remove()
        removed = model(ids).logits
    assert torch.equal(reference, attached_idle)
    assert torch.equal(reference, attached_capturing)
    assert torch.equal(reference, removed)
