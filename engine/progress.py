"""Progress for long work: a tqdm bar on a TTY, a periodic log line otherwise (CI, nohup, SLURM)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
log = logging.getLogger("geoexplora.progress")


class _LogProgress:
    """The non-TTY stand-in for tqdm: logs ``desc: n/total (rate/s)`` at most every ``interval`` s."""

    def __init__(self, iterable, total, desc, unit, interval):
        self.iterable, self.total, self.desc, self.unit, self.interval = iterable, total, desc, unit, interval
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(now)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def _emit(self, now: float) -> None:
        rate = self.n / max(now - self._start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        extra = f" {self.postfix}" if self.postfix else ""
        log.info("%s: %d%s %s (%.1f %s/s)%s", self.desc, self.n, of, self.unit, rate, self.unit, extra)

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)

    def close(self) -> None:
        if self.interval != float("inf"):
            self._emit(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(
    iterable: Optional[Iterable[T]] = None,
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    interval: float = 10.0,
    disable: bool = False,
):
    """tqdm on an interactive stderr, else periodic log lines; ``disable`` (e.g. non-zero ranks) silences both."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not disable and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
    if disable:
        interval = float("inf")
    return _LogProgress(iterable if iterable is not None else [], total, desc, unit, interval)


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Plain timestamped log lines; ranks other than 0 only print warnings and errors."""
    fmt = "%(asctime)s %(levelname).1s " + (f"[rank{rank}] " if rank else "") + "%(name)s: %(message)s"
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S",
                        force=True)
