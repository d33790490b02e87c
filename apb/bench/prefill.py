"""Prefill speed: full attention vs Star Attention vs APB, hosts simulated one after another on one GPU.

    python -m apb.bench.prefill --out benchmarks/prefill_results.json            # GPU, Llama-3.1-8B shapes
    python -m apb.bench.prefill --model-shape qwen14b --lengths 32768 65536 ...  # Qwen-2.5-14B shapes
    python -m apb.bench.prefill --tiny --out runs/bench/tiny.json                # CPU smoke test, seconds
    python -m apb.bench.prefill --from-json benchmarks/prefill_results.json \\
        --markdown benchmarks/prefill_results.md --plot benchmarks/prefill_speed.png  # tables + plot only

(``python scripts/bench_prefill.py`` takes the same arguments.)

Random bf16 weights built on the GPU from a config (no downloads) and random retaining heads: time and
memory do not depend on what the weights are. On the same input ids:

- full: the unmodified model's forward over context + query on one GPU (causal, no mask tensor) on the
  fastest attention kernel that runs the shape (`apb.bench.common.FULL_KERNELS`: FlashAttention-4 when
  installed, then SDPA's cuDNN, FlashAttention-2 and memory-efficient kernels; each row records the one
  that ran), logits of the last token only;
- star: Star Attention (`APBConfig.star`: anchor = one whole block, nothing passed);
- apb: APB with the paper's defaults (`APBConfig.for_length`: anchor = block/4 capped at 8192,
  passing = block/8, query in the anchor).

Simulation: the H hosts run one after another on one GPU (`APBModel.prefill` outside
torch.distributed). Each host's compute is timed with CUDA events around its decoder call. The
simulated H-GPU prefill time is

    total = max over hosts of compute  +  comm  +  query pass

    comm  = (num_layers - 1) * ((H - 1) * P * num_kv_heads * head_dim * 2 (K and V) * 2 bytes / B
            + latency)   (no exchange at the last layer, where a host only stores its K/V)
          (`apb.bench.common.comm_ms`)

where P is the largest passing block (the collective pads every host's block to it, as `DistributedComm`
does), B the all-gather bus bandwidth per GPU (default 450 GB/s: NVLink 4 on H100 SXM, 18 links x 25 GB/s
per direction) and latency a per-all-gather constant (default 0). An all-gather of H pieces of S bytes
moves (H - 1) / H * (H * S) bytes into each GPU. Star passes nothing, so its comm is 0. The query pass
(query tokens over every host's cache, merged) runs the hosts one after another here, an upper bound of
the parallel pass. Compute, comm and query are separate columns so the sum can be redone.

Warm-up: before each timed run the same run with only the first `--warmup-layers` decoder layers (same
shapes, so kernels are compiled / autotuned and cuBLAS is warm) at a fraction of the cost. Peak memory
per host: `torch.cuda.max_memory_allocated`, reset at each host's start; since all simulated hosts share
one GPU, the per-host estimate is weights + (peak during the host - allocated at its start).

`--compile-layers [BACKEND]` (default backend inductor) compiles every layer's norms, MLP and attention
module around the attention call (`apb.fusion.compile_layers`) right after the model is built, so full
attention and APB / Star / exact all run on the same compiled layers; the warm-ups compile them, and the
JSON's meta records the backend.

The work runs in order of importance (128K with the most hosts, full vs Star vs APB and the per-block
breakdown first) and the JSON is rewritten after every measurement, so a run cut short keeps its numbers.

The per-block breakdown sees inside APB's prefill through `APBModel.recording(regions=True)` (the regions
the prefill marks itself) and module forward hooks (`Breakdown`); nothing of `apb` is patched.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apb.bench.common import (
    FULL_KERNELS,
    MODEL_SHAPES,
    Clock,
    DecoderRecorder,
    build_model,
    comm_ms,
    context_label,
    find_run,
    first_working_kernel,
    flop_bound_ms,
    fmt,
    full_attention_kernel,
    full_attention_label,
    measure_rates,
    median,
    method_label,
    package_version,
    sdpa_kernel_only,
    skipped_run,
)
from apb.fusion import COMPILE_LAYERS_ARG as FUSION_ARG
from apb.fusion import check_backend as check_compile_backend
from apb.model import PrefillRecord

logger = logging.getLogger(__name__)

APB_METHODS = ("apb", "apb-balanced", "apb-paper", "exact", "star", "star-shared")
"""Methods run through `APBModel.prefill`: APB with the paper's equal split (host 0 computes the anchor for
everyone), APB with the balanced split (the library's default), APB as published (equal split, every host
running its own anchor: `share_anchor=False`), exact APB (every earlier token passed, balanced split: what
all-gather context parallelism computes), Star as published, and Star with the anchor (host 0's block)
computed once by host 0 and sent to the others (`APBConfig.star(..., share_anchor=True)`; not a published
method: what APB's shared anchor would give Star)."""
STAR_METHODS = ("star", "star-shared")
"""Star Attention's variants (no passing blocks)."""
SPEEDUP_METHODS = ("apb", "apb-balanced", "apb-paper")
"""The APB methods whose speedup over Star (and exact) the tables report."""
METHOD_ORDER = {
    "full": 0,
    "star": 1,
    "star-shared": 2,
    "exact": 3,
    "apb-paper": 4,
    "apb": 5,
    "apb-balanced": 6,
}
"""Row order of the tables."""

CATEGORIES = ("qkv", "heads", "comm", "attention", "passing_concat", "o_proj", "ffn", "other")
"""Per-block breakdown columns: q/k/v projections; retaining heads (score MLP + pool/top-k); the modelled
all-gather; the attention backend call; gathering the passing K/V and concatenating keys (APB glue);
o_proj; the MLP; everything else (norms, RoPE, residual adds, embedding)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class BenchConfig:
    """One benchmark run's settings (from the command line)."""

    model_shape: str = "llama8b"
    """Key of MODEL_SHAPES: llama8b, qwen14b or tiny."""
    lengths: list[int] = dataclasses.field(default_factory=lambda: [32768, 65536, 131072, 262144])
    """Context lengths (tokens)."""
    hosts: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 8])
    """Simulated host counts."""
    primary_length: int = 131072
    """Measured first (with the most hosts and the breakdown); the largest length if not in `lengths`."""
    query_len: int = 64
    """Query tokens after the context."""
    methods: list[str] = dataclasses.field(default_factory=lambda: ["full", "star", "apb", "apb-balanced"])
    """Which methods to time."""
    backends: list[str] = dataclasses.field(default_factory=lambda: ["flash", "triton", "flex"])
    """APB/Star attention backends to compare; the fastest at the primary length's last-host shapes is used."""
    tie_margin: float = 0.05
    """Backends within this fraction of the fastest count as tied; the earlier in `backends` is used."""
    device: str = "cuda"
    """cuda, or cpu (tiny smoke tests)."""
    dtype: str = "bfloat16"
    """Model dtype: bfloat16 (GPU) or float32 (CPU smoke tests)."""
    head_hidden: int = 1024
    """Retaining head hidden size (the paper's 1024)."""
    bandwidth_gbps: float = 450.0
    """All-gather bus bandwidth per GPU in GB/s (1e9 bytes/s) used for the modelled communication."""
    latency_us: float = 0.0
    """Per-all-gather latency in microseconds added per layer."""
    warmup_layers: int = 2
    """Decoder layers in the warm-up run before each timed run."""
    repeats: int = 1
    """Timed runs per setting; the median is reported."""
    breakdown: bool = True
    """Per-block breakdown (APB, Star and full) at the primary length with the most hosts."""
    full_skip_threshold_s: float = 20.0
    """Skip full prefill at lengths above the primary one when the primary full prefill took longer."""
    deadline_s: float = 0.0
    """Stop starting new work after this many seconds since the start (0 = no limit)."""
    seed: int = 0
    """Seed of the weights and the input ids."""
    calibrate_length: int = 0
    """Fit the balanced split's cost model on this device (`APBModel.calibrate`) at this many tokens, with the
    most hosts, before any timing; 0 keeps the library's default weight."""
    compile_layers: str | None = None
    """`torch.compile` backend for every decoder layer's norms, MLP and attention module
    (`apb.fusion.compile_layers`; the attention call itself runs eagerly), applied
    once to the model every method runs on, so full attention and APB / Star / exact compare on the same
    layers; None keeps them eager. The warm-up runs compile (a run with warmup_layers=0 times a compile)."""

    def __post_init__(self) -> None:
        if self.model_shape not in MODEL_SHAPES:
            raise ValueError(
                f"model_shape must be one of {', '.join(MODEL_SHAPES)}, got {self.model_shape!r}"
            )
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {self.lengths!r}")
        if not self.hosts or any(h < 2 for h in self.hosts):
            raise ValueError(f"hosts must be counts >= 2, got {self.hosts!r}")
        unknown = sorted(set(self.methods) - {"full", *APB_METHODS})
        if unknown or not self.methods:
            raise ValueError(f"methods must be among full, {', '.join(APB_METHODS)}; got {self.methods!r}")
        if self.query_len < 1:
            raise ValueError(f"query_len must be >= 1, got {self.query_len}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.bandwidth_gbps <= 0:
            raise ValueError(f"bandwidth_gbps must be > 0, got {self.bandwidth_gbps}")
        if self.warmup_layers < 0 or self.repeats < 1:
            raise ValueError("warmup_layers must be >= 0 and repeats >= 1")
        if not self.backends:
            raise ValueError("backends must name at least one attention backend")
        if self.compile_layers is not None:
            check_compile_backend(self.compile_layers)
        if self.calibrate_length < 0:
            raise ValueError(
                f"calibrate_length must be >= 0 (0: no calibration), got {self.calibrate_length}"
            )
        self.lengths = sorted(set(self.lengths))
        self.hosts = sorted(set(self.hosts))
        if self.primary_length not in self.lengths:
            self.primary_length = max(self.lengths)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


FULL_ATTENTION_NOTE = (
    "the unmodified model on the first of " + ", ".join(FULL_KERNELS) + " that runs the shape "
    "(chosen in the warm-up; each full row's full_attention / full_kernel says which ran)"
)

# ---------------------------------------------------------------- breakdown


REGION_RAW_NAMES = {
    "score": "heads_score",
    "top_k": "heads_select",
    "gather": "passing_gather",
    "exchange": "exchange",
    "attention": "backend",
    "step": "attend",
}
"""`apb.attention.PREFILL_REGIONS` -> the names of the breakdown's raw columns (`raw_ms` in the results)."""


class Breakdown:
    """Per decoder call (host), the time of every part of a decoder block (see CATEGORIES), all through
    public hooks: forward hooks on every layer's q/k/v_proj, o_proj and mlp, the regions APB's prefill marks
    itself (`APBModel.recording(regions=True)`: selection, top-k, gather, exchange, attention backend, the
    whole step), and `begin` / `end` for what a caller times itself (full attention's SDPA call)."""

    def __init__(self, model: nn.Module, recorder: DecoderRecorder):
        self.model = model
        self.recorder = recorder
        self.clock = recorder.clock
        self.records: list[tuple[int, str, Any, Any]] = []
        self._open: dict[str, list[tuple[int, Any]]] = defaultdict(list)

    def begin(self, name: str) -> None:
        self._open[name].append((self.recorder.current_call, self.clock.mark()))

    def end(self, name: str) -> None:
        call, start = self._open[name].pop()
        self.records.append((call, name, start, self.clock.mark()))

    @contextlib.contextmanager
    def module_hooks(self) -> Iterator[Breakdown]:
        """Time q/k/v_proj ("qkv"), o_proj and the MLP ("ffn") of every layer inside the block."""
        from apb.heads import decoder_layers

        handles = []

        def hook_module(module: nn.Module, name: str) -> None:
            # A compiled module (--compile-layers) calls its hooks from its compiled call: disabled, they
            # run as they are instead of being traced, and recompiled whenever the records grow.
            begin = torch.compiler.disable(lambda *_: self.begin(name))
            end = torch.compiler.disable(lambda *_: self.end(name))
            handles.append(module.register_forward_pre_hook(begin))
            handles.append(module.register_forward_hook(end))

        for layer in decoder_layers(self.model):
            attn = layer.self_attn
            for proj in ("q_proj", "k_proj", "v_proj"):
                hook_module(getattr(attn, proj), "qkv")
            hook_module(attn.o_proj, "o_proj")
            hook_module(layer.mlp, "ffn")
        self.records = []
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def per_call(self, record: PrefillRecord | None = None) -> dict[int, dict[str, float]]:
        """call index -> raw part -> ms (after a sync). With the `record` of a simulated prefill (hosts
        one after another: host h is decoder call h) its regions count too, as `REGION_RAW_NAMES`."""
        out: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for call, name, start, end in self.records:
            out[call][name] += self.clock.ms(start, end)
        if record is not None:
            for host, regions in record.region_times(self.clock.ms).items():
                for name, ms in regions.items():
                    out[host][REGION_RAW_NAMES[name]] += ms
        return out


def split_categories(raw: dict[str, float], host_ms: float, comm_ms: float) -> dict[str, float]:
    """Raw timed parts of one host -> CATEGORIES (ms, whole host, all layers).

    `attend` (the APB attention step) encloses the heads, the top-k, the gather and the backend call; the
    rest of it is key concatenation and the store copy. `attention_sdpa` is the full model's attention.
    """
    heads = raw.get("heads_score", 0.0) + raw.get("heads_select", 0.0)
    attention = raw.get("backend", 0.0) + raw.get("attention_sdpa", 0.0)
    attend = raw.get("attend", 0.0)
    # the gather is inside `attend` too: concat = gather + key concatenation + store copy
    concat = max(0.0, attend - heads - raw.get("backend", 0.0)) if attend else 0.0
    measured = raw.get("qkv", 0.0) + raw.get("o_proj", 0.0) + raw.get("ffn", 0.0)
    measured += attend if attend else attention
    return {
        "qkv": raw.get("qkv", 0.0),
        "heads": heads,
        "comm": comm_ms,
        "attention": attention,
        "passing_concat": concat,
        "o_proj": raw.get("o_proj", 0.0),
        "ffn": raw.get("ffn", 0.0),
        "other": max(0.0, host_ms - measured),
    }


# ---------------------------------------------------------------- the benchmark


class Bench:
    """The simulated benchmark: one model (random weights of `MODEL_SHAPES[cfg.model_shape]`, random heads),
    the timed settings in order of importance (`plan`), the results dict (rewritten to `out_path` after
    every measurement). `log` gets one line per step (default: this module's logger at INFO)."""

    def __init__(
        self,
        cfg: BenchConfig,
        out_path: Path | None,
        command: str,
        log: Callable[[str], None] | None = None,
    ):
        from apb import APBModel, build_heads

        self.cfg = cfg
        self.out_path = out_path
        self._log = log or logger.info
        self.started = time.perf_counter()
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        self.model = build_model(cfg.model_shape, self.device, cfg.torch_dtype)
        if cfg.compile_layers is not None:  # before any warm-up, for every method alike
            from apb.fusion import compile_layers

            compile_layers(self.model, backend=cfg.compile_layers)
        model_config = self.model.config
        self.model_config = model_config
        self.heads = build_heads(self.model, hidden_size=cfg.head_hidden, dtype=cfg.torch_dtype)
        self.apbm = APBModel(self.model, self.heads)
        self.clock = Clock(self.device)
        self.recorder = DecoderRecorder(self.model.get_decoder(), self.clock)
        self.num_layers = model_config.num_hidden_layers
        self.num_kv_heads = model_config.num_key_value_heads
        self.head_dim = model_config.hidden_size // model_config.num_attention_heads
        self.bytes_per_element = torch.tensor([], dtype=cfg.torch_dtype).element_size()
        self.weights_bytes = torch.cuda.memory_allocated() if self.clock.cuda else 0
        self._ids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.full_kernels: dict[int, str | None] = {}
        """length -> the SDPA kernel full attention runs on (`full_kernel`)."""
        self.full_kernel_failures: dict[int, list[str]] = {}
        self.results: dict[str, Any] = {
            "meta": {
                "command": command,
                "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "device": torch.cuda.get_device_name() if self.clock.cuda else f"cpu ({platform.machine()})",
                "torch": torch.__version__,
                "transformers": package_version("transformers"),
                "triton": package_version("triton"),
                "model_shape": cfg.model_shape,
                "model_config": {k: v for k, v in MODEL_SHAPES[cfg.model_shape].items() if k != "family"},
                "dtype": cfg.dtype,
                "head_hidden": cfg.head_hidden,
                "query_len": cfg.query_len,
                "compile_layers": cfg.compile_layers,
                "calibrate_length": cfg.calibrate_length,
                "weights_gib": self.weights_bytes / 2**30,
                "simulated_hosts": True,
                "comm_model": {
                    "bandwidth_gbps": cfg.bandwidth_gbps,
                    "latency_us": cfg.latency_us,
                    "formula": "comm_ms = (num_layers - 1) * ((H-1) * P * num_kv_heads * head_dim * 2 * bytes / "
                    "(bandwidth_gbps*1e9) + latency_us*1e-6) * 1000; P = largest passing block",
                },
                "full_attention": FULL_ATTENTION_NOTE,
                "timing": "CUDA events per host (decoder pre/post hooks); warm-up with "
                f"{cfg.warmup_layers} layers; median of {cfg.repeats} run(s)",
                "config": dataclasses.asdict(cfg),
            },
            "backend_bench": [],
            "backend": None,
            "runs": [],
            "breakdown": [],
            "targets": {},
        }
        self.log(
            f"model {cfg.model_shape} {cfg.dtype} on {self.results['meta']['device']}: "
            f"{self.weights_bytes / 2**30:.1f} GiB with heads"
        )

    # -------------------------------------------------------------- plumbing

    def log(self, message: str) -> None:
        self._log(f"[{time.perf_counter() - self.started:7.1f}s] {message}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        finalize(self.results)
        if self.out_path is None:
            return
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.out_path)

    def ids(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if length not in self._ids:
            g = torch.Generator().manual_seed(self.cfg.seed + length)
            vocab = self.model_config.vocab_size
            context = torch.randint(0, vocab, (1, length), generator=g).to(self.device)
            query = torch.randint(0, vocab, (1, self.cfg.query_len), generator=g).to(self.device)
            self._ids = {length: (context, query)}  # keep one length's ids only
        return self._ids[length]

    @contextlib.contextmanager
    def few_layers(self, num_layers: int) -> Iterator[None]:
        """Run with only the first `num_layers` decoder layers (warm-up at the same shapes)."""
        decoder = self.model.get_decoder()
        layers = decoder.layers
        decoder.layers = nn.ModuleList(list(layers)[:num_layers])
        try:
            yield
        finally:
            decoder.layers = layers

    @contextlib.contextmanager
    def plain_model(self) -> Iterator[None]:
        """The unmodified model: APB's attention registration removed for the duration."""
        from apb.attention import install, uninstall

        uninstall(self.model)
        try:
            yield
        finally:
            install(self.model)

    def free(self, empty_cache: bool = False) -> None:
        """Drop garbage; give cached GPU memory back only when asked (after an OOM, at a new length):
        within one length the cached blocks are reused, so timed runs make no new cudaMalloc calls."""
        gc.collect()
        if empty_cache and self.clock.cuda:
            torch.cuda.empty_cache()

    def apb_config(self, method: str, length: int, hosts: int, backend: str):
        from apb import APBConfig

        if method in STAR_METHODS:
            return APBConfig.star(length, hosts, backend=backend, share_anchor=method == "star-shared")
        if method == "exact":
            return APBConfig.exact(backend=backend)
        if method == "apb-balanced":
            return APBConfig.for_length(length, hosts, backend=backend, split="balanced")
        if method == "apb-paper":
            return APBConfig.for_length(length, hosts, backend=backend, split="equal", share_anchor=False)
        return APBConfig.for_length(length, hosts, backend=backend, split="equal")

    def calibrate(self, backend: str) -> None:
        """`calibrate_length`: fit the balanced split's cost model to this device and backend
        (`APBModel.calibrate`, hosts simulated; inside torch.distributed the ranks average their times), and
        record the fit in the results' meta."""
        length, hosts = self.cfg.calibrate_length, max(self.cfg.hosts)
        if not length:
            return
        config = self.apb_config("apb-balanced", length, hosts, backend)
        started = time.perf_counter()
        try:
            calibration = self.apbm.calibrate(
                length, hosts, num_query=self.cfg.query_len, config=config, progress=True
            )
        except ValueError as err:
            raise SystemExit(f"--calibrate {length}: {err}") from err
        self.free(empty_cache=True)
        self.results["meta"]["calibration"] = {"length": length, "hosts": hosts, **calibration.to_dict()}
        self.log(
            f"calibrated at {length} tokens x{hosts} in {time.perf_counter() - started:.1f} s: attention weight "
            f"{calibration.cost.attention_weight:.3f} (linear {calibration.linear_tflops:.3g}, attention "
            f"{calibration.attention_tflops:.3g} TFLOP/s, fit within {calibration.max_error:.1%})"
        )

    def host_plan(self, length: int, hosts: int, config):
        """The `HostPlan` `APBModel.prefill` runs for this setting."""
        return self.apbm.plan(length, self.cfg.query_len, hosts, config)

    # -------------------------------------------------------------- backend choice

    def select_backend(self) -> str:
        """Time each candidate backend on the last host's attention shapes (APB and Star, primary length,
        most hosts); keep the fastest (sum of both)."""
        from apb import backends as apb_backends

        available = apb_backends.available_backends()
        cfg = self.cfg
        length, hosts = cfg.primary_length, max(cfg.hosts)
        num_heads = self.model_config.num_attention_heads
        shapes = {}
        for method in ("apb", "star"):
            config = self.apb_config(method, length, hosts, "reference")
            plan = self.host_plan(length, hosts, config)
            shapes[method] = plan.attention_shape(plan.num_hosts - 1)
        times: dict[str, float] = {}
        for name in cfg.backends:
            entry: dict[str, Any] = {"backend": name}
            if name not in available:
                entry["status"] = f"not available (available: {', '.join(available)})"
                self.results["backend_bench"].append(entry)
                self.log(f"backend {name}: {entry['status']}")
                continue
            fn = apb_backends.get_backend(name, self.device)
            try:
                total = 0.0
                for method, (passing, anchor, block) in shapes.items():
                    g = torch.Generator(device=self.device).manual_seed(1)
                    q = torch.randn(
                        1,
                        num_heads,
                        anchor + block,
                        self.head_dim,
                        device=self.device,
                        dtype=cfg.torch_dtype,
                        generator=g,
                    )
                    kv_shape = (1, self.num_kv_heads, passing + anchor + block, self.head_dim)
                    k = torch.randn(kv_shape, device=self.device, dtype=cfg.torch_dtype, generator=g)
                    v = torch.randn(kv_shape, device=self.device, dtype=cfg.torch_dtype, generator=g)
                    kwargs = dict(num_passing=passing, num_anchor=anchor, softmax_scale=self.head_dim**-0.5)
                    t0 = time.perf_counter()
                    fn(q, k, v, **kwargs)  # compile / autotune
                    self.clock.sync()
                    first_s = time.perf_counter() - t0
                    reps = 3
                    start = self.clock.mark()
                    for _ in range(reps):
                        fn(q, k, v, **kwargs)
                    end = self.clock.mark()
                    self.clock.sync()
                    ms = self.clock.ms(start, end) / reps
                    entry[method] = {
                        "shape_passing_anchor_local": [passing, anchor, block],
                        "ms": ms,
                        "first_call_s": first_s,
                    }
                    total += ms
                    del q, k, v
                entry["status"] = "ok"
                entry["total_ms"] = total
                times[name] = total
                self.log(
                    f"backend {name}: APB {entry['apb']['ms']:.2f} ms, Star {entry['star']['ms']:.2f} ms"
                )
            except Exception as error:  # a broken optional backend must not stop the benchmark
                entry["status"] = f"error: {type(error).__name__}: {error}"[:500]
                self.log(f"backend {name}: {entry['status']}")
                self.free()
            self.results["backend_bench"].append(entry)
        if not times:
            raise RuntimeError(f"no usable attention backend among {cfg.backends} (available: {available})")
        fastest = min(times.values())
        # Ties (within tie_margin) go to the earlier candidate: the default order puts the Triton kernel,
        # which needs no per-shape compile, before flex, which compiles once per host shape.
        chosen = next(n for n in cfg.backends if n in times and times[n] <= fastest * (1 + cfg.tie_margin))
        self.results["backend"] = chosen
        self.log(f"using backend {chosen!r} for APB and Star (fastest {min(times, key=times.get)!r})")
        self.save()
        return chosen

    # -------------------------------------------------------------- one measurement

    def modelled_comm_ms(self, plan: Any) -> float:
        """The exchanges of a simulated prefill under `plan` (passing all-gathers, anchor broadcasts),
        modelled (`comm_ms`) at the configured link."""
        return comm_ms(
            num_layers=self.num_layers,
            num_hosts=plan.num_hosts,
            max_passing=max(plan.counts),
            shared_anchor=plan.shared_anchor_len,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            bytes_per_element=self.bytes_per_element,
            bandwidth_gbps=self.cfg.bandwidth_gbps,
            latency_us=self.cfg.latency_us,
        )

    def full_kernel(self, forward: Callable[[], Any], length: int) -> str | None:
        """The kernel full attention uses at `length`: the first of `FULL_KERNELS` under which
        `forward` runs with the first `warmup_layers` layers (a warm-up too), kept per length."""
        if length not in self.full_kernels:
            with self.few_layers(max(1, self.cfg.warmup_layers)):
                _, kernel, failed = first_working_kernel(
                    forward, cuda=self.clock.cuda, log=self.log, model=self.model
                )
            self.full_kernels[length] = kernel
            self.full_kernel_failures[length] = failed
        return self.full_kernels[length]

    def time_full(self, length: int) -> dict[str, Any]:
        """Full attention: the unmodified model's forward over context + query on one device, on its
        fastest SDPA kernel that runs the shape (`full_kernel`); a results row."""
        context, query = self.ids(length)
        ids = torch.cat([context, query], dim=1)

        def forward():
            with torch.inference_mode():
                return self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        with self.plain_model():
            self.full_kernels.pop(length, None)  # choose again, as a warm-up
            kernel = self.full_kernel(forward, length)
            self.clock.sync()
            samples = []
            for _ in range(self.cfg.repeats):
                with self.recorder.recording() as calls, full_attention_kernel(self.model, kernel):
                    start = self.clock.mark()
                    logits = forward()
                    end = self.clock.mark()
                self.clock.sync()
                samples.append((self.clock.ms(start, end), calls))
        total, calls = median(samples)
        run = {
            "method": "full",
            "length": length,
            "hosts": 1,
            "status": "ok",
            "compute_ms": total,
            "comm_ms": 0.0,
            "query_ms": 0.0,
            "total_ms": total,
            "finite": bool(torch.isfinite(logits).all()),
            "full_attention": full_attention_label(kernel, self.clock.cuda),
            "full_kernel": kernel,
            "sdpa_math_disabled": kernel is not None,
        }
        if self.full_kernel_failures[length]:
            run["full_kernels_failed"] = self.full_kernel_failures[length]
        if self.clock.cuda:
            run["peak_gib"] = calls[0]["peak"] / 2**30
            run["host_est_gib"] = [calls[0]["peak"] / 2**30]
        return run

    def flop_rates(self, backend: str) -> dict[str, float]:
        """This GPU's matmul and `backend` attention rates (TFLOP/s), measured once, kept in the meta."""
        rates = self.results["meta"].get("rates_tflops")
        if rates is None or rates.get("backend") != backend:
            rates = measure_rates(
                self.model_config,
                self.device,
                self.cfg.torch_dtype,
                backend,
                num_tokens=16384 if self.clock.cuda else 256,
            )
            rates = {**rates, "backend": backend}
            self.results["meta"]["rates_tflops"] = rates
        return rates

    def time_sim(self, method: str, length: int, hosts: int, backend: str) -> dict[str, Any]:
        context, query = self.ids(length)
        config = self.apb_config(method, length, hosts, backend)
        plan = self.host_plan(length, hosts, config)
        counts = plan.counts

        def prefill():
            return self.apbm.prefill(context, query, config=config, num_hosts=hosts)

        if self.cfg.warmup_layers:
            with self.few_layers(self.cfg.warmup_layers):
                prefill()
        self.clock.sync()
        samples, query_samples = [], []
        for _ in range(self.cfg.repeats):
            with self.recorder.recording() as calls:
                wall0 = time.perf_counter()
                logits = prefill()
                self.clock.sync()
                wall = time.perf_counter() - wall0
            host_ms = [self.clock.ms(c["start"], c["end"]) for c in calls[:hosts]]
            query_pass_ms = sum(self.clock.ms(c["start"], c["end"]) for c in calls[hosts:])
            samples.append((max(host_ms), (host_ms, calls, wall)))
            query_samples.append((query_pass_ms, None))
        _, (host_ms, calls, wall) = median(samples)
        # its own median: the sample with the median slowest host may hold the slower query pass
        query_ms, _ = median(query_samples)
        comm = self.modelled_comm_ms(plan)
        compute = max(host_ms)
        run = {
            "method": method,
            "length": length,
            "hosts": hosts,
            "status": "ok",
            "backend": backend,
            "anchor_len": config.anchor_len,
            "passing_len": config.passing_len,
            "passing_counts": counts,
            "split": config.split,
            "blocks": plan.describe()["blocks"],
            "shared_anchor": plan.shares_anchor,
            "host_ms": host_ms,
            "slowest_host": int(max(range(hosts), key=lambda h: host_ms[h])),
            "compute_ms": compute,
            "comm_ms": comm,
            "query_ms": query_ms,
            "total_ms": compute + comm + query_ms,
            "serial_wall_ms": wall * 1000.0,
            "finite": bool(torch.isfinite(logits).all()),
        }
        # what each host's forward loses beyond its FLOPs at this GPU's measured rates (`measure_rates`);
        # not for Star, whose hosts are not APB hosts: the bound's attention term does not fit them
        if method not in STAR_METHODS:
            bound = flop_bound_ms(plan, self.apbm.cost_model, self.flop_rates(backend))
            run["host_flop_bound_ms"] = bound
            run["host_over_bound"] = [t / b for t, b in zip(host_ms, bound, strict=True)]
        if self.clock.cuda:
            peaks = [c["peak"] for c in calls[:hosts]]
            run["peak_gib"] = max(c["peak"] for c in calls) / 2**30
            run["host_peak_sim_gib"] = [p / 2**30 for p in peaks]
            run["host_est_gib"] = [
                (self.weights_bytes + c["peak"] - c["alloc_start"]) / 2**30 for c in calls[:hosts]
            ]
        return run

    def breakdown_sim(self, method: str, length: int, hosts: int, backend: str) -> dict[str, Any]:
        """Per-block breakdown of an APB / Star prefill, every host (see CATEGORIES)."""
        context, query = self.ids(length)
        breakdown = Breakdown(self.model, self.recorder)
        config = self.apb_config(method, length, hosts, backend)
        plan = self.host_plan(length, hosts, config)
        counts = plan.counts
        with (
            breakdown.module_hooks(),
            self.recorder.recording() as calls,
            self.apbm.recording(clock=self.clock.mark, regions=True) as record,
        ):
            self.apbm.prefill(context, query, config=config, num_hosts=hosts)
        self.clock.sync()
        per_call = breakdown.per_call(record)
        comm = self.modelled_comm_ms(plan)
        per_host = []
        for host in range(hosts):
            host_ms = self.clock.ms(calls[host]["start"], calls[host]["end"])
            cats = split_categories(per_call.get(host, {}), host_ms, comm)
            per_host.append(
                {
                    "host": host,
                    "host_ms": host_ms,
                    "ms": cats,
                    "raw_ms": dict(per_call.get(host, {})),
                    "runs_heads": bool(counts[host]) and config.needs_heads,
                }
            )
        return {
            "method": method,
            "length": length,
            "hosts": hosts,
            "backend": backend,
            "num_layers": self.num_layers,
            "per_host": per_host,
        }

    def breakdown_full(self, length: int) -> dict[str, Any]:
        """Per-block breakdown of full attention (one host); its SDPA calls are timed through an
        attention function registered with transformers (`AttentionInterface`) that wraps SDPA."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        context, query = self.ids(length)
        ids = torch.cat([context, query], dim=1)
        breakdown = Breakdown(self.model, self.recorder)
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        masks_seen: list[bool] = []

        def timed_sdpa(module, q, k, v, attention_mask, **kwargs):
            masks_seen.append(attention_mask is None)
            breakdown.begin("attention_sdpa")
            try:
                return sdpa(module, q, k, v, attention_mask, **kwargs)
            finally:
                breakdown.end("attention_sdpa")

        def forward():
            with torch.inference_mode():
                return self.model(input_ids=ids, use_cache=False, logits_to_keep=1)

        AttentionInterface.register("bench_sdpa", torch.compiler.disable(timed_sdpa))  # not traced: timed
        AttentionMaskInterface.register("bench_sdpa", sdpa_mask)
        with self.plain_model():
            kernel = self.full_kernel(forward, length)
            self.model.set_attn_implementation("bench_sdpa")
            try:
                # on SDPA kernels the attention stays the timed SDPA registered above (opaque itself)
                use_kernel = (
                    full_attention_kernel(self.model, kernel) if kernel == "fa4" else sdpa_kernel_only(kernel)
                )
                with breakdown.module_hooks(), self.recorder.recording() as calls, use_kernel:
                    forward()
            finally:
                self.model.set_attn_implementation("sdpa")
        self.clock.sync()
        host_ms = self.clock.ms(calls[0]["start"], calls[0]["end"])
        raw = dict(breakdown.per_call().get(0, {}))
        return {
            "method": "full",
            "length": length,
            "hosts": 1,
            "backend": "sdpa",
            "full_attention": full_attention_label(kernel, self.clock.cuda),
            "num_layers": self.num_layers,
            "mask_tensor_built": not all(masks_seen),
            "per_host": [
                {"host": 0, "host_ms": host_ms, "ms": split_categories(raw, host_ms, 0.0), "raw_ms": raw}
            ],
        }

    # -------------------------------------------------------------- the plan

    def plan(self) -> list[tuple[str, str, int, int]]:
        """(kind, method, length, hosts) in order of importance."""
        cfg = self.cfg
        primary, most = cfg.primary_length, max(cfg.hosts)
        sims = [m for m in APB_METHODS if m in cfg.methods]
        items: list[tuple[str, str, int, int]] = []
        if "full" in cfg.methods:
            items.append(("time", "full", primary, 1))
        items += [("time", m, primary, most) for m in sims]
        if cfg.breakdown:
            items += [("breakdown", m, primary, most) for m in sims]
        items += [("time", m, primary, h) for h in sorted(cfg.hosts, reverse=True)[1:] for m in sims]
        if cfg.breakdown and "full" in cfg.methods:
            items.append(("breakdown", "full", primary, 1))
        for length in [n for n in cfg.lengths if n != primary]:
            if "full" in cfg.methods:
                items.append(("time", "full", length, 1))
            items += [("time", m, length, h) for h in sorted(cfg.hosts, reverse=True) for m in sims]
        return items

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        backend = self.select_backend() if any(m in cfg.methods for m in APB_METHODS) else "none"
        if backend != "none":
            self.calibrate(backend)
        last_length = None
        for kind, method, length, hosts in self.plan():
            label = f"{kind} {method} {length // 1024}K x{hosts}"
            if cfg.deadline_s and self.elapsed() > cfg.deadline_s:
                self._record(kind, skipped_run(method, length, hosts, "skipped: deadline"))
                self.log(f"{label}: skipped (deadline {cfg.deadline_s:.0f} s)")
                continue
            if method == "full" and length > cfg.primary_length:
                primary_full = find_run(self.results["runs"], "full", cfg.primary_length, 1)
                if primary_full is None or primary_full.get("status") != "ok":
                    reason = "skipped: full prefill at the primary length did not run"
                elif primary_full["total_ms"] > cfg.full_skip_threshold_s * 1000:
                    reason = (
                        f"skipped: full prefill at {cfg.primary_length} took "
                        f"{primary_full['total_ms'] / 1000:.1f} s > {cfg.full_skip_threshold_s:.0f} s"
                    )
                else:
                    reason = ""
                if reason:
                    self._record(kind, skipped_run(method, length, hosts, reason))
                    self.log(f"{label}: {reason}")
                    continue
            if length != last_length:
                self.free(empty_cache=True)
                last_length = length
            started = time.perf_counter()
            failed = False
            try:
                if kind == "time" and method == "full":
                    result = self.time_full(length)
                elif kind == "time":
                    result = self.time_sim(method, length, hosts, backend)
                elif method == "full":
                    result = self.breakdown_full(length)
                else:
                    result = self.breakdown_sim(method, length, hosts, backend)
            except torch.cuda.OutOfMemoryError as error:
                result = skipped_run(method, length, hosts, "OOM")
                result["error"] = str(error).splitlines()[0][:300]
                failed = True
            except Exception as error:  # record and go on: the rest of the plan still runs
                result = skipped_run(method, length, hosts, f"error: {type(error).__name__}: {error}"[:500])
                self.log(traceback.format_exc())
                failed = True
            self.free(empty_cache=failed)
            result["wall_s"] = time.perf_counter() - started
            self._record(kind, result)
            self.save()
            self.log(f"{label}: {summary_line(kind, result)}")
        self.save()
        return self.results

    def _record(self, kind: str, result: dict[str, Any]) -> None:
        self.results["runs" if kind == "time" else "breakdown"].append(result)


# ---------------------------------------------------------------- results -> numbers, tables, plot


def finalize(results: dict[str, Any]) -> dict[str, Any]:
    """Fill tokens/s, speedup over full and the target checks from the measured times (idempotent)."""
    query_len = results["meta"]["query_len"]
    runs = results["runs"]
    for run in runs:
        if run.get("status") != "ok":
            continue
        run["tokens_per_s"] = (run["length"] + query_len) / (run["total_ms"] / 1000.0)
        full = find_run(runs, "full", run["length"], 1)
        ok = full is not None and full.get("status") == "ok"
        run["speedup_vs_full"] = full["total_ms"] / run["total_ms"] if ok else None
        # the context prefill alone (slowest host + comm), without the serially simulated query pass
        context_ms = run["compute_ms"] + run["comm_ms"]
        run["speedup_vs_full_no_query"] = full["total_ms"] / context_ms if ok else None
        if run["method"] in SPEEDUP_METHODS:
            star = find_run(runs, "star", run["length"], run["hosts"])
            ok = star is not None and star.get("status") == "ok"
            run["speedup_vs_star"] = star["total_ms"] / run["total_ms"] if ok else None
    targets: dict[str, Any] = {}
    hosts = sorted({r["hosts"] for r in runs if r["hosts"] > 1})
    primary = results["meta"]["config"].get("primary_length")
    most = max(hosts) if hosts else None
    apb_main = find_run(runs, "apb", primary, most) if most else None
    if apb_main and apb_main.get("speedup_vs_full") is not None:
        targets["apb_vs_full_primary_most_hosts"] = {
            "length": primary,
            "hosts": most,
            "speedup": apb_main["speedup_vs_full"],
            "target": 15.0,
            "met": apb_main["speedup_vs_full"] >= 15.0,
        }
    ratios = [
        {"length": r["length"], "hosts": r["hosts"], "ratio": r["speedup_vs_star"]}
        for r in runs
        if r["method"] == "apb" and r.get("speedup_vs_star") is not None
    ]
    if ratios:
        targets["apb_vs_star"] = {
            "target": 1.8,
            "min": min(x["ratio"] for x in ratios),
            "max": max(x["ratio"] for x in ratios),
            "met_everywhere": all(x["ratio"] >= 1.8 for x in ratios),
            "all": ratios,
        }
    for entry in results.get("breakdown", []):
        if entry.get("method") != "apb" or "per_host" not in entry:
            continue
        run = find_run(runs, "apb", entry["length"], entry["hosts"])
        rows = [h for h in entry["per_host"] if h.get("runs_heads")]
        if not rows:
            continue
        worst = max(rows, key=lambda h: h["ms"]["heads"] / h["host_ms"])
        slowest = max(rows, key=lambda h: h["host_ms"])
        item = {
            "length": entry["length"],
            "hosts": entry["hosts"],
            "max_share_of_own_host": worst["ms"]["heads"] / worst["host_ms"],
            "host": worst["host"],
            "share_of_slowest_heads_host": slowest["ms"]["heads"] / slowest["host_ms"],
            "slowest_heads_host": slowest["host"],
            "share_by_host": {h["host"]: h["ms"]["heads"] / h["host_ms"] for h in rows},
            "target": 0.03,
        }
        if run and run.get("status") == "ok":
            item["share_of_simulated_total"] = worst["ms"]["heads"] / run["total_ms"]
        item["met"] = item["max_share_of_own_host"] <= 0.03
        targets["heads_share"] = item
    results["targets"] = targets
    return results


def compiled_note(meta: dict[str, Any]) -> str:
    """A sentence for the table's header when the layers ran compiled (`--compile-layers`), else empty."""
    backend = meta.get("compile_layers")
    if not backend:
        return ""
    return f" Norms and MLPs of every layer compiled (`torch.compile`, backend `{backend}`) for every method."


def markdown(results: dict[str, Any]) -> str:
    """The speed table, the breakdown table and the target lines, as markdown."""
    meta = results["meta"]
    lines = [
        f"Model shape `{meta['model_shape']}` ({meta['dtype']}, random weights, random heads of hidden "
        f"{meta['head_hidden']}), query {meta['query_len']} tokens, device {meta['device']}, torch "
        f"{meta['torch']}, transformers {meta['transformers']}, {meta['date_utc']}. "
        f"APB/Star attention backend: `{results.get('backend')}`. Hosts are **simulated** one after another "
        f"on one GPU; comm is modelled at {meta['comm_model']['bandwidth_gbps']:g} GB/s."
        + (f" Full attention: {meta['full_attention']}." if meta.get("full_attention") else "")
        + compiled_note(meta),
        "",
        "| method | context | hosts | compute ms (slowest host) | comm ms (model) | query ms | total ms "
        "| tokens/s | speedup vs full | same, without query pass | APB / Star | peak GiB per host (est.) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    runs = sorted(results["runs"], key=lambda r: (r["length"], METHOD_ORDER.get(r["method"], 9), r["hosts"]))
    for r in runs:
        ctx = context_label(r["length"])
        if r.get("status") != "ok":
            lines.append(f"| {method_label(r)} | {ctx} | {r['hosts']} | {r.get('status')} | | | | | | | | |")
            continue
        speed = r.get("speedup_vs_full")
        vs_star = r.get("speedup_vs_star")
        mem = max(r["host_est_gib"]) if r.get("host_est_gib") else None
        lines.append(
            f"| {method_label(r)} | {ctx} | {r['hosts']} | {r['compute_ms']:.1f} | {r['comm_ms']:.2f} | "
            f"{r['query_ms']:.1f} | {r['total_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{fmt(speed, 'x')} | {fmt(r.get('speedup_vs_full_no_query') if r['hosts'] > 1 else None, 'x')} | "
            f"{fmt(vs_star, 'x')} | {fmt(mem)} |"
        )
    primary = meta["config"].get("primary_length")
    per_host = [r for r in runs if r.get("status") == "ok" and r["length"] == primary and "host_ms" in r]
    if per_host:
        lines += [
            "",
            f"Per-host compute (ms, CUDA events) and memory at {primary // 1024}K (GiB: weights + the host's own "
            "peak increase; the simulation itself holds every host's cache on one GPU, see `host_peak_sim_gib`):",
            "",
            "| method | hosts | compute ms per host | busy / FLOP bound | GiB per host (est.) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in per_host:
            mem = " / ".join(f"{g:.1f}" for g in r.get("host_est_gib", [])) or "—"
            over = " / ".join(f"{x:.2f}" for x in r.get("host_over_bound", [])) or "—"
            lines.append(
                f"| {r['method']} | {r['hosts']} | {' / '.join(f'{t:.0f}' for t in r['host_ms'])} | {over} | {mem} |"
            )
        rates = meta.get("rates_tflops")
        if rates:
            lines += [
                "",
                f"FLOP bound: a host's linear work at the measured matmul rate ({rates['matmul']:.0f} TFLOP/s) plus "
                f"its attention at the measured {rates.get('backend', '')} dense-causal rate "
                f"({rates['attention']:.0f} TFLOP/s), same GPU, same run.",
            ]
    if results.get("breakdown"):
        lines += [
            "",
            "Per-block (per decoder layer) time, ms; whole-host time / layers; comm modelled:",
            "",
            "| method | context | hosts | host | " + " | ".join(CATEGORIES) + " | total |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in CATEGORIES) + " | --- |",
        ]
        for entry in results["breakdown"]:
            if "per_host" not in entry:
                lines.append(
                    f"| {entry['method']} | {entry['length']} | {entry['hosts']} | {entry.get('status')} |"
                )
                continue
            layers = entry["num_layers"]
            hosts = entry["per_host"]
            shown = [hosts[-1]]
            with_heads = [h for h in hosts if h.get("runs_heads")]
            if with_heads and with_heads[-1] is not hosts[-1]:
                shown.insert(0, with_heads[-1])
            ctx = context_label(entry["length"])
            for h in shown:
                cells = " | ".join(f"{h['ms'][c] / layers:.2f}" for c in CATEGORIES)
                total = (h["host_ms"] + h["ms"]["comm"]) / layers
                lines.append(
                    f"| {entry['method']} | {ctx} | {entry['hosts']} | {h['host']} | {cells} | {total:.2f} |"
                )
    targets = results.get("targets", {})
    if targets:
        lines += ["", "Targets:", ""]
        t = targets.get("apb_vs_full_primary_most_hosts")
        if t:
            lines.append(
                f"- APB {t['length'] // 1024}K, {t['hosts']} hosts vs full: {t['speedup']:.1f}x "
                f"(target >= {t['target']:g}x: {'met' if t['met'] else 'missed'})"
            )
        t = targets.get("apb_vs_star")
        if t:
            lines.append(
                f"- APB vs Star, same length and hosts: {t['min']:.2f}x to {t['max']:.2f}x "
                f"(target >= {t['target']:g}x: {'met everywhere' if t['met_everywhere'] else 'missed'})"
            )
        t = targets.get("heads_share")
        if t:
            extra = (
                f", {100 * t['share_of_simulated_total']:.1f}% of the simulated total"
                if "share_of_simulated_total" in t
                else ""
            )
            lines.append(
                f"- Retaining heads (score + top-k): {100 * t['max_share_of_own_host']:.1f}% of host "
                f"{t['host']}'s compute (the most of any host), "
                f"{100 * t.get('share_of_slowest_heads_host', float('nan')):.1f}% of the slowest host that runs "
                f"heads (host {t.get('slowest_heads_host')}){extra} (target <= 3% of every host: "
                f"{'met' if t['met'] else 'missed'})"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Prefill time and speedup over full vs context length (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = [r for r in results["runs"] if r.get("status") == "ok"]
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {2: "tab:blue", 4: "tab:orange", 8: "tab:green", 16: "tab:purple"}
    styles = {
        "star": ("--", "s"),
        "star-shared": ((0, (5, 1, 1, 1)), "D"),
        "apb": ("-", "o"),
        "apb-balanced": ("-.", "v"),
        "apb-paper": ((0, (1, 1)), "x"),
        "exact": (":", "^"),
    }
    names = {
        "star": "Star",
        "star-shared": "Star (shared anchor, not published)",
        "apb": "APB (equal split)",
        "apb-balanced": "APB (balanced split)",
        "apb-paper": "APB (every host its own anchor)",
        "exact": "exact APB",
    }
    series: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in runs:
        series[(r["method"], r["hosts"])].append(r)
    for (method, hosts), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["length"])
        xs = [r["length"] for r in rs]
        if method == "full":
            ax_time.plot(xs, [r["total_ms"] / 1000 for r in rs], "k-", marker="D", lw=2, label="full (1 GPU)")
            continue
        line, marker = styles[method]
        label = f"{names[method]} {hosts} hosts"
        color = colors.get(hosts)
        style = {"linestyle": line, "marker": marker, "color": color, "label": label}
        ax_time.plot(xs, [r["total_ms"] / 1000 for r in rs], **style)
        sp = [(r["length"], r["speedup_vs_full"]) for r in rs if r.get("speedup_vs_full")]
        if sp:
            ax_speed.plot(*zip(*sp, strict=True), **style)
    lengths = sorted({r["length"] for r in runs})
    for ax in (ax_time, ax_speed):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context tokens")
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("prefill time, s (slowest host + comm + query)")
    ax_time.set_title("Prefill time")
    ax_speed.set_yscale("log", base=2)
    ax_speed.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
    ax_speed.set_ylabel("speedup over full attention on one GPU")
    ax_speed.set_title("Speedup over full attention")
    ax_speed.axhline(1.0, color="k", lw=0.8)
    ax_time.legend(fontsize=8)
    ax_speed.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(
        f"{meta['model_shape']} shapes, {meta['device']}, hosts simulated on one GPU "
        f"(comm modelled at {meta['comm_model']['bandwidth_gbps']:g} GB/s)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def summary_line(kind: str, result: dict[str, Any]) -> str:
    if result.get("status", "ok") != "ok" and "per_host" not in result:
        return result["status"]
    if kind == "breakdown":
        last = result["per_host"][-1]
        parts = ", ".join(f"{k} {v:.0f}" for k, v in last["ms"].items())
        return f"last host {last['host_ms']:.0f} ms: {parts}"
    hosts = ", ".join(f"{t:.0f}" for t in result.get("host_ms", []))
    mem = f", peak {result['peak_gib']:.1f} GiB" if "peak_gib" in result else ""
    return (
        f"total {result['total_ms']:.0f} ms (compute {result['compute_ms']:.0f} + comm {result['comm_ms']:.1f} "
        f"+ query {result['query_ms']:.0f}){' hosts [' + hosts + ']' if hosts else ''}{mem}"
    )


COMPILE_LAYERS_ARG: dict[str, Any] = {
    **FUSION_ARG,
    "help": "torch.compile every layer's norms, MLP and attention module for every method, full attention included "
    "(apb.compile_layers); BACKEND defaults to inductor",
}
"""`--compile-layers [BACKEND]`, shared with `apb.bench.dist`."""

CALIBRATE_HELP = (
    "fit the balanced split's cost model on this device at TOKENS tokens before timing (APBModel.calibrate; "
    "default: the library's weight)"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-shape", default="llama8b", choices=sorted(MODEL_SHAPES))
    p.add_argument("--lengths", type=int, nargs="+")
    p.add_argument("--hosts", type=int, nargs="+")
    p.add_argument("--primary-length", type=int, default=131072)
    p.add_argument("--query-len", type=int)
    p.add_argument("--head-hidden", type=int, help="retaining head hidden size (default: the paper's 1024)")
    p.add_argument(
        "--methods",
        nargs="+",
        help=f"full, {', '.join(APB_METHODS)} (default: full star apb apb-balanced)",
    )
    p.add_argument("--backends", nargs="+", help="candidates; the fastest is used (default: triton flex)")
    p.add_argument("--bandwidth-gbps", type=float, default=450.0)
    p.add_argument("--latency-us", type=float, default=0.0)
    p.add_argument("--warmup-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--full-skip-threshold-s", type=float, default=20.0)
    p.add_argument("--deadline-s", type=float, default=0.0)
    p.add_argument("--compile-layers", **COMPILE_LAYERS_ARG)
    p.add_argument("--calibrate", type=int, default=0, metavar="TOKENS", help=CALIBRATE_HELP)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, fp32, short lengths")
    p.add_argument("--out", type=Path, help="results JSON (rewritten after every measurement)")
    p.add_argument("--markdown", type=Path, help="write the tables here")
    p.add_argument("--plot", type=Path, help="write the PNG plot here")
    p.add_argument("--from-json", type=Path, help="only render tables / plot from an earlier results JSON")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    kwargs: dict[str, Any] = dict(
        model_shape=args.model_shape,
        primary_length=args.primary_length,
        bandwidth_gbps=args.bandwidth_gbps,
        latency_us=args.latency_us,
        warmup_layers=args.warmup_layers,
        repeats=args.repeats,
        breakdown=not args.no_breakdown,
        full_skip_threshold_s=args.full_skip_threshold_s,
        deadline_s=args.deadline_s,
        compile_layers=args.compile_layers,
        calibrate_length=args.calibrate,
    )
    if args.tiny:
        kwargs.update(
            model_shape="tiny",
            lengths=[1024, 2048],
            hosts=[2, 4],
            primary_length=2048,
            query_len=8,
            backends=["reference"],
            device="cpu",
            dtype="float32",
            head_hidden=32,
            warmup_layers=1,
        )
    for name in ("lengths", "hosts", "query_len", "methods", "backends", "head_hidden"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    return BenchConfig(**kwargs)


def main(argv: list[str] | None = None, prog: str = "python -m apb.bench.prefill") -> dict[str, Any]:
    """The command line (`parse_args`); `prog` is how the command is recorded in the results."""
    args = parse_args(argv)
    if args.from_json:
        results = finalize(json.loads(args.from_json.read_text()))
        if args.out:  # the JSON with the derived numbers of this version of the script
            args.out.write_text(json.dumps(results, indent=1))
    else:
        cfg = config_from_args(args)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --tiny for the CPU smoke test")
        command = f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)
        results = Bench(cfg, args.out, command, log=lambda line: print(line, flush=True)).run()
    table = markdown(results)
    print(table, flush=True)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
