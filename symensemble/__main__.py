"""``python -m symensemble`` and the ``symensemble`` console script: run the command line.

:func:`run` is the entry point. It imports the command line (click, torch and the commands:
seconds on a cold start) inside a guard, so Ctrl-C during start-up ends with one line and
exit status 130 (128 + SIGINT), not a traceback from deep inside an import. Ctrl-C once a
command runs is the command's own affair (``train`` says how to resume).
"""

from __future__ import annotations

import sys

#: Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def run() -> None:
    """Import the command line and run it; Ctrl-C while importing exits 130 with one line."""
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("symensemble: interrupted (Ctrl-C) while starting up; nothing was run", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    main()


if __name__ == "__main__":
    run()
