"""User-facing failures: one clear line on stderr, a non-zero exit, no traceback."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (bad input, missing data, wrong checkpoint)."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main; turn UserError and Ctrl-C into a one-line message and exit code."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
