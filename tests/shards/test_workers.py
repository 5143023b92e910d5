"""The converter's pool: a worker that dies costs exactly the item it was on; errors come back; a conversion
whose worker is killed by an input skips that input and goes on (issue 15's converter faults, item 9)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.build import ShardWriter
from shards.convert import main
from shards.synthetic import generate_archive
from shards.verify import verify
from shards.workers import Crash, WorkerCrashed, WorkerPool
from tests.shards.conftest import read_samples
from tests.shards.conftest import run as run_convert

FLAGS = ("--max-samples-per-shard", "1")


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


def _hangs_or_ticks(x):
    from shards.workers import tick

    if x == 2:  # silent: a read stuck in the kernel
        time.sleep(3600)
    if x == 4:  # slow but moving: longer than the stall limit, ticking all along
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            tick()
            time.sleep(0.05)
    return x


def test_a_silent_worker_is_killed_and_a_slow_ticking_one_is_not(deadline, fork_workers, monkeypatch):
    import shards.workers

    deadline(60)
    monkeypatch.setattr(shards.workers, "_PING_S", 0.1)
    pool = WorkerPool(2, stall_s=1.5)
    t0 = time.monotonic()
    try:
        got = dict(pool.run(_hangs_or_ticks, range(6)))
    finally:
        pool.close(abort=True)
    assert time.monotonic() - t0 < 20
    assert {i: v for i, v in got.items() if i != 2} == {0: 0, 1: 1, 3: 3, 4: 4, 5: 5}
    assert isinstance(got[2], Crash) and got[2].stalled_s == 1.5
    assert got[2].how().startswith("showed no progress for 1.5 s and was killed")


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


@pytest.fixture
def s2_archive(tmp_path):
    """6 s2 files (13 x uint16, 32 px), a reference conversion of them one shard each."""
    generate_archive(tmp_path / "in", 6, 32, kind="s2")
    run_convert(tmp_path / "in", tmp_path / "ref", *FLAGS)
    return tmp_path


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr and "usage:" not in stderr, stderr
    return errors[0]


def _die_on(relpath, sig):
    """A read_rows that kills its own process when it reads ``relpath`` (in a forked worker)."""
    import shards.build as build

    read = build.read_rows

    def patched(ds, info, *a, **k):
        if info.relpath == relpath:
            os.kill(os.getpid(), sig)
        return read(ds, info, *a, **k)

    return patched


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_worker_killed_by_an_input_is_skipped_and_the_run_goes_on(s2_archive, monkeypatch, fork_workers, deadline, sig):
    deadline(60)
    import shards.build as build

    monkeypatch.setattr(build, "read_rows", _die_on("img_00003.tif", sig))
    s = run_convert(s2_archive / "in", s2_archive / "out", *FLAGS, "--workers", "2")
    skipped = [json.loads(x) for x in (s2_archive / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [e["source"] for e in skipped] == ["img_00003.tif"]
    assert skipped[0]["reason"].startswith(f"the converter worker reading it died from {sig.name}")
    assert s.skipped == 1 and s.files == 5
    got, ref = read_samples(s2_archive / "out")[0], read_samples(s2_archive / "ref")[0]
    assert sorted(got) == sorted(k for k in ref if not k.endswith("img_00003"))
    assert verify(str(s2_archive / "out")).ok


def test_worker_killed_while_scanning_headers(s2_archive, monkeypatch, fork_workers, deadline):
    deadline(60)
    import shards.build as build

    scan = build.scan_source

    def patched(index, path, relpath, *a):
        if relpath == "img_00001.tif":
            os.kill(os.getpid(), signal.SIGKILL)
        return scan(index, path, relpath, *a)

    monkeypatch.setattr(build, "scan_source", patched)
    s = run_convert(s2_archive / "in", s2_archive / "out", *FLAGS, "--workers", "2")
    entry = json.loads((s2_archive / "out" / "skipped.jsonl").read_text())
    assert entry["source"] == "img_00001.tif" and "reading its header died from SIGKILL" in entry["reason"]
    assert s.chips == 5


def test_worker_crash_with_strict_or_outside_any_input_stops(s2_archive, monkeypatch, fork_workers, deadline, capsys):
    deadline(60)
    import shards.build as build

    monkeypatch.setattr(build, "read_rows", _die_on("img_00003.tif", signal.SIGSEGV))
    with pytest.raises(SystemExit) as e:
        main([str(s2_archive / "in"), "--out", str(s2_archive / "strict"), *FLAGS, "--workers", "2", "--strict"])
    assert e.value.code == 2 and "img_00003.tif" in _one_error_line(capsys.readouterr().err)

    monkeypatch.setattr(build, "read_rows", _die_on("nothing", signal.SIGSEGV))
    close = ShardWriter.close

    def crash_on_close(self):
        if self.final.name == "shard-000001.tar":
            os.kill(os.getpid(), signal.SIGSEGV)
        close(self)

    monkeypatch.setattr(ShardWriter, "close", crash_on_close)
    rc = main([str(s2_archive / "in"), "--out", str(s2_archive / "w"), *FLAGS, "--workers", "2"])
    assert rc == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "died from SIGSEGV" in line and "while building shard-000001.tar, not while reading an input" in line


def test_hung_input_is_skipped_after_the_stall_timeout(s2_archive, monkeypatch, fork_workers, deadline):
    deadline(90)
    import shards.build as build

    read = build.read_rows

    def hangs(ds, info, *a, **k):
        if info.relpath == "img_00003.tif":
            time.sleep(3600)
        return read(ds, info, *a, **k)

    monkeypatch.setattr(build, "read_rows", hangs)
    s = run_convert(s2_archive / "in", s2_archive / "out", *FLAGS, "--workers", "2", "--stall-timeout", "2")
    entry = json.loads((s2_archive / "out" / "skipped.jsonl").read_text())
    assert entry["source"] == "img_00003.tif"
    assert entry["reason"].startswith("the converter worker reading it showed no progress for 2 s and was killed")
    assert s.skipped == 1 and s.files == 5 and verify(str(s2_archive / "out")).ok
    # the limit decides nothing in the output: not part of the manifest's settings
    assert "stall_timeout" not in json.loads((s2_archive / "out" / "manifest.json").read_text())["converter"]["args"]
