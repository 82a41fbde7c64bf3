"""``python -m hmora_ds``: the ``hmora-ds`` command (:mod:`hmora_ds.cli`)."""

import sys

from hmora_ds.cli import main

sys.exit(main())
