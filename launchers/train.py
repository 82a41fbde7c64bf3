#!/usr/bin/env python
"""Entry point: ``deepspeed launchers/train.py --deepspeed ds_configs/zero2.json [...]``.

Also ``torchrun --nproc_per_node N launchers/train.py ...`` and ``python launchers/train.py ...``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmora_ds.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
