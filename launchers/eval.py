#!/usr/bin/env python
"""Entry point: ``python launchers/eval.py --model <base> [--adapter DIR] --benchmarks all``.

Also ``deepspeed launchers/eval.py ...`` and ``torchrun --nproc_per_node N launchers/eval.py ...``
(questions sharded across the ranks). See ``docs/eval.md``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmora_ds.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
