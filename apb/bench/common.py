"""What the simulated and the distributed prefill benchmarks share: model shapes, timers, full attention
on its fastest SDPA kernel, and small helpers over result rows."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama8b": dict(
        family="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=262144 + 1024,
        rope_theta=500000.0,
    ),
    "qwen14b": dict(
        family="qwen2",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        max_position_embeddings=262144 + 1024,
        rope_theta=1000000.0,
    ),
    "tiny": dict(
        family="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=16384,
        rope_theta=10000.0,
    ),
}
"""Benchmark model shapes (random weights): Llama-3.1-8B, Qwen-2.5-14B, and a tiny CPU one. ``family``
picks the transformers config class; the rest are its fields."""


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A causal LM of `MODEL_SHAPES[shape]` with random weights, built on `device` (SDPA attention)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    fields = dict(MODEL_SHAPES[shape])
    family = fields.pop("family")
    config = LlamaConfig(**fields) if family == "llama" else Qwen2Config(**fields, use_sliding_window=False)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


# ---------------------------------------------------------------- timers


class Clock:
    """Time markers: recorded CUDA events on the GPU (no synchronisation), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two markers (call after `sync`)."""
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class TokenClock:
    """A streamer (`put(ids)` / `end()`, as transformers' streamers) that notes when each generated token
    arrives: the first `put` is the prompt, every later one a step's token (on the CPU, so the GPU is done)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.arrivals: list[float] = []
        self._prompt_seen = False

    def put(self, ids: Any) -> None:
        if self._prompt_seen:
            self.arrivals.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    def step_ms(self) -> list[float]:
        """The intervals between consecutive tokens, in ms (each covers one whole decoding step)."""
        return [(b - a) * 1000.0 for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]

    def summary(self) -> str | None:
        """The line to print (`first token after 1.23 s (prefill and query), then 31 tokens at 12.3
        tokens/s`), or None before any token."""
        if not self.arrivals:
            return None
        line = f"first token after {self.arrivals[0] - self.started:.2f} s (prefill and query)"
        rest = len(self.arrivals) - 1
        if rest and self.arrivals[-1] > self.arrivals[0]:
            line += f", then {rest} tokens at {rest / (self.arrivals[-1] - self.arrivals[0]):.1f} tokens/s"
        return line


class DecoderRecorder:
    """Forward pre/post hooks on the decoder: one record per decoder call (APB: one per host, then the
    query pass; full: one) with time markers and, on CUDA, the memory allocated at the start and the peak
    during the call (peak stats are reset at the call's start)."""

    def __init__(self, decoder: nn.Module, clock: Clock):
        self.clock = clock
        self.calls: list[dict[str, Any]] = []
        self.active = False
        decoder.register_forward_pre_hook(self._pre)
        decoder.register_forward_hook(self._post, always_call=True)  # APB stops a host at its last layer

    def _pre(self, _module, _args) -> None:
        if not self.active:
            return
        record: dict[str, Any] = {"start": self.clock.mark()}
        if self.clock.cuda:
            torch.cuda.reset_peak_memory_stats()
            record["alloc_start"] = torch.cuda.memory_allocated()
        self.calls.append(record)

    def _post(self, _module, _args, _output) -> None:
        if not self.active:
            return
        record = self.calls[-1]
        record["end"] = self.clock.mark()
        if self.clock.cuda:
            record["peak"] = torch.cuda.max_memory_allocated()

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[dict[str, Any]]]:
        self.calls, self.active = [], True
        try:
            yield self.calls
        finally:
            self.active = False

    @property
    def current_call(self) -> int:
        return len(self.calls) - 1


# ---------------------------------------------------------------- communication model


