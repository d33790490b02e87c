"""Exactness oracle: APB in exact mode (no anchor, pass everything) == the plain model.

Tolerance: fp32 everywhere; APB only regroups the same dot products (per-host blocks, log-sum-exp
merges instead of one softmax), so logits differ by float reassociation, measured ~2e-7 on these
tiny models. atol=1e-5 leaves room for other BLAS builds while still catching any masking or
position error (those move logits by >1e-2).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_model

from apb import APBConfig, APBModel
from apb.config import SPLITS
from apb.plan import CostModel

ATOL = 1e-5
NUM_CONTEXT, NUM_QUERY = 37, 5  # 37 is prime: no host count divides it


def _ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _plain_query_logits(model, context: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.cat([context, query], dim=1)).logits[:, -query.shape[1] :]


# An attention-heavy cost model: on these tiny models the FLOP-based one sees almost no attention work
# in 37 tokens and balances to near-equal blocks; this one makes the balanced split clearly uneven.
ATTENTION_HEAVY = CostModel(flops_per_token=1.0, flops_per_pair=1.0)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_mode_equals_plain_model(family, split):
    model = tiny_model(family)
    context, query = _ids(1, 1, NUM_CONTEXT), _ids(2, 1, NUM_QUERY)
    expected = _plain_query_logits(model, context, query)
    apbm = APBModel(model)
    apbm.cost_model = ATTENTION_HEAVY
    config = APBConfig.exact(split=split)
    for num_hosts in (1, 2, 3, 4):
        logits = apbm.prefill(context, query, config=config, num_hosts=num_hosts)
        assert logits.shape == expected.shape
        err = (logits - expected).abs().max().item()
        assert err < ATOL, f"{family} {split} H={num_hosts}: max |APB - plain| = {err:.2e}"
        sizes = apbm.last_plan.describe()["blocks"]
        if split == "balanced" and num_hosts > 2:  # the test covers uneven blocks
            assert sizes[0] > sizes[-1] + 2, sizes
    # The wrapped model itself is unchanged: "apb" attention delegates to sdpa outside APB calls.
    assert torch.equal(_plain_query_logits(model, context, query), expected)


def test_hosts_stop_at_the_last_layer_once_its_kv_are_stored():
    """Nothing reads the context rows' output of the last layer: every host computes that layer's K/V and
    stops, so its attention, output projection and MLP run for the query and generated tokens only. The
    logits and generated tokens stay the plain model's, and user hooks see the forward end cleanly."""
    model = tiny_model("llama", num_hidden_layers=3)
    context, query = _ids(21, 1, NUM_CONTEXT), _ids(22, 1, NUM_QUERY)
    expected = _plain_query_logits(model, context, query)
    mlp_calls = {layer: 0 for layer in range(3)}
    for layer_idx, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda *_, i=layer_idx: mlp_calls.__setitem__(i, mlp_calls[i] + 1))
    norm_calls = []
    model.model.norm.register_forward_hook(lambda *_: norm_calls.append(1))
    apbm = APBModel(model)
    logits = apbm.prefill(context, query, config=APBConfig.exact(), num_hosts=3)
    assert (logits - expected).abs().max().item() < ATOL
    # layers 0 and 1: three hosts and the query pass; layer 2 and the final norm: the query pass only
    assert mlp_calls == {0: 4, 1: 4, 2: 1} and len(norm_calls) == 1
    # the last layer's stored K/V are whole: decoding on top of them is the plain model's greedy decoding
    new_ids = apbm.generate(context, query, config=APBConfig.exact(), num_hosts=3, max_new_tokens=4)
    with torch.no_grad():
        plain = model.generate(
            torch.cat([context, query], dim=1),
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=[],
            pad_token_id=0,
        )
    assert torch.equal(new_ids, plain[:, context.shape[1] + query.shape[1] :])


def test_exact_mode_batch_of_two_matches_rows():
    model = tiny_model("qwen2")
    context, query = _ids(3, 2, 23), _ids(4, 2, 3)
    apbm = APBModel(model)
    apbm.cost_model = ATTENTION_HEAVY
    logits = apbm.prefill(context, query, config=APBConfig.exact(), num_hosts=3)
    expected = _plain_query_logits(model, context, query)
    assert (logits - expected).abs().max().item() < ATOL


def test_exact_mode_passing_through_heads_equals_plain_model():
    """passing_len >= every block: the heads' top-k + gather path must still select everything."""
    from apb import build_heads

    model = tiny_model("llama")
    torch.manual_seed(0)
    apbm = APBModel(model, build_heads(model, hidden_size=16))
    apbm.cost_model = ATTENTION_HEAVY
    context, query = _ids(5, 1, NUM_CONTEXT), _ids(6, 1, NUM_QUERY)
    logits = apbm.prefill(context, query, config=APBConfig(anchor_len=0, passing_len=1000), num_hosts=4)
    assert (logits - _plain_query_logits(model, context, query)).abs().max().item() < ATOL


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generate_matches_model_generate(family):
    model = tiny_model(family)
    context, query = _ids(7, 1, NUM_CONTEXT), _ids(8, 1, NUM_QUERY)
    prompt = torch.cat([context, query], dim=1)
    # explicit all-ones mask: otherwise generate masks every prompt token equal to pad_token_id
    gen_kwargs = dict(
        max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt)
    )
    expected = model.generate(prompt, **gen_kwargs)[:, prompt.shape[1] :]
    apbm = APBModel(model)
    apbm.cost_model = ATTENTION_HEAVY
    for num_hosts in (2, 3):
        ids, logits = apbm.generate(
            context,
            query,
            config=APBConfig.exact(),
            num_hosts=num_hosts,
            max_new_tokens=12,
            return_logits=True,
        )
        assert torch.equal(ids, expected), f"{family} H={num_hosts}: {ids.tolist()} != {expected.tolist()}"
        with torch.no_grad():  # step logits == full forward over prompt + generated tokens
            full = model(torch.cat([prompt, ids], dim=1)).logits[:, prompt.shape[1] - 1 : -1]
        assert (logits - full).abs().max().item() < ATOL
    # model.generate still works after APB ran (HF cache path untouched).
    again = model.generate(prompt, **gen_kwargs)[:, prompt.shape[1] :]
    assert torch.equal(again, expected)


def test_star_with_two_hosts_is_exact():
    """Star with H=2: host 1's anchor is host 0's whole block, so host 1 sees the full prefix."""
    model = tiny_model("mistral")
    context, query = _ids(9, 1, 36), _ids(10, 1, 4)
    apbm = APBModel(model)
    logits = apbm.prefill(context, query, config=APBConfig.star(36, 2), num_hosts=2)
    assert (logits - _plain_query_logits(model, context, query)).abs().max().item() < ATOL


def test_eager_model_keeps_eager_outside_apb():
    """A model loaded with attn_implementation="eager" delegates to eager (mask included) when idle."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval()
    context, query = _ids(11, 1, 20), _ids(12, 1, 3)
    expected = _plain_query_logits(model, context, query)
    apbm = APBModel(model)
    assert model.config._attn_implementation == "apb"
    assert torch.equal(_plain_query_logits(model, context, query), expected)
    logits = apbm.prefill(context, query, config=APBConfig.exact(), num_hosts=3)
    assert (logits - expected).abs().max().item() < ATOL
