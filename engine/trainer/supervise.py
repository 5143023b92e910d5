"""Run a launcher so that a scheduler's stop signal ends in a checkpoint and the run's own exit code.

    python -m engine.trainer.supervise deepspeed --num_gpus 8 launchers/pretrain.py --config ...
    python -m engine.trainer.supervise torchrun --nproc_per_node 8 launchers/pretrain.py --config ...

Our ranks checkpoint on SIGTERM/SIGINT and exit 128 + signal number (143, 130). The launchers in
front of them report that badly (measured with deepspeed 0.19.8 and torch 2.14):

- ``deepspeed`` (single node) installs no signal handler: ``kill -TERM -<pgid>`` kills it at once
  (the shell sees 143) while its ranks are still writing the checkpoint, so a batch script or a
  container whose main process it is ends before the save does and the scheduler kills the ranks.
  As PID 1 of a container it ignores SIGTERM altogether (the kernel drops signals that PID 1 has no
  handler for): the ranks never hear of the preemption.
- ``torchrun`` forwards SIGTERM to its workers, then exits 1 with a traceback although they saved.
- both SIGKILL a worker 30 s after passing a signal on, whatever it is writing.

The supervisor starts the command in its own session and becomes the child subreaper (Linux), so a
rank orphaned by a dying launcher is still its child. Every rank registers its pid in the directory
named by ``GEOEXPLORA_SUPERVISE`` (:func:`register_rank`), and local rank 0 writes the run's exit
code there (:func:`report_exit`). On SIGTERM/SIGINT the supervisor passes the signal to the
registered ranks only (to the whole session while none has registered yet), so no launcher starts
its kill timer; the ranks agree, checkpoint and exit; the launcher follows. The supervisor waits for
every descendant (at most ``--grace`` seconds after the launcher ended, then SIGKILL) and exits with
the code the ranks reported -- 0 finished, 143/130 stopped after a checkpoint, 1 NaN halt, 2 bad
input -- or else with the launcher's (128 + N when a signal ended it, or 128 + N of the signal the
supervisor received).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("geoexplora.supervise")

ENV = "GEOEXPLORA_SUPERVISE"
EXIT_FILE = "exit"
_PR_SET_CHILD_SUBREAPER = 36
USAGE = "usage: python -m engine.trainer.supervise [--grace SECONDS] [--] COMMAND [ARG ...]"


# ------------------------------------------------------------------------------- rank side
def register_rank() -> None:
    """Called by every rank at start: make this process a target of the supervisor's signals."""
    d = os.environ.get(ENV)
    if d and os.path.isdir(d):
        Path(d, f"rank-{os.getpid()}").touch()


def report_exit(code: int) -> None:
    """Called by every rank at exit; local rank 0 writes ``code`` for the supervisor."""
    d = os.environ.get(ENV)
    if not d or not os.path.isdir(d) or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    tmp = Path(d, f".{EXIT_FILE}-{os.getpid()}")
    tmp.write_text(str(int(code)))
    os.replace(tmp, Path(d, EXIT_FILE))


# ------------------------------------------------------------------------------- supervisor side
def _become_subreaper() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def exit_code_of(returncode: int) -> int:
    """Popen's returncode (-N when signal N ended the process) as the shell reports it (128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Runs ``command`` as described in the module docstring; :meth:`run` returns the exit code."""

    def __init__(self, command: Sequence[str], grace: float = 120.0):
        self.command, self.grace = list(command), float(grace)
        self.dir = Path(tempfile.mkdtemp(prefix="geoexplora-supervise-"))
        self.proc: subprocess.Popen | None = None
        self.signum = 0  # the first stop signal received

    def ranks(self) -> list[int]:
        """Pids of the registered ranks that are still our descendants (no stale or reused pids)."""
        alive = {p.pid for p in _descendants()}
        pids = []
        for f in self.dir.glob("rank-*"):
            pid = int(f.name.split("-", 1)[1])
            if pid in alive:
                pids.append(pid)
        return sorted(pids)

    def _forward(self, signum: int, frame) -> None:
        self.signum = self.signum or signum
        ranks = self.ranks()
        log.warning(
            "%s received: passing it to %s",
            signal.Signals(signum).name,
            f"rank pid(s) {ranks}" if ranks else "the launcher's process group",
        )
        for pid in ranks:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if not ranks and self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def _reap_rest(self) -> None:
        """Wait for descendants that outlived the launcher (ranks still saving), then kill the rest."""
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:  # orphans re-parented to us
                    pass
            except ChildProcessError:
                pass
            left = _descendants()
            if not left:
                return
            time.sleep(0.2)
        left = _descendants()
        log.error("%d process(es) still running %.0fs after the launcher ended; killing them", len(left), self.grace)
        for p in left:
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - gone already or not ours to kill
                pass

    def run(self) -> int:
        subreaper = _become_subreaper()
        if not subreaper:
            log.warning("could not become the child subreaper: ranks orphaned by the launcher are not waited for")
        env = dict(os.environ, **{ENV: str(self.dir)})
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                self.proc = subprocess.Popen(self.command, env=env, start_new_session=True)
            except OSError as e:
                from engine.errors import UserError

                raise UserError(f"cannot start {self.command[0]!r}: {e.strerror}") from None
            if self.signum:  # stopped before the command existed: pass it on now
                self._forward(self.signum, None)
            rc = self.proc.wait()
            self._reap_rest()
            reported = self.dir / EXIT_FILE
            if reported.is_file():
                return int(reported.read_text())
            if self.signum:
                return 128 + self.signum
            return exit_code_of(rc)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            shutil.rmtree(self.dir, ignore_errors=True)


def parse_args(argv: Sequence[str]) -> tuple[float, list[str]]:
    from engine.errors import UserError

    argv, grace = list(argv), 120.0
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or ""))
        sys.exit(0)
    if argv and argv[0].startswith("--grace"):
        value = argv[0].split("=", 1)[1] if "=" in argv[0] else (argv[1] if len(argv) > 1 else "")
        argv = argv[1:] if "=" in argv[0] else argv[2:]
        try:
            grace = float(value)
        except ValueError:
            raise UserError(f"--grace: expected seconds, got {value!r}") from None
        if grace <= 0:
            raise UserError("--grace: must be > 0 seconds")
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UserError(f"no command given; {USAGE}")
    return grace, argv


def main(argv: Sequence[str] | None = None) -> int:
    from engine.errors import cli_entry
    from engine.progress import setup_logging

    @cli_entry
    def _main() -> int:
        setup_logging()
        grace, command = parse_args(sys.argv[1:] if argv is None else argv)
        return Supervisor(command, grace).run()

    return _main()


if __name__ == "__main__":
    sys.exit(main())
