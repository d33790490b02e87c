"""Benchmarks on the public API: prefill (full attention vs Star Attention vs APB), decoding attention and
generation.

- `apb.bench.prefill` (``python -m apb.bench.prefill``, ``scripts/bench_prefill.py``): hosts simulated
  one after another on one GPU, communication modelled, per-block time breakdown.
- `apb.bench.dist` (``torchrun --nproc-per-node N -m apb.bench.dist``, ``scripts/bench_prefill_dist.py``):
  one host per torch.distributed rank, communication measured.
- `apb.bench.decode` (``python -m apb.bench.decode``, ``scripts/bench_decode.py``): `decode_attention` over
  one host's keys against the kernels it could run instead.
- `apb.bench.generate` (``python -m apb.bench.generate``, ``scripts/bench_generate.py``): generation on one
  GPU, the time to the first token and per token: APB's steps eager and replayed from a CUDA graph,
  against transformers' own loop.
- `apb.bench.common`: what the prefill benchmarks share: the model shapes, timers, full attention on its
  fastest SDPA kernel, the helpers that look runs up and format them.

Inside APB's prefill they see through the documented hook `APBModel.recording(clock=..., regions=True)`
(per-host seconds, passing exchanges, the attention step's regions) and through PyTorch module hooks;
nothing of `apb` is patched.
"""

from apb.bench.common import FULL_KERNELS, MODEL_SHAPES, Clock, DecoderRecorder, comm_ms

__all__ = ["FULL_KERNELS", "MODEL_SHAPES", "Clock", "DecoderRecorder", "comm_ms"]
