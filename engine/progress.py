"""Progress for long work: a tqdm bar on a TTY, a periodic log line with rate, elapsed time and ETA
otherwise (CI, nohup, SLURM)."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("geoexplora.progress")


def _clock(seconds: float) -> str:
    """``H:MM:SS`` (``1 day, H:MM:SS`` past a day), as tqdm and SLURM show durations."""
    return str(datetime.timedelta(seconds=int(seconds)))


class _LogProgress:
    """The non-TTY stand-in for tqdm, for logs that CI, nohup and SLURM keep.

    Logs ``desc: n/total unit (rate unit/s, elapsed H:MM:SS, eta H:MM:SS) postfix`` every ``every``
    updates (when given: the trainer's ``train.log_every``), else at most every ``interval`` s, and
    once more on close. ``initial``: the count already done before this process (a resumed run's
    start step); the rate and ETA count only what this process did.
    """

    def __init__(self, iterable, total, desc, unit, interval, every=None, initial=0):
        self.iterable, self.total, self.desc, self.unit, self.interval = iterable, total, desc, unit, interval
        self.every, self.initial = every, initial
        self.n = self._emitted = initial
        self.postfix = ""
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.interval == float("inf"):
            return
        now = time.monotonic()
        if self.every:
            due = self.n // self.every > (self.n - n) // self.every or self.n == self.total
        else:
            due = now - self._last >= self.interval
        if due:
            self._emit(now)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def _emit(self, now: float) -> None:
        self._last, self._emitted = now, self.n
        elapsed = now - self._start
        rate = (self.n - self.initial) / max(elapsed, 1e-9)
        of = f"/{self.total}" if self.total else ""
        timing = f"elapsed {_clock(elapsed)}"
        if self.total:
            timing += f", eta {_clock((self.total - self.n) / rate) if rate > 0 else '?'}"
        extra = f" {self.postfix}" if self.postfix else ""
        speed = f"{rate:.1f} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/{self.unit}"
        log.info("%s: %d%s %s (%s, %s)%s", self.desc, self.n, of, self.unit, speed, timing, extra)

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)

    def close(self) -> None:
        if self.interval != float("inf") and self._emitted != self.n:
            self._emit(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(
    iterable: Iterable[T] | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    interval: float = 10.0,
    disable: bool = False,
    every: int | None = None,
    initial: int = 0,
):
    """tqdm on an interactive stderr, else log lines with rate, elapsed time and ETA: every ``every``
    updates when given, else at most every ``interval`` s. ``initial``: count already done (resume).
    ``disable`` (e.g. non-zero ranks) silences both."""
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    if not disable and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
    if disable:
        interval = float("inf")
    return _LogProgress(iterable if iterable is not None else [], total, desc, unit, interval, every, initial)


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Plain timestamped log lines; ranks other than 0 only print warnings and errors."""
    fmt = "%(asctime)s %(levelname).1s " + (f"[rank{rank}] " if rank else "") + "%(name)s: %(message)s"
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S", force=True)
