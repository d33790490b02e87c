#!/usr/bin/env python
"""Prefill speed: full attention vs Star Attention vs APB, hosts simulated one after another on one GPU.

    python scripts/bench_prefill.py --out benchmarks/prefill_results.json            # GPU, Llama-3.1-8B shapes
    python scripts/bench_prefill.py --model-shape qwen14b --lengths 32768 65536 ...  # Qwen-2.5-14B shapes
    python scripts/bench_prefill.py --tiny --out runs/bench/tiny.json                # CPU smoke test, seconds
    python scripts/bench_prefill.py --from-json benchmarks/prefill_results.json \\
        --markdown benchmarks/prefill_results.md --plot benchmarks/prefill_speed.png  # tables + plot only

The benchmark is library code, `apb.bench.prefill` (``python -m apb.bench.prefill`` is the same); its
docstring says what is timed and how.
"""

from apb.bench.common import MODEL_SHAPES  # noqa: F401  (scripts/bench_apb_prefill.py takes it from here)
from apb.bench.prefill import main

if __name__ == "__main__":
    main(prog="python scripts/bench_prefill.py")
