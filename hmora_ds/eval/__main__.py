"""``python -m hmora_ds.eval``: the same command line as ``launchers/eval.py``."""

import sys

from hmora_ds.eval.cli import main

sys.exit(main())
