"""Suite-wide settings (offline hub, CPU-friendly threads, the `gpu` marker's skip rule) and the fixtures
more than one test folder uses."""

import multiprocessing as mp
import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_rank_env():
    """A one-rank gloo process group (what plain `python launchers/X.py` joins), left at module end
    with the launcher variables restored."""
    import torch.distributed as dist

    from engine.trainer.process_group import init_distributed, shutdown

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k, None) for k in keys}
    env = init_distributed()
    yield env
    shutdown()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert not dist.is_initialized()


@pytest.fixture
def deadline():
    """``deadline(seconds)`` arms SIGALRM for an in-process test: a hang raises TimeoutError instead of
    blocking the suite."""

    def _alarm(signum, frame):
        raise TimeoutError("in-process test ran past its deadline: a hang")

    previous = signal.signal(signal.SIGALRM, _alarm)
    yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def fork_workers(monkeypatch):
    """The converter's pool workers forked from this process, so they inherit this test's monkeypatches."""
    import shards.workers

    monkeypatch.setattr(shards.workers, "_context", lambda: mp.get_context("fork"))