def comm_ms(
    *,
    num_layers: int,
    num_hosts: int,
    max_passing: int,
    num_kv_heads: int,
    head_dim: int,
    bytes_per_element: int,
    bandwidth_gbps: float,
    latency_us: float = 0.0,
    shared_anchor: int = 0,
) -> float:
    """Modelled time of a prefill's per-layer exchanges, in ms:

        (num_layers - 1) * ((H - 1) * P * kv + A * kv + latency per collective),  kv = num_kv_heads *
        head_dim * 2 (K and V) * bytes / B

    (the last layer exchanges nothing: there a host only stores its K/V, `apb.attention.ContextStored`).
    P is the largest passing block (the all-gather pads every host's block to it, as `DistributedComm`
    does), A the anchor host 0 broadcasts (`shared_anchor`, 0: none), B the bus bandwidth per GPU: an
    all-gather of H pieces of S bytes moves (H - 1) / H * (H * S) bytes into each GPU, a broadcast S."""
    if num_hosts < 2 or (max_passing == 0 and shared_anchor == 0):
        return 0.0
    per_token = num_kv_heads * head_dim * 2 * bytes_per_element  # K and V of one token
    per_layer_s = 0.0
    for tokens in ((num_hosts - 1) * max_passing, shared_anchor):
        if tokens:
            per_layer_s += tokens * per_token / (bandwidth_gbps * 1e9) + latency_us * 1e-6
    return (num_layers - 1) * per_layer_s * 1000.0


# ---------------------------------------------------------------- full attention's kernel

FULL_KERNELS = ("fa4", "cudnn", "flash", "efficient")
"""Full attention's kernels in order of preference, the fastest first (dense causal attention at Llama-8B
shapes on an H200, `scripts/bench_kernel.py`): FlashAttention-4 (~650-675 TFLOP/s; only when
``flash-attn-4`` is installed), then SDPA's cuDNN (~550-615), FlashAttention-2 (~340) and memory-efficient
kernels. Never SDPA's math kernel unless none of them runs the shape (it holds the whole [seq, seq] score
matrix)."""

SDPA_KERNELS = FULL_KERNELS[1:]
"""The SDPA kernels among `FULL_KERNELS`."""

_SDP_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
}
KERNEL_LABELS = {
    "fa4": "FlashAttention-4",
    "cudnn": "sdpa cuDNN",
    "flash": "sdpa FlashAttention-2",
    "efficient": "sdpa memory-efficient",
}
FA4_ATTENTION = "apb_bench_fa4_causal"
"""The transformers attention implementation name under which full attention runs on FA4."""
SDPA_ATTENTION = "apb_bench_sdpa"
"""The name under which full attention runs on SDPA (transformers' own SDPA function)."""


@contextlib.contextmanager
def sdpa_kernel_only(kernel: str | None) -> Iterator[None]:
    """Inside the block, SDPA on CUDA runs only `kernel` (a `SDPA_KERNELS` name; None: torch's own choice,
    math kernel included). A no-op without CUDA (the CPU has its own kernels)."""
    if kernel is None or not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDP_BACKENDS[kernel], None)
    if backend is None:  # this torch has no such kernel (cuDNN came in 2.2)
        raise RuntimeError(f"No available kernel: torch {torch.__version__} has no SDPA {kernel} backend")
    with sdpa_kernel([backend]):
        yield


