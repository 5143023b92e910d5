"""Shared pieces of the fault suite: bounded runs of our command lines, tiny synthetic shards, a
private mount namespace for real read-only / full file systems (the in-process ``deadline`` fixture
is in tests/conftest.py).

Every wait here is bounded, so a regression that hangs fails the test instead of blocking CI.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "engine" / "presets" / "tiny_cpu.yaml"
TIMEOUT_S = 180  # per subprocess: generous for a loaded 2-core machine; a hang fails instead of blocking CI
# The tiny preset as the fault tests run it: no loader workers (worker shutdown is tested in
# tests/engine/data), every step logged, no logger but metrics.jsonl, DINO teacher temperature
# without warm-up.
TINY_ARGS = (
    "--config",
    str(TINY),
    "--data.num_workers",
    "0",
    "--train.log_every",
    "1",
    "--train.logger",
    "",
    "--objective.dino.warmup_teacher_temp_steps",
    "0",
)


def cli_env(**extra: str) -> dict:
    """Environment of a command line run from this tree: offline, CPU DeepSpeed, one thread per
    process, and none of the launcher variables of an enclosing run."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        **extra,
    )
    for k in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "GEOEXPLORA_SUPERVISE",
    ):
        env.pop(k, None)
    return env


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        """The ``error: ...`` lines of stderr."""
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]

    def tail(self, n: int = 3000) -> str:
        return f"rc {self.rc}\n--- stdout\n{self.stdout[-n:]}\n--- stderr\n{self.stderr[-n:]}"


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *map(str, args)]


def run_cli(
    args: Sequence[str], timeout: float = TIMEOUT_S, env: dict | None = None, prefix: Sequence[str] = ()
) -> Result:
    """Run ``python <args>`` (or ``<prefix> python <args>``) from the repository root; returns rc,
    stdout and stderr. A run past ``timeout`` is killed with its whole process group and fails."""
    cmd = [*prefix, *python_cmd(*args)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... ran past {timeout:.0f}s\n{err[-3000:]}")
    return Result(proc.returncode, out, err)


def start_cli(args: Sequence[str], log: Path, env: dict | None = None, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """Start ``<prefix> python <args>`` in its own session (so ``kill -<sig> -<pid>`` reaches all of it),
    stdout and stderr to ``log``; stop it with :func:`kill_group` in a ``finally``."""
    with open(log, "w") as fh:
        return subprocess.Popen(
            [*prefix, *python_cmd(*args)],
            cwd=REPO,
            env=env or cli_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of ``proc``: its descendants (also those in sessions of their own,
    such as a supervised launcher's) and its process group."""
    import psutil

    try:
        left = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    except psutil.Error:
        left = []
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def wait_for(
    what: str,
    done: Callable[[], bool],
    proc: subprocess.Popen | None = None,
    timeout: float = TIMEOUT_S,
    log: Path | None = None,
) -> None:
    """Poll ``done()`` until true; fail after ``timeout`` or when ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"the run ended (rc {proc.returncode}) before {what}\n"
                + (log.read_text(errors="replace")[-3000:] if log and log.is_file() else "")
            )
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {timeout:.0f}s")


def metrics_reached(run_dir: Path, step: int) -> Callable[[], bool]:
    """True once ``metrics.jsonl`` of ``run_dir`` holds the record of optimizer step ``step``."""
    path = run_dir / "metrics.jsonl"
    return lambda: path.is_file() and f'"step": {step},' in path.read_text(errors="replace")


# ---------------------------------------------------------------------------- file systems
def namespace_prefix() -> list[str] | None:
    """``unshare -rm`` (a user + mount namespace: private mounts, allowed to unprivileged users where
    user namespaces are on) when it works here, else None."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    try:
        with tempfile.TemporaryDirectory() as d:
            ok = (
                subprocess.run(
                    [exe, "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {d} && touch {d}/x"],
                    capture_output=True,
                    timeout=20,
                ).returncode
                == 0
            )
    except (OSError, subprocess.SubprocessError):
        return None
    return [exe, "-rm"] if ok else None


@pytest.fixture(scope="session")
def private_mounts() -> list[str]:
    """Command prefix for a private mount namespace; the test is skipped where none can be made."""
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("needs `unshare -rm` (user + mount namespaces) for a real read-only / full file system")
    return prefix


def in_namespace(prefix: Sequence[str], setup: str, after: str = "") -> list[str]:
    """``run_cli(args, prefix=in_namespace(...))`` runs shell ``setup`` (mounts) in the private
    namespace, then ``python <args>``, then shell ``after`` (e.g. copying results out of a tmpfs that
    dies with the namespace), and exits with python's code (97 when ``setup`` failed)."""
    script = f'{setup} || exit 97; "$@"; rc=$?; {after or "true"}; exit $rc'
    return [*prefix, "sh", "-c", script, "sh"]


# ---------------------------------------------------------------------------- data
@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """4 shards x 8 RGB chips of 64 px (shards/synthetic.py archive, converted by our converter)."""
    root = tmp_path_factory.mktemp("faults_data")
    gen = run_cli(
        ["-c", f"from shards.synthetic import generate_archive; generate_archive({str(root / 'syn')!r}, 32, 64)"],
        timeout=120,
    )
    assert gen.rc == 0, gen.tail()
    conv = run_cli(
        ["-m", "shards.convert", str(root / "syn"), "-o", str(root / "shards"), "--max-samples-per-shard", "8"],
        timeout=120,
    )
    assert conv.rc == 0, conv.tail()
    return root / "shards"


@pytest.fixture
def shards_copy(tiny_shards, tmp_path) -> Path:
    """A private copy of ``tiny_shards`` that a test may damage."""
    return Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
