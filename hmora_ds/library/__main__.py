import sys

from hmora_ds.library.cli import main

sys.exit(main())
