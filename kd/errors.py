"""User-facing failures: one clear line on stderr, a non-zero exit, no traceback."""

import signal
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (bad input, missing data, wrong checkpoint)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, what SLURM, Kubernetes, torchrun and `timeout` send before they kill: the run stops as
    on Ctrl-C (the last finished epoch kept, the resume command printed), with exit status 143."""


def _terminate(signum, frame):
    raise Terminated()


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main; turn UserError, Ctrl-C and SIGTERM into a one-line message and exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
