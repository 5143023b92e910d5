"""Loader faults (issue 15, items 1-2): a crash with DataLoader workers exits instead of hanging, and
empty shards neither busy-loop nor hang. Each case runs in a subprocess with a timeout, so a
regression fails here instead of hanging CI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 150  # generous for a loaded 2-core machine; the fixed code exits in seconds
TINY = REPO / "engine" / "presets" / "tiny_cpu.yaml"

# Tiny uint8 shards in the converter's layout (tests/engine/data/fake_shards.py), written by the child.
PRELUDE = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, os.path.join({repo!r}, "tests", "engine", "data"))
    from fake_shards import write_shards
    from engine.config import CropConfig, DataConfig
    from engine.data import build_pretrain_loader
    from engine.errors import cli_entry
    CROPS = CropConfig(global_size=16, local_size=8, num_local=2)
""")


def bounded(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (a regression's stuck
    workers included) and fail the test."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[1]} hung (killed after {TIMEOUT_S} s); stderr tail:\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run(code: str, tmp_path: Path, **fmt) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(PRELUDE.format(repo=str(REPO)) + textwrap.dedent(code).format(tmp=str(tmp_path), **fmt))
    return bounded([sys.executable, str(script)])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited; only its parent has not reaped it
        return f.read().split(") ", 1)[1].startswith("Z")


def test_crash_with_workers_exits(tmp_path):
    """An exception in the main process while two workers serve batches (the preset crash at step 0):
    the process exits with the exception's status instead of waiting forever in multiprocessing's
    exit-time join on workers that ignore SIGTERM."""
    r = run(
        """
        write_shards("{tmp}/ds", per_shard=[4, 4], size=16, dtype="uint8")
        cfg = DataConfig(shards="{tmp}/ds", batch_size=2, num_workers=2, steps_per_epoch=4)
        loader = build_pretrain_loader(cfg, CROPS, "dino", patch_size=8, rank=0, world_size=1)
        batches = loader.infinite()  # held, as the trainer holds its data iterator
        next(batches)
        raise RuntimeError("crash at step 0")
    """,
        tmp_path,
    )
    assert r.returncode == 1 and "crash at step 0" in r.stderr, r.stderr[-2000:]


def test_crash_with_a_stuck_worker_is_killed(tmp_path):
    """A worker blocked for good (a read from a dead NFS server, SIGTERM blocked) does not hold the
    exit either: after the bounded polite shutdown and SIGTERM it is SIGKILLed, and nothing is left."""
    pidfile = tmp_path / "worker.pid"
    r = run(
        """
        class DeadStorage:
            def __call__(self, url):
                signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})
                with open({pidfile!r}, "a") as f:
                    f.write(f"{{os.getpid()}}\\n")
                time.sleep(3600)

        def crash(signum, frame):
            raise RuntimeError("crash while waiting for data")

        write_shards("{tmp}/ds", per_shard=[4, 4], size=16, dtype="uint8")
        cfg = DataConfig(shards="{tmp}/ds", batch_size=2, num_workers=1, steps_per_epoch=4)
        loader = build_pretrain_loader(cfg, CROPS, "dino", patch_size=8, rank=0, world_size=1, opener=DeadStorage())
        signal.signal(signal.SIGALRM, crash)
        signal.alarm(3)
        batches = loader.infinite()
        next(batches)
    """,
        tmp_path,
        pidfile=str(pidfile),
    )
    assert r.returncode == 1 and "crash while waiting for data" in r.stderr, r.stderr[-2000:]
    assert "killing it" in r.stderr
    pids = [int(p) for p in pidfile.read_text().split()]
    assert pids and all(gone(p) for p in pids)


def test_pretrain_crash_at_step_zero_with_workers_exits(tmp_path):
    """The reported case end to end: the tiny preset with 2 loader workers and a model that cannot
    take the data (4 input bands, 3-band shards) crashes in the first forward and exits."""
    sys.path.insert(0, str(REPO / "tests" / "engine" / "data"))
    from fake_shards import write_shards

    write_shards(tmp_path / "ds", per_shard=[8, 8], size=64, dtype="uint8")
    cmd = [
        sys.executable,
        "launchers/pretrain.py",
        "--config",
        str(TINY),
        "--data.shards",
        str(tmp_path / "ds"),
        "--data.num_workers",
        "2",
        "--model.in_chans",
        "4",
        "--train.max_steps",
        "2",
        "--train.output_dir",
        str(tmp_path / "run"),
    ]
    r = bounded(cmd)
    assert r.returncode != 0 and "channels" in r.stderr, r.stderr[-2000:]


def _empty_manifest(root: Path, counts: list[int]) -> None:
    """Shards with ``counts`` samples (0 = an empty tar) and their manifest."""
    import json

    sys.path.insert(0, str(REPO / "tests" / "engine" / "data"))
    from fake_shards import write_shards

    manifest = write_shards(root, per_shard=[max(c, 1) for c in counts], size=16, dtype="uint8")
    for entry, c in zip(manifest["shards"], counts):
        if c == 0:
            import tarfile

            tarfile.open(root / entry["name"], "w").close()
            entry["count"] = 0
    manifest["total_samples"] = sum(counts)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_listing_only_empty_shards_is_an_error(tmp_path):
    """Was: 100 % CPU re-opening the empty shard forever. Now: one error line, exit 2."""
    _empty_manifest(tmp_path / "ds", [0])
    r = run(
        """
        @cli_entry
        def main():
            cfg = DataConfig(shards="{tmp}/ds", batch_size=2, num_workers=2, steps_per_epoch=4)
            next(build_pretrain_loader(cfg, CROPS, "dino", patch_size=8, rank=0, world_size=1).infinite())
        sys.exit(main())
    """,
        tmp_path,
    )
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: --data.shards") and "0 samples" in err[0]


def test_empty_shard_among_others_is_skipped_with_a_warning(tmp_path):
    _empty_manifest(tmp_path / "ds", [4, 0, 3])
    r = run(
        """
        cfg = DataConfig(shards="{tmp}/ds", batch_size=2, num_workers=2, steps_per_epoch=3, resampled=False)
        loader = build_pretrain_loader(cfg, CROPS, "dino", patch_size=8, rank=0, world_size=1)
        assert len(loader.shards.urls) == 2
        print("batches", sum(1 for _ in loader))
    """,
        tmp_path,
    )
    assert r.returncode == 0 and "batches 3" in r.stdout, r.stderr[-2000:]
    assert "skipping 1 shard(s) the manifest lists with 0 samples" in r.stderr


def test_empty_shards_without_a_manifest_stop_the_workers(tmp_path):
    """No manifest, so no counts: the resampled workers find out by reading, and stop with an error."""
    _empty_manifest(tmp_path / "ds", [0, 0])
    (tmp_path / "ds" / "manifest.json").unlink()
    r = run(
        """
        @cli_entry
        def main():
            cfg = DataConfig(shards="{tmp}/ds/*.tar", batch_size=2, num_workers=2, steps_per_epoch=4,
                             mean=[0, 0, 0], std=[1, 1, 1])
            next(build_pretrain_loader(cfg, CROPS, "dino", patch_size=8, rank=0, world_size=1).infinite())
        sys.exit(main())
    """,
        tmp_path,
    )
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1 and "none of the 2 shard(s) holds a sample" in err[0], r.stderr[-2000:]
