"""``python -m hmora_ds.analyze <subcommand>``: the command line of :mod:`hmora_ds.analysis`.

Only an entry point (the code lives in the ``analysis`` package); subcommands: ``routing``,
``task-repr``.
"""

import sys

if __name__ == "__main__":
    from hmora_ds.analysis.cli import main
    from hmora_ds.runtime.dist import setup_logging

    setup_logging(0)
    sys.exit(main())
