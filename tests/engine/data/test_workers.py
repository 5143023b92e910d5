"""DataLoader workers ignore SIGINT, and SIGTERM until their loader closes: the main process
(PreemptionGuard) owns the stop; the loader's own shutdown still ends them."""

import multiprocessing as mp
import os
import signal
import time

import pytest

from engine.config import CropConfig, DataConfig
from engine.data import build_eval_loader, build_pretrain_loader
from engine.data.workers import init_worker


@pytest.fixture
def saved_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_worker_init_ignores_interrupt_and_defers_terminate(saved_handlers):
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    init_worker(0)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert callable(signal.getsignal(signal.SIGTERM))
    os.kill(os.getpid(), signal.SIGTERM)  # outside a worker (no loader closing): ignored
    time.sleep(0.05)


def _new_children(before):
    return [p for p in mp.active_children() if p not in before]


def test_signalled_worker_keeps_serving_and_shuts_down(shard_dir):
    """SIGTERM + SIGINT sent to a live worker mid-epoch (as Ctrl-C / a scheduler would) neither kill it
    nor break the epoch; the worker still exits when the epoch ends."""
    root = shard_dir(per_shard=[7, 1, 2, 6, 3], size=8, classes=["x", "y"])
    cfg = DataConfig(shards=str(root), batch_size=2, num_workers=1)
    expected = len(
        list(build_eval_loader(DataConfig(shards=str(root), batch_size=2, num_workers=0), 8, rank=0, world_size=1))
    )
    before = set(mp.active_children())
    it = iter(build_eval_loader(cfg, 8, rank=0, world_size=1))
    batches = [next(it)]
    workers = _new_children(before)
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGTERM)
    os.kill(workers[0].pid, signal.SIGINT)
    time.sleep(0.2)  # let the signals land before the next fetch
    assert workers[0].is_alive()
    batches += list(it)
    assert len(batches) == expected
    workers[0].join(timeout=5)
    assert not workers[0].is_alive() and workers[0].exitcode == 0


def test_persistent_workers_survive_epochs_and_close(shard_dir):
    """Training loaders keep the same worker processes from epoch to epoch; close() ends them."""
    root = shard_dir(per_shard=[5, 4, 6], size=12, dtype="uint8")
    cfg = DataConfig(shards=str(root), batch_size=2, num_workers=2, shuffle_buffer=4, steps_per_epoch=3)
    before = set(mp.active_children())
    loader = build_pretrain_loader(
        cfg, CropConfig(global_size=8, local_size=8, num_local=0), "dino", patch_size=8, rank=0, world_size=1
    )
    assert len(list(loader)) == 3
    first = {p.pid for p in _new_children(before)}
    assert len(first) == 2
    os.kill(next(iter(first)), signal.SIGTERM)  # a job-wide SIGTERM while running: ignored
    assert len(list(loader)) == 3 and loader.epoch == 2
    procs = _new_children(before)
    assert {p.pid for p in procs} == first
    loader.close()
    assert not any(p.is_alive() for p in procs) and all(p.exitcode == 0 for p in procs)