def _fa4_causal_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: dense causal attention on FA4 (no padding, no dropout).
    query: [batch, heads, seq, head_dim], key/value: [batch, kv_heads, seq, head_dim] ->
    ([batch, seq, heads, head_dim], None)."""
    from apb.kernels.flash4 import causal_attention_fa4

    if attention_mask is not None:
        raise RuntimeError("No available kernel: the FA4 full-attention baseline runs unpadded inputs only")
    out, _ = causal_attention_fa4(query, key, value, softmax_scale=scaling)
    return out.transpose(1, 2), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """transformers mask function for `FA4_ATTENTION`: the kernel is causal itself."""
    return None


@contextlib.contextmanager
def full_attention_kernel(model: nn.Module, kernel: str | None) -> Iterator[None]:
    """Inside the block, the unmodified `model`'s attention runs on `kernel` (a `FULL_KERNELS` name):
    "fa4" switches its attention implementation to FlashAttention-4 dense causal for the duration; the
    SDPA names restrict SDPA as `sdpa_kernel_only` does (None: torch's own choice)."""
    if kernel != "fa4":
        if model is None:
            with sdpa_kernel_only(kernel):
                yield
            return
        from transformers.masking_utils import sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        with sdpa_kernel_only(kernel), _attention_function(model, SDPA_ATTENTION, sdpa, sdpa_mask):
            yield
        return
    from apb.kernels.flash4 import fa4_available

    if not fa4_available():
        raise RuntimeError("No available kernel: flash-attn-4 is not installed")
    with _attention_function(model, FA4_ATTENTION, _fa4_causal_forward, _no_mask):
        yield


@contextlib.contextmanager
def _attention_function(model: nn.Module, name: str, attention: Callable, mask: Callable) -> Iterator[None]:
    """`model`'s attention runs through `attention` (registered with transformers as `name`) inside the
    block. It is registered opaque to `torch.compile`: a model whose attention modules are compiled
    (`apb.compile_layers`) calls it as it is, so the kernel chosen here is the one that runs."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from apb.attention import set_implementation

    AttentionInterface.register(name, torch.compiler.disable(attention))
    AttentionMaskInterface.register(name, mask)
    previous = model.config._attn_implementation
    set_implementation(model, name)
    try:
        yield
    finally:
        set_implementation(model, previous)


def first_working_kernel(
    run: Callable[[], T],
    *,
    cuda: bool,
    log: Callable[[str], None] = lambda _: None,
    model: nn.Module | None = None,
) -> tuple[T, str | None, list[str]]:
    """Call `run` (a warm-up forward at the timed shapes) under each of `FULL_KERNELS` in turn until one
    runs: ``(its result, the kernel, why the ones before it failed)``. FA4 is tried only with `model`
    given and ``flash-attn-4`` importable. The kernel is None (torch's own choice) when none of them
    runs, and on the CPU, where only `run` is called."""
    if not cuda:
        return run(), None, []
    from apb.kernels.flash4 import fa4_available

    failures = []
    for kernel in FULL_KERNELS:
        if kernel == "fa4" and (model is None or not fa4_available()):
            continue
        try:
            with full_attention_kernel(model, kernel):
                return run(), kernel, failures
        except torch.cuda.OutOfMemoryError:  # a RuntimeError too, but no kernel would help
            raise
        except (RuntimeError, ValueError) as error:  # no such kernel for this shape / dtype / GPU
            failures.append(f"{kernel}: {str(error).splitlines()[0][:200]}")
            log(f"full attention's {kernel} kernel failed here ({failures[-1]}); trying the next")
    return run(), None, failures


def full_attention_label(kernel: str | None, cuda: bool) -> str:
    """How full attention ran, for results and tables: ``"sdpa cuDNN"``, ``"FlashAttention-4"``..."""
    if not cuda:
        return "sdpa, CPU"
    return KERNEL_LABELS[kernel] if kernel else "sdpa, torch's choice"


# ---------------------------------------------------------------- FLOP bound


def measure_rates(
    config: Any,
    device: torch.device,
    dtype: torch.dtype,
    backend: str,
    *,
    num_tokens: int = 16384,
    repeats: int = 10,
    trials: int = 3,
) -> dict[str, float]:
    """What this GPU sustains on a host's two kinds of work, in TFLOP/s: ``matmul`` (a [num_tokens,
    hidden] x [hidden, intermediate] GEMM, the MLP's up-projection) and ``attention`` (the APB attention
    `backend` run dense causal over `num_tokens` tokens at the model's head shape). The FLOP bound of a
    host (`flop_bound_ms`) divides its work by these. Each rate is the best of `trials` timings of
    `repeats` calls: a bound should not loosen because one timing caught the GPU busy or clocked down
    (single timings of the attention probe were seen 8% apart on one GPU)."""
    from apb.backends import get_backend

    clock = Clock(device)
    hidden, intermediate = config.hidden_size, config.intermediate_size
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads

    a = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, intermediate, device=device, dtype=dtype)
    matmul_s = best_time(lambda: a @ b, clock, repeats=repeats, trials=trials)
    attend = get_backend(backend, device)
    q = torch.randn(1, num_heads, num_tokens, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, num_kv_heads, num_tokens, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    attention_s = best_time(
        lambda: attend(q, k, v, num_passing=0, num_anchor=0), clock, repeats=repeats, trials=trials
    )
    pairs = num_tokens * (num_tokens + 1) / 2
    return {
        "matmul": 2.0 * num_tokens * hidden * intermediate / matmul_s / 1e12,
        "attention": 4.0 * pairs * num_heads * head_dim / attention_s / 1e12,
    }


def best_time(fn: Callable[[], Any], clock: Any, *, repeats: int, trials: int) -> float:
    """Seconds per call of `fn`: one warm-up call (and compile), then the fastest of `trials` timings of
    `repeats` calls each, timed with `clock` (a `Clock`: mark / ms / sync)."""
    fn()
    best = math.inf
    for _ in range(trials):
        clock.sync()
        start = clock.mark()
        for _ in range(repeats):
            fn()
        end = clock.mark()
        clock.sync()
        best = min(best, clock.ms(start, end) / repeats / 1000.0)
    return best


def flop_bound_ms(plan: Any, cost: Any, rates: dict[str, float]) -> list[float]:
    """Every host's FLOP bound under `plan` (an `apb.HostPlan`): its token-linear work (QKV, O, MLP, from
    `cost`, an `apb.plan.CostModel`, whose FLOPs count, not its attention weight) at the measured matmul rate plus its
    attention work at the measured attention rate (`measure_rates`), in ms. What the retaining heads,
    top-k, norms, RoPE and the rest add is the gap between a host's busy time and this bound."""
    bounds = []
    for tokens, pairs in plan.work():  # FLOPs, each kind at its own measured rate
        linear, attention = cost.flops_per_token * tokens, cost.flops_per_pair * pairs
        seconds = linear / (rates["matmul"] * 1e12) + attention / (rates["attention"] * 1e12)
        bounds.append(seconds * 1000.0)
    return bounds


