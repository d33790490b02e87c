"""Labels computed inside the forward equal a brute-force [seq, seq] computation; the APB host layout."""

from __future__ import annotations

import pytest
import torch
from apb.data.layout import LayoutParams, build_host_layout
from apb.train.step import base_forward, prepare_base
from conftest import tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from apb.heads import decoder_layers

CONTEXT = list(range(3, 83))  # 80 context tokens
QUESTION = [90, 91, 92, 93, 94]
ANSWER = [100, 101, 102]


def _layout(query_aware: bool, **kw):
    params = LayoutParams(anchor_len=24, query_offset=4, query_in_anchor=query_aware, **kw)
    return build_host_layout(CONTEXT, QUESTION, ANSWER, params)


def _brute_force(model, layout) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Post-RoPE q/k rebuilt from the projections, the full [seq, seq] scores per head, then the max."""
    model.set_attn_implementation("sdpa")
    config = model.config
    num_heads, num_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    store: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        for name, module in (
            ("q", getattr(attn, "q_norm", None) or attn.q_proj),
            ("k", getattr(attn, "k_norm", None) or attn.k_proj),
        ):
            handles.append(
                module.register_forward_hook(lambda m, a, out, key=(i, name): store.__setitem__(key, out))
            )
    ids, pos = layout.input_ids[None], layout.position_ids[None]
    with torch.no_grad():
        # An explicit all-ones mask: without it transformers reads the position jump as packed sequences.
        out = model.model(
            input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)
        ).last_hidden_state
        cos, sin = model.model.rotary_emb(out, pos)
    for h in handles:
        h.remove()
    labels = []
    (b0, b1), (r0, r1) = layout.block, layout.label_rows
    for i in range(config.num_hidden_layers):
        q = store[(i, "q")].reshape(1, -1, num_heads, head_dim).transpose(1, 2)
        k = store[(i, "k")].reshape(1, -1, num_kv, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(num_heads // num_kv, dim=1)
        scores = (q.double() @ k.double().transpose(-1, -2)) / head_dim**0.5  # [1, H, seq, seq]
        per_head = scores[:, :, r0:r1, b0:b1].amax(dim=2)  # [1, H, block]
        labels.append(per_head.unflatten(1, (num_kv, -1)).amax(dim=2).transpose(1, 2).float())
    return labels, out


@pytest.mark.parametrize("query_aware", [True, False], ids=["query_aware", "query_agnostic"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_labels_equal_brute_force(family, query_aware):
    model = tiny_model(family, initializer_range=0.2)
    layout = _layout(query_aware)
    expected, reference_out = _brute_force(model, layout)
    capture = prepare_base(model)
    # chunk_elements=1 forces one label row per chunk: the chunked max must equal the full one.
    for chunk in (1, 1 << 26):
        inputs, labels = base_forward(model, capture, layout, chunk_elements=chunk)
        assert len(labels) == len(expected)
        for got, want in zip(labels, expected, strict=True):
            assert got.shape == (1, layout.block[1] - layout.block[0], model.config.num_key_value_heads)
            # fp32 forward vs fp64 brute force over the same fp32 q/k: rounding only.
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Heads' inputs are the block tokens' projections, no grad attached.
    q, k, v = inputs[0]
    assert q.shape[1] == layout.block[1] - layout.block[0] and not q.requires_grad
    # The label attention leaves the model's output unchanged (plain causal SDPA).
    with torch.no_grad():
        out = model.model(
            input_ids=layout.input_ids[None], position_ids=layout.position_ids[None]
        ).last_hidden_state
    torch.testing.assert_close(out, reference_out, rtol=1e-5, atol=1e-5)


def test_layout_query_aware_positions_and_ranges():
    layout = _layout(True)
    ids, pos = layout.input_ids.tolist(), layout.position_ids.tolist()
    la = 24
    assert ids[:la] == CONTEXT[:4] + QUESTION + CONTEXT[4 : la - len(QUESTION)]
    assert pos[:la] == list(range(la))
    b0, b1 = layout.block
    assert (b0, b1) == (la, la + len(CONTEXT) - la)
    assert ids[b0:b1] == CONTEXT[la:] and pos[b0:b1] == list(range(la, len(CONTEXT)))
    r0, r1 = layout.label_rows
    assert ids[r0:r1] == QUESTION + ANSWER and pos[r0:r1] == list(range(len(CONTEXT), len(CONTEXT) + 8))


def test_layout_query_agnostic_and_budget():
    layout = _layout(False, max_length=60)
    ids = layout.input_ids.tolist()
    assert ids[:24] == CONTEXT[:24]  # no question in the anchor
    assert layout.num_tokens == 60 and layout.block == (24, 24 + 60 - 24 - 8)
    assert layout.position_ids[layout.label_rows[0]].item() == 24 + (60 - 24 - 8)


def test_layout_block_start_keeps_true_positions():
    layout = _layout(True, block_start=50, block_len=10)
    assert layout.input_ids[24:34].tolist() == CONTEXT[50:60]
    assert layout.position_ids[24:34].tolist() == list(range(50, 60))
    assert layout.position_ids[34].item() == 60


def test_layout_too_short_sample_is_refused():
    with pytest.raises(ValueError, match="too short"):
        build_host_layout(
            CONTEXT[:30], QUESTION, ANSWER, LayoutParams(anchor_len=24, query_offset=4, min_block_len=16)
        )
    with pytest.raises(ValueError, match="does not fit in the anchor"):
        build_host_layout(CONTEXT, list(range(30)), ANSWER, LayoutParams(anchor_len=24, query_offset=4))
