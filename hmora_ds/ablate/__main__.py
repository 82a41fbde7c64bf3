"""``python -m hmora_ds.ablate``: see :mod:`hmora_ds.ablate.cli`."""

import sys

from hmora_ds.ablate.cli import main

sys.exit(main())
