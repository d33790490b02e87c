"""Fetch SmolLM2-135M-Instruct and the Gutenberg texts into ~/.cache/apb-retain and print their paths:
the same as ``python -m apb.eval.assets`` (library code: `apb.eval.assets`).

    python scripts/assets.py            # fetch both, convert SmolLM2 to a plain HF folder, print paths
"""

import sys

from apb.eval.assets import main

if __name__ == "__main__":
    sys.exit(main())
