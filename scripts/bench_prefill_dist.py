#!/usr/bin/env python
"""Prefill speed with real hosts: one host per torch.distributed rank (NCCL on GPUs, gloo on the CPU).

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 8 scripts/bench_prefill_dist.py \\
        --lengths 32768 65536 131072 --out runs/bench/dist.json --markdown runs/bench/dist.md \\
        --simulated-json benchmarks/prefill_results.json
    torchrun --nproc-per-node 2 scripts/bench_prefill_dist.py --tiny --out runs/bench/d.json   # CPU, gloo

The benchmark is library code, `apb.bench.dist` (``torchrun ... -m apb.bench.dist`` is the same); its
docstring says what is timed and how.
"""

from apb.bench.dist import main
from apb.comm import exit_rank

if __name__ == "__main__":
    main(prog="scripts/bench_prefill_dist.py")
    exit_rank(0)
