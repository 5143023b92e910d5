"""DataLoader workers ignore SIGINT/SIGTERM: the main process (PreemptionGuard) owns the stop."""
import multiprocessing as mp
import os
import signal
import time

import pytest

from engine.config import DataConfig
from engine.data import build_eval_loader
from engine.data.loader import ignore_stop_signals


@pytest.fixture
def saved_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_worker_init_ignores_interrupt_and_terminate(saved_handlers):
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    ignore_stop_signals(0)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_signalled_worker_keeps_serving_and_shuts_down(shard_dir):
    """SIGTERM + SIGINT sent to a live worker mid-epoch (as Ctrl-C / a scheduler would) neither kill it
    nor break the epoch; the worker still exits when the epoch ends."""
    root = shard_dir(per_shard=[7, 1, 2, 6, 3], size=8, classes=["x", "y"])
    cfg = DataConfig(shards=str(root), batch_size=2, num_workers=1)
    expected = len(list(build_eval_loader(DataConfig(shards=str(root), batch_size=2, num_workers=0), 8,
                                          rank=0, world_size=1)))
    before = set(mp.active_children())
    it = iter(build_eval_loader(cfg, 8, rank=0, world_size=1))
    batches = [next(it)]
    workers = [p for p in mp.active_children() if p not in before]
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGTERM)
    os.kill(workers[0].pid, signal.SIGINT)
    time.sleep(0.2)  # let the signals land before the next fetch
    assert workers[0].is_alive()
    batches += list(it)
    assert len(batches) == expected
    workers[0].join(timeout=5)
    assert not workers[0].is_alive() and workers[0].exitcode == 0
