"""The converter's process pool: it survives a worker dying (a GDAL segfault, the kernel's OOM killer).

``multiprocessing.Pool`` waits forever for the result of a task whose worker died. This pool knows
which task each worker holds and watches every worker's process sentinel, so a death is seen at
once: the item the worker was on comes back as a :class:`Crash` (with the last :func:`note` the
worker sent, e.g. the file it was reading), a replacement worker starts, and the rest goes on. The
caller decides what a crash means (the converter skips that input and records it in skipped.jsonl).

One duplex pipe per worker. Parent -> worker: ``("fn", fn)`` once per :meth:`WorkerPool.run`,
``("task", [(index, item), ...])``, ``None`` to exit. Worker -> parent: ``("note", text)``,
``("result", index, value)`` after each item, ``("error", index, exc, traceback)``, ``("idle",)``,
``("alive",)`` from :func:`tick`.
A worker holds at most one task (a chunk of items), so a crash blames exactly one item. Workers
that keep dying with no item finishing in between (2 per worker + 4 in a row: a broken
environment, not a bad input) stop the run with :class:`WorkerCrashed`.

A worker that hangs instead of dying (a read stuck on a stalled network file system, a driver that
loops) is bounded too: with ``stall_s`` set, a worker that holds an item and sends nothing for that
long -- no note, no result, no :func:`tick` ping -- is killed, and its item comes back as a
:class:`Crash` that says so. Work that takes long but moves calls :func:`tick` (the converter
does once per chip), so only silence counts.

Workers ignore SIGINT and SIGTERM: stopping is the parent's job. Ctrl-C or ``kill -TERM`` (to the
parent or its whole process group) unwinds the parent, which kills its workers and removes partial
files. A worker never outlives its parent: on Linux it gets SIGKILL when the parent dies
(PR_SET_PDEATHSIG); elsewhere it exits at its next read of the closed pipe.

With ``workers == 1`` items run in the calling process (no pickling, a debugger works); a crash of
the reader then ends the whole run, which ``--resume`` continues.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_JOIN_S = 10.0  # bound on waiting for a worker to exit after it was told to (or killed)
_MAX_DEATHS = 4  # deaths in a row (no result between them) allowed beyond 2 per worker
_PING_S = 1.0  # tick() sends at most one ping per this many seconds
_CONN = None  # in a worker: the pipe to the parent (note() writes to it)
_LAST_PING = 0.0

_SIGNAL_HINTS = {
    "SIGSEGV": "segmentation fault, e.g. in GDAL or a codec",
    "SIGBUS": "bus error: a file changed or vanished while mapped",
    "SIGABRT": "aborted by a library assertion",
    "SIGKILL": "the kernel's out-of-memory killer? see dmesg; fewer --workers use less memory",
}


@dataclass
class Crash:
    """The result of an item whose worker died while running it."""

    exitcode: int | None
    note: str | None = None  # the last note() the worker sent for this item, if any
    stalled_s: float | None = None  # set when the pool killed the worker for sending nothing that long

    def how(self) -> str:
        """'died from SIGSEGV (segmentation fault, ...)' / 'exited with code 3' / 'sent no sign of ...'."""
        if self.stalled_s is not None:
            return (
                f"showed no progress for {self.stalled_s:g} s and was killed (a read hung on a stalled "
                "network file system, or a stuck driver?)"
            )
        code = self.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = _SIGNAL_HINTS.get(name)
            return f"died from {name}" + (f" ({hint})" if hint else "")
        return f"exited with code {code} without finishing"


class WorkerCrashed(RuntimeError):
    """A worker died where no input can be blamed (e.g. while writing a shard): the run stops."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the ``__cause__`` of the re-raised exception."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def note(text: str | None) -> None:
    """From inside an item's work: tell the parent what this worker is on now (the input it opens
    next; None when it reads none), so that a crash is blamed on it. No-op outside a pool worker."""
    if _CONN is not None:
        _CONN.send(("note", text))


def tick() -> None:
    """From inside an item's work: tell the parent this worker is moving (at most one message per
    second), so that long but healthy work is not taken for a hang. No-op outside a pool worker."""
    global _LAST_PING
    if _CONN is None:
        return
    now = time.monotonic()
    if now - _LAST_PING >= _PING_S:
        _LAST_PING = now
        _CONN.send(("alive",))


def _context():
    """fork where it is safe (no other Python threads; the converter's parent holds no open raster):
    workers start in milliseconds instead of re-importing numpy and rasterio (~1 s each on a loaded
    2-core machine), and so do replacements after a crash. Otherwise spawn."""
    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed pipe ends the worker instead
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(conn, initializer: Callable[[], None] | None, parent_pid: int) -> None:
    global _CONN
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    if initializer is not None:
        initializer()
    _CONN = conn
    fn: Callable[[Any], Any] | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        if msg[0] == "fn":
            fn = msg[1]
            continue
        for index, item in msg[1]:
            try:
                if fn is None:
                    raise RuntimeError("converter pool: an item arrived before the function to apply")
                value = fn(item)
            except Exception as e:  # noqa: BLE001 - the parent re-raises it and stops the run
                conn.send(("error", index, _picklable(e), traceback.format_exc()))
                break
            conn.send(("result", index, value))
        conn.send(("idle",))


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - whatever pickling refuses, the parent gets the message
        return RuntimeError(f"{e.__class__.__name__}: {e}")


