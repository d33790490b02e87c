#!/usr/bin/env python
"""Generation speed on one GPU: APB's decoding steps (eager and replayed from a CUDA graph) against
transformers' own loop over a DynamicCache; the time to the first token and per token.

    python scripts/bench_generate.py --json generate.json
    python scripts/bench_generate.py --tiny     # CPU smoke test

The benchmark is library code, `apb.bench.generate` (``python -m apb.bench.generate`` is the same); its
docstring says what is timed and how.
"""

from apb.bench.generate import main
from apb.comm import exit_rank

if __name__ == "__main__":
    main()
    exit_rank(0)
