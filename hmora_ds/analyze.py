"""``python -m hmora_ds.analyze <subcommand>`` (``hmora-ds analyze``): the command line of
:mod:`hmora_ds.analysis`.

Only an entry point (the code lives in the ``analysis`` package); subcommands: ``routing``,
``task-repr``.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    """Configure logging for a command-line run, then run the subcommand."""
    from hmora_ds.analysis.cli import main as run
    from hmora_ds.runtime.dist import setup_logging

    setup_logging(0)
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