class _Worker:
    def __init__(self, ctx, initializer):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, initializer, os.getpid()), daemon=True)
        self.proc.start()
        child.close()
        self.task: list | None = None  # [(index, item), ...] not yet answered; None when idle
        self.note: str | None = None
        self.heard = time.monotonic()  # when it was last given a task or last sent anything
        self.stalled = False

    def send(self, msg) -> bool:
        try:
            self.conn.send(msg)
            return True
        except OSError:  # died while idle
            return False

    def stop(self, kill: bool) -> None:
        if kill:
            self.proc.kill()
        else:
            self.send(None)
        self.proc.join(_JOIN_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(_JOIN_S)
        self.conn.close()


class WorkerPool:
    """``workers`` processes (none when 1) running :meth:`run`'s items; see the module docstring."""

    def __init__(self, workers: int, initializer: Callable[[], None] | None = None, stall_s: float | None = None):
        self.initializer = initializer
        self.stall_s = stall_s or None  # seconds of silence after which a busy worker is killed; None: never
        self.ctx = _context() if workers > 1 else None
        self.workers = [_Worker(self.ctx, initializer) for _ in range(workers)] if self.ctx else []
        self.deaths = 0  # in a row, since the last result

    def run(self, fn: Callable, items: Iterable, chunk: int = 1) -> Iterator[tuple[int, object]]:
        """Apply ``fn`` to every item; yield ``(position in items, fn(item) or Crash)`` in completion
        order. An exception raised by ``fn`` is re-raised here, the worker's traceback as its cause.
        A run abandoned part-way (an exception in the caller's loop) leaves the pool fit only for
        ``close(abort=True)``."""
        items = list(items)
        if self.ctx is None:
            for i, item in enumerate(items):
                yield i, fn(item)
            return
        queue = deque([list(enumerate(items))[i : i + chunk] for i in range(0, len(items), max(1, chunk))])
        self.fn = fn
        for k, w in enumerate(self.workers):
            if not w.send(("fn", fn)):
                self.workers[k] = self._replace(w, queue)
        while queue or any(w.task is not None for w in self.workers):
            for k, w in enumerate(self.workers):
                while w.task is None and queue:
                    w.task, w.note, w.heard = queue.popleft(), None, time.monotonic()
                    if not w.send(("task", w.task)):
                        w = self.workers[k] = self._replace(w, queue)
            busy = [w for w in self.workers if w.task is not None]
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], self._time_left(busy)))
            for w in busy:
                if self.stall_s is not None and w.conn not in ready and w.proc.sentinel not in ready:
                    if time.monotonic() - w.heard >= self.stall_s:
                        w.stalled = True
                        w.proc.kill()
                        w.proc.join(_JOIN_S)
                        ready.add(w.proc.sentinel)
            for k, w in enumerate(self.workers):
                if w.task is not None and (w.conn in ready or w.proc.sentinel in ready):
                    yield from self._serve(k, w, queue)

    def _time_left(self, busy: list[_Worker]) -> float | None:
        """Seconds until the first busy worker's silence reaches ``stall_s`` (None: wait without bound)."""
        if self.stall_s is None or not busy:
            return None
        return max(0.0, min(w.heard for w in busy) + self.stall_s - time.monotonic())

    def _serve(self, k: int, w: _Worker, queue: deque) -> Iterator[tuple[int, object]]:
        """Read what ``w`` sent; when it died meanwhile, yield its item's Crash and replace it."""
        alive = True
        while alive and w.task is not None and w.conn.poll():
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                alive = False
                break
            w.heard = time.monotonic()
            if msg[0] == "alive":
                continue
            if msg[0] == "note":
                w.note = msg[1]
            elif msg[0] == "result":
                w.task.pop(0)
                self.deaths = 0
                yield msg[1], msg[2]
            elif msg[0] == "idle":
                w.task = None
            else:  # "error"
                exc = msg[2]
                exc.__cause__ = RemoteTraceback(msg[3])
                raise exc
        if w.task is None or (alive and w.proc.is_alive()):
            return
        w.proc.join(_JOIN_S)
        (index, _), rest = w.task[0], w.task[1:]
        crash = Crash(w.proc.exitcode, w.note, self.stall_s if w.stalled else None)
        w.task = rest or None
        self.workers[k] = self._replace(w, queue)
        log.warning("a converter worker (pid %d) %s; starting another", w.proc.pid, crash.how())
        yield index, crash

    def _replace(self, w: _Worker, queue: deque) -> _Worker:
        """A fresh worker for a dead one; its unanswered items go back to the front of the queue."""
        if w.task:
            queue.appendleft(w.task)
        w.stop(kill=True)
        self.deaths += 1
        if self.deaths > 2 * len(self.workers) + _MAX_DEATHS:
            raise WorkerCrashed(
                f"converter workers keep dying ({self.deaths} in a row, the last one "
                f"{Crash(w.proc.exitcode).how()}); stopping"
            )
        new = _Worker(self.ctx, self.initializer)
        new.send(("fn", self.fn))
        return new

    def close(self, abort: bool = False) -> None:
        """Stop the workers: let them exit (``abort`` False) or kill them mid-item (True)."""
        for w in self.workers:
            w.stop(kill=abort)
        self.workers = []