# ---------------------------------------------------------------- result rows


def method_label(run: dict[str, Any]) -> str:
    """A row's method for a table; full attention says how it ran: ``"full (sdpa cuDNN)"``."""
    if run["method"] == "full" and run.get("full_attention"):
        return f"full ({run['full_attention']})"
    return run["method"]


def median(samples: list[tuple[float, Any]]) -> tuple[float, Any]:
    """The sample with the median key (the lower middle one for an even count)."""
    ordered = sorted(samples, key=lambda s: s[0])
    return ordered[(len(ordered) - 1) // 2]


def find_run(runs: list[dict], method: str, length: int | None, hosts: int | None) -> dict | None:
    """The first row of `method` at `length` and `hosts`, or None."""
    for r in runs:
        if r["method"] == method and r["length"] == length and r["hosts"] == hosts:
            return r
    return None


def skipped_run(method: str, length: int, hosts: int, status: str) -> dict[str, Any]:
    """A row for a setting that did not run, saying why."""
    return {"method": method, "length": length, "hosts": hosts, "status": status}


def fmt(value: float | None, suffix: str = "") -> str:
    """A ratio or time for a table: 2 decimals below 10, 1 above; "—" for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.2f}{suffix}" if value < 10 else f"{value:.1f}{suffix}"


def context_label(length: int) -> str:
    """``131072`` -> ``"128K"``."""
    return f"{length // 1024}K" if length >= 1024 else str(length)


def package_version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "unknown"
