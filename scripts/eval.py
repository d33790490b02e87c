"""RULER-style accuracy of full attention, Star Attention and APB: the same as ``python -m apb.eval``
(the evaluation lives in the library, `apb.eval`; see its docstring for tasks, methods and scoring).

    python scripts/eval.py --num-samples 50                      # SmolLM2-135M-Instruct, GPU if present
    python scripts/eval.py --num-samples 2 --lengths 2048        # CPU smoke run
    python scripts/eval.py --prepare runs/eval_items.json.gz     # only build and save the eval set
"""

import sys

from apb.eval import main

if __name__ == "__main__":
    sys.exit(main())
