"""Bar chart of an accuracy run: the same as ``python -m apb.eval.plot`` (library code: `apb.eval.plot`).

python scripts/plot_accuracy.py benchmarks/accuracy_results_gpu.json benchmarks/accuracy_smollm2.png
"""

import sys

from apb.eval.plot import main

if __name__ == "__main__":
    sys.exit(main())
