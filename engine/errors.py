"""The user-facing error type, the CLI wrapper that turns it into one line + exit code 2, and the
translation of file-system failures (read-only, full, not a directory, no permission) into it."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path


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


# errno -> what the user should do about it
_FS_ADVICE = {
    errno.ENOSPC: "free space there or choose another directory",
    errno.EDQUOT: "free space (disk quota exceeded) or choose another directory",
    errno.EROFS: "the file system is mounted read-only; choose a writable directory",
    errno.EACCES: "no permission to write there; choose a directory you can write to",
    errno.EPERM: "no permission to write there; choose a directory you can write to",
    errno.ENOTDIR: "a component of the path is a regular file; choose another directory",
    errno.EEXIST: "a regular file is in the way; remove it or choose another directory",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
}


def probe_writable(path: str | os.PathLike) -> OSError | None:
    """Why ``path`` (a directory, created with its parents if missing) cannot take a new file, or
    None. Writes and removes a 1-byte hidden file, so a full disk shows as well as a read-only one."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            return FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return e
    probe = path / f".tmp-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return OSError(e.errno, e.strerror, str(path))  # the directory is the news, not the probe's name
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def fs_user_error(err: BaseException, path: str | os.PathLike, flag: str, doing: str) -> UserError | None:
    """A one-line UserError for a write into ``path`` that failed with ``err``, or None when the
    failure is not the file system's fault (then the caller re-raises ``err``).

    ``err`` may carry no usable errno -- torch.save reports a full disk as a RuntimeError of its zip
    writer -- so when it does not, the directory itself is probed (:func:`probe_writable`).
    flag: the option that named the directory (``--train.output_dir``); doing: what was being
    written (``writing checkpoint step_00000300``).
    """
    cause = err if isinstance(err, OSError) and err.errno in _FS_ADVICE else probe_writable(path)
    if cause is None or cause.errno not in _FS_ADVICE:
        return None
    reason = (cause.strerror or os.strerror(cause.errno)).lower()
    where = f" ({cause.filename})" if cause.filename and Path(cause.filename) != Path(path) else ""
    return UserError(f"{flag} '{path}': {reason}{where} while {doing}; {_FS_ADVICE[cause.errno]}")
