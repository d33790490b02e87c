"""``python -m apb.eval``: see `apb.eval`."""

import sys

from apb.eval.cli import main

sys.exit(main())
