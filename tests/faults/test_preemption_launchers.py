"""The README's preemption path on 2 CPU ranks (``DS_ACCELERATOR=cpu deepspeed --num_gpus 2``).

1. ``kill -TERM -<pgid>`` of the deepspeed runner, as the README says to signal it: the runner has no
   handler and dies of the signal at once (exit 143 in a shell), before its ranks have saved; the
   ranks agree, write one complete checkpoint and exit 143 (128 + SIGTERM) themselves.
2. The same run under ``python -m engine.trainer.supervise``, SIGTERM to the supervisor alone (what
   Kubernetes does to PID 1): it passes the signal to the ranks, exits 143 only after every process
   of the run is gone, and the checkpoint is complete.
"""

import os
import signal
import sys

import psutil
import pytest

from engine.trainer.checkpoint import complete_checkpoints, read_meta
from engine.trainer.process_group import free_port
from tests.faults.conftest import REPO, TIMEOUT_S, TINY_ARGS, kill_group, metrics_reached, start_cli, wait_for

pytestmark = pytest.mark.distributed


def _deepspeed_args(shards, run_dir):
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [
        deepspeed,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "launchers" / "pretrain.py"),
        *TINY_ARGS,
        "--data.shards",
        str(shards),
        "--train.output_dir",
        str(run_dir),
        "--train.max_steps",
        "1000",
    ]


def _assert_one_complete_stop_checkpoint(run_dir):
    found = complete_checkpoints(run_dir / "checkpoints")
    assert len(found) == 1, found
    step, ckpt = found[0]
    assert step >= 2 and read_meta(ckpt)["world_size"] == 2
    assert (ckpt / "rank_00000.pt").is_file() and (ckpt / "rank_00001.pt").is_file()
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert not (run_dir / "export").exists()


def test_deepspeed_runner_process_group_sigterm(tiny_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = start_cli(_deepspeed_args(tiny_shards, run_dir), log)  # `python <deepspeed script> ...` = `deepspeed ...`
    try:
        wait_for("step 2", metrics_reached(run_dir, 2), proc, log=log)
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=TIMEOUT_S)
        gone, alive = psutil.wait_procs(tree, timeout=TIMEOUT_S)
    finally:
        kill_group(proc)
    assert rc == -signal.SIGTERM, log.read_text()[-3000:]  # the runner itself: 143 in a shell
    assert not alive  # the ranks finished on their own after the runner was gone
    assert "stopped at step" in log.read_text()
    _assert_one_complete_stop_checkpoint(run_dir)


def test_supervised_deepspeed_sigterm_to_the_supervisor_only(tiny_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = start_cli(["-m", "engine.trainer.supervise", *_deepspeed_args(tiny_shards, run_dir)], log)
    try:
        wait_for("step 2", metrics_reached(run_dir, 2), proc, log=log)
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=TIMEOUT_S)
        left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        kill_group(proc)
    assert rc == 143, log.read_text()[-3000:]
    assert not left  # nothing of the run outlives the supervisor
    assert "passing it to rank pid(s)" in log.read_text()
    _assert_one_complete_stop_checkpoint(run_dir)
