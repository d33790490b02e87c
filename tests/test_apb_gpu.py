"""GPU checks: the flex_attention backend against the plain reference, and the oracle on CUDA.

Skipped without CUDA (never touching CUDA at import). Tolerances follow FlashAttention's rule: the
backend's error against an fp32 reference is at most twice the error of the reference run in the
backend's own precision, plus a small floor for fp32 (flex's fp32 path may use TF32-free but
differently ordered sums: 1e-5).
"""

from __future__ import annotations

import pytest
import torch
from apb.kernels.reference import apb_attention_ref
from conftest import FAMILIES, tiny_model

from apb import APBConfig, APBModel, build_heads
from apb.backends import get_backend

pytestmark = [
    pytest.mark.single_gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = [(0, 0, 300), (512, 128, 1000), (77, 33, 129), (1000, 0, 257)]  # (passing, anchor, local)


@pytest.mark.parametrize("head_dim", [16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_backend_matches_reference(dtype, head_dim):
    flex = get_backend("flex", "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for num_passing, num_anchor, num_local in SHAPES:
        # q laid out as transformers hands it over: [batch, seq, heads, dim] transposed (not contiguous)
        q = torch.randn(2, num_anchor + num_local, 8, head_dim, device="cuda", generator=g).transpose(1, 2)
        k = torch.randn(2, 2, num_passing + num_anchor + num_local, head_dim, device="cuda", generator=g)
        v = torch.randn_like(k)
        kwargs = dict(num_passing=num_passing, num_anchor=num_anchor, softmax_scale=0.125)
        ref_out, ref_lse = apb_attention_ref(q, k, v, **kwargs)
        low_out, _ = apb_attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), **kwargs)
        out, lse = flex(q.to(dtype), k.to(dtype), v.to(dtype), **kwargs)
        floor = 1e-5 if dtype == torch.float32 else 1e-3
        out_err = (out.float() - ref_out).abs().max().item()
        low_err = (low_out.float() - ref_out).abs().max().item()
        assert out_err <= 2 * low_err + floor, (num_passing, num_anchor, num_local, out_err, low_err)
        assert (lse - ref_lse).abs().max().item() < (1e-4 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("backend", ["flex", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_mode_oracle_on_cuda(family, backend):
    model = tiny_model(family).cuda()
    g = torch.Generator().manual_seed(1)
    context = torch.randint(0, 128, (1, 901), generator=g).cuda()  # >= 128 tokens per host: flex runs
    query = torch.randint(0, 128, (1, 7), generator=g).cuda()
    with torch.no_grad():
        expected = model(torch.cat([context, query], dim=1)).logits[:, -7:]
    apbm = APBModel(model)
    for num_hosts in (2, 3, 4):
        logits = apbm.prefill(context, query, config=APBConfig.exact(backend=backend), num_hosts=num_hosts)
        err = (logits - expected).abs().max().item()
        print(f"{family} {backend} H={num_hosts}: max err {err:.2e}")
        assert err < 1e-4, f"{family} {backend} H={num_hosts}: {err:.2e}"


def test_sparse_flex_equals_reference_bf16():
    model = tiny_model("qwen3").cuda().to(torch.bfloat16)
    torch.manual_seed(0)
    apbm = APBModel(model, build_heads(model, hidden_size=32, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(2)
    context = torch.randint(0, 128, (1, 517), generator=g).cuda()
    query = torch.randint(0, 128, (1, 5), generator=g).cuda()
    cfg = dict(anchor_len=64, passing_len=20, query_in_anchor=True)
    ref = apbm.prefill(context, query, config=APBConfig(**cfg, backend="reference"), num_hosts=4).float()
    flex = apbm.prefill(context, query, config=APBConfig(**cfg, backend="flex"), num_hosts=4).float()
    # bf16 activations: both backends round differently; logits of a random tiny model are O(1)
    assert (flex - ref).abs().max().item() < 5e-2


def test_calibration_fits_host_times_on_the_gpu():
    """`APBModel.calibrate` on a GPU, at a size where the hosts' work dominates their fixed costs (Llama-3.1-8B
    layers, four of them, 64K): the fitted two-rate model matches every timed host closely, and the balanced
    split under it evens the predicted costs. (A 4-layer model of hidden 1024 at 32K took ~7 ms a host, mostly
    launches, and the fit refused it.)"""
    shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    model = tiny_model("llama", num_hidden_layers=4, max_position_embeddings=70000, **shape)
    model = model.to("cuda", torch.bfloat16)
    apbm = APBModel(model, build_heads(model, hidden_size=256, dtype=torch.bfloat16))
    config = APBConfig.for_length(65536, 4, backend="triton")
    calibration = apbm.calibrate(65536, 4, config=config)
    assert len(calibration.samples) == 8
    assert 0.05 < calibration.cost.attention_weight < 20, calibration.to_dict()
    assert calibration.max_error < 0.1, calibration.to_dict()
    assert apbm.cost_model is calibration.cost
    costs = apbm.plan(65536, 64, 4, config).predicted_costs(apbm.cost_model)
    assert max(costs) / min(costs) < 1.02


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_inductor_compiled_layers_on_the_gpu(family):
    """`compile_layers` with inductor on CUDA: the attention modules compiled around APB's attention (RoPE
    and Qwen3's q/k norms inside the graphs, the heads' q/k/v hooks outside). Exact APB gives the uncompiled model's
    logits within bf16 rounding; sparse APB with heads runs, decodes, and new lengths add no graphs."""
    import copy

    import torch._dynamo

    from apb import compile_layers

    torch._dynamo.reset()
    model = tiny_model(family, max_position_embeddings=8192).to("cuda", torch.bfloat16)
    torch.manual_seed(0)
    heads = build_heads(model, hidden_size=16, dtype=torch.bfloat16)
    plain = APBModel(copy.deepcopy(model), copy.deepcopy(heads))
    compile_layers(model)
    apbm = APBModel(model, heads)
    g = torch.Generator().manual_seed(2)
    sparse = APBConfig(anchor_len=64, passing_len=32, query_in_anchor=True, query_offset=4, backend="triton")
    for num_context in (1000, 1537, 1200):
        context = torch.randint(0, 128, (1, num_context), generator=g).cuda()
        query = torch.randint(0, 128, (1, 7), generator=g).cuda()
        exact = APBConfig.exact(backend="triton")
        expected = plain.prefill(context, query, config=exact, num_hosts=4).float()
        logits = apbm.prefill(context, query, config=exact, num_hosts=4).float()
        # the compiled graphs round bf16 differently (fused RoPE, norms); logits of a random tiny model are O(1)
        assert (logits - expected).abs().max().item() < 5e-2
        assert torch.isfinite(apbm.prefill(context, query, config=sparse, num_hosts=4)).all()
        if num_context == 1000:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # new lengths: no new graphs
    out = apbm.generate(context, query, config=sparse, num_hosts=4, max_new_tokens=4)
    assert out.shape == (1, 4)
    torch._dynamo.reset()
