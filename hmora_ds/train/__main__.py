"""``python -m hmora_ds.train`` (``hmora-ds train``): the same command line as
``launchers/train.py``; several ranks with ``deepspeed --module hmora_ds.train …`` or
``torchrun -m hmora_ds.train …``."""

import sys

from hmora_ds.train.cli import main

sys.exit(main())
