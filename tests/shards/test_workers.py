"""The converter's pool: a worker that dies costs exactly the item it was on; errors come back."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.workers import Crash, WorkerCrashed, WorkerPool


def _pool_item(x):
    if x == 3:
        os._exit(7)
    if x == 5:
        os.kill(os.getpid(), signal.SIGSEGV)
    if x == 8:
        raise ValueError("bad item 8")
    return x * x


def test_pool_blames_exactly_the_item_a_worker_died_on(deadline, fork_workers):
    deadline(60)
    pool = WorkerPool(2)
    try:
        got = dict(pool.run(_pool_item, [0, 1, 2, 3, 4, 5, 6, 7], chunk=3))
        assert {i: v for i, v in got.items() if not isinstance(v, Crash)} == {i: i * i for i in (0, 1, 2, 4, 6, 7)}
        assert got[3].exitcode == 7 and got[3].how() == "exited with code 7 without finishing"
        assert got[5].how().startswith("died from SIGSEGV")
        with pytest.raises(ValueError, match="bad item 8") as e:
            list(pool.run(_pool_item, [8]))
        assert "Traceback" in str(e.value.__cause__)
    finally:
        pool.close(abort=True)


def _always_dies(x):
    os._exit(3)


def test_workers_that_keep_dying_stop_the_run(deadline, fork_workers):
    deadline(60)
    pool = WorkerPool(2)
    try:
        with pytest.raises(WorkerCrashed, match="keep dying"):
            list(pool.run(_always_dies, range(50)))
    finally:
        pool.close(abort=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not yet reaped
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")
def test_workers_die_with_their_parent():
    """kill -9 of the converter alone (not its process group) takes its workers with it."""
    code = (
        "import os, signal\nfrom shards.workers import WorkerPool\np = WorkerPool(2)\n"
        "print(' '.join(str(w.proc.pid) for w in p.workers), flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )
    assert r.returncode == -signal.SIGKILL
    pids = [int(p) for p in r.stdout.split()]
    assert len(pids) == 2
    until = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < until:
        time.sleep(0.05)
    assert not any(map(_alive, pids))
