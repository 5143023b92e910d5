"""The user-facing error type and the CLI wrapper that turns it into one line + exit code 2."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input the user can fix (a flag, a path, a file). Printed as one line, no traceback.

    The message should name the flag/file and say what to do, e.g.
    ``--data.shards 'x/*.tar' matched no files; check the path or run geoexplora-convert first``.
    """


def cli_entry(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a launcher's ``main``: UserError -> ``error: ...`` on stderr, exit 2; Ctrl-C -> exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        return int(rc or 0)

    return wrapper
