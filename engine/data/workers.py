"""DataLoader worker processes: their stop signals, and a shutdown that always ends.

Signals. Ctrl-C and schedulers (SLURM, Kubernetes) signal every process of a job. A worker killed
mid-batch makes the main process raise "DataLoader worker killed" while the trainer's
PreemptionGuard is checkpointing, so workers ignore SIGINT, and ignore SIGTERM *until their loader
is closing* (the ``closing`` flag of :class:`~engine.data.epoch.EpochControl`, in shared memory).
From then on SIGTERM -- torch's own last-resort ``terminate()``, or multiprocessing's at exit --
ends the worker at once.

Shutdown (:func:`stop_workers`): set ``closing``; torch's shutdown (stop the pin-memory thread, ask
each worker to exit, join for up to 5 s, then SIGTERM, join again); finally SIGKILL any worker still
alive (one blocked in a system call, say) and reap it. Every wait is bounded, so a crash, an
exception or a normal end never leaves the main process waiting in multiprocessing's exit-time
join -- the hang that held 8 GPUs until the wall-time limit (issue 15). Every loader with live
workers is closed by an ``atexit`` hook registered after torch's and multiprocessing's own
(``atexit`` runs hooks last-registered first, so ours runs while both still work).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from collections.abc import Callable

from torch.utils.data import get_worker_info

log = logging.getLogger(__name__)

# Seconds to wait for a SIGKILLed worker to be reaped (the kernel delivers SIGKILL at once; this
# only bounds a pathological wait, e.g. a worker in uninterruptible sleep on a dead NFS server).
KILL_WAIT_S = 2.0


def _on_sigterm(signum, frame) -> None:
    info = get_worker_info()
    control = getattr(info.dataset, "control", None) if info is not None else None
    if control is not None and control.closing:
        os._exit(0)  # the loader is shutting down: leave now, without running a worker's cleanup twice


def init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore SIGINT; ignore SIGTERM until the loader is closing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)


def stop_workers(it, control) -> None:
    """Shut down the workers of DataLoader iterator ``it`` with bounded waits (module docstring)."""
    control.closing = True
    workers = list(getattr(it, "_workers", ()))
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    alive = [w for w in workers if w.is_alive()]
    for w in alive:
        log.warning("DataLoader worker pid %s did not exit after its shutdown request and SIGTERM; killing it", w.pid)
        w.kill()
    for w in alive:
        w.join(KILL_WAIT_S)


_live: weakref.WeakSet = weakref.WeakSet()
_lock = threading.Lock()
_hooked = False


def track(closeable) -> None:
    """Close ``closeable`` (anything with ``close()``) at interpreter exit if it is still alive then.
    Call it right after the DataLoader iterator is created, so the hook is registered after torch's."""
    global _hooked
    with _lock:
        _live.add(closeable)
        if not _hooked:
            atexit.register(_close_all)
            _hooked = True


def untrack(closeable) -> None:
    with _lock:
        _live.discard(closeable)


def _close_all() -> None:
    with _lock:
        live: list[Callable] = [c.close for c in list(_live)]
    for close in live:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - at exit, one loader's failure must not keep the others alive
            log.warning("closing a data loader at exit failed: %s", e)
