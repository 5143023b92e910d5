"""SIGTERM/SIGINT (preemption, scancel, Ctrl-C) -> checkpoint at the next step boundary, then exit.

The handler only raises a flag; the training loop sums the flag over ranks together with the loss
(one all-reduce per micro-batch, see ``loop.py``) so every rank stops at the same step even when
only one of them was signalled -- the deepspeed launcher, for one, terminates its children one
after another, and a preempting scheduler may reach nodes at different times.

Once a stop is requested, torch's SIGCHLD handler is switched off until the guard exits. SLURM,
Kubernetes and a terminal's Ctrl-C signal every process of the job, DataLoader workers included;
torch kills a worker on SIGTERM, and its SIGCHLD handler would then raise "DataLoader worker killed"
inside whatever the main thread is doing -- an all-reduce, an optimizer step, the checkpoint.
Python runs pending signal handlers in signal-number order, so our SIGTERM (15) / SIGINT (2)
handler runs before the worker's SIGCHLD (17) is handled. With one micro-batch per step the
stopping rank needs no further batch; the training loop closes its data iterator (shutting the
workers down) before the guard restores the handler. (With gradient accumulation a dead worker
still surfaces at the next fetch: DataLoader workers should ignore SIGTERM/SIGINT themselves.)

A second Ctrl-C while the checkpoint is pending restores the default handler and interrupts at
once (the operator really means it).

Exit code of a run stopped this way: ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), the
shell's code for "ended by that signal", which schedulers treat as retryable (Kubeflow's ExitCode
restart policy: 128-255), unlike 0 ("finished": a Kubernetes Job would count the run as complete),
1 (NaN halt) or 2 (bad input). The ``deepspeed`` runner, itself killed by the signal, reports the
same 143 (see :mod:`engine.trainer.supervise` for a wrapper that waits for the ranks).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


def stop_exit_code(signal_name: str | None) -> int:
    """Exit code of a run that stopped on ``signal_name`` after its checkpoint (0 when None)."""
    return 0 if signal_name is None else 128 + int(signal.Signals[signal_name])


# What signal.signal returns and accepts: a handler, SIG_DFL/SIG_IGN, or None (set outside Python).
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class PreemptionGuard:
    """Context manager that turns SIGTERM/SIGINT into ``requested`` for the duration of a run."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = 0  # the first stop signal received (0 = none)
        self.signal_name: str | None = None
        self._previous: dict[int, _Handler] = {}
        self._sigchld: _Handler | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        if not self.requested:
            self.signum, self.signal_name = int(signum), name
        self.requested = True
        if self._sigchld is None:
            self._sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log.warning(
            "%s received: saving a checkpoint at the next step boundary, then exiting "
            "(Ctrl-C again to abort without saving)",
            name,
        )

    def install(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: preemption signals are not handled")
            return self
        for s in HANDLED:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        if self._sigchld is not None:
            signal.signal(signal.SIGCHLD, self._sigchld)
            self._sigchld = None

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
