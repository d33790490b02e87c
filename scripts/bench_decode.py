#!/usr/bin/env python
"""Decoding attention: the split-key kernel `decode_attention` runs against the prefill kernel's decoding form,
FlashAttention-4 and SDPA, over one host's keys on one GPU.

    python scripts/bench_decode.py --json decode.json
    TRITON_INTERPRET=1 python scripts/bench_decode.py --tiny     # CPU smoke test through Triton's interpreter

The benchmark is library code, `apb.bench.decode` (``python -m apb.bench.decode`` is the same); its docstring
says what is timed and how.
"""

from apb.bench.decode import main

if __name__ == "__main__":
    main()
