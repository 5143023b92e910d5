"""Position state: a restored loader continues exactly where the saved one stopped."""

import itertools
import logging

import pytest
import torch

from engine.config import CropConfig, DataConfig
from engine.data import build_eval_loader, build_pretrain_loader

CROPS = CropConfig(global_size=16, local_size=8, num_local=2)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def take(loader, n):
    return list(itertools.islice(loader.infinite(), n))


def _pretrain(root, rank=0, **kw):
    cfg = dict(shards=str(root), batch_size=2, num_workers=2, shuffle_buffer=4, steps_per_epoch=5)
    cfg.update(kw)
    return build_pretrain_loader(DataConfig(**cfg), CROPS, "dino", patch_size=8, rank=rank, world_size=2, seed=11)


@pytest.mark.parametrize("stop", [3, 4])
def test_resampled_resume_is_the_continuation(shard_dir, stop):
    root = shard_dir(per_shard=[5, 4, 6], size=12, dtype="uint8")
    full = take(_pretrain(root), 8)  # epoch 0 (5 batches) + 3 of epoch 1
    first = _pretrain(root)
    head = take(first, stop)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches"] == stop
    resumed = _pretrain(root)
    resumed.load_state_dict(state)
    tail = take(resumed, 8 - stop)
    assert all(same(a, b) for a, b in zip(head + tail, full))
    assert not same(tail[0], full[0])  # not a restart


def test_exact_eval_resume_with_uneven_workers(shard_dir):
    root = shard_dir(per_shard=[7, 1, 2, 6, 3], size=8, classes=["x", "y"])
    cfg = DataConfig(shards=str(root), batch_size=2, num_workers=2)
    full = list(build_eval_loader(cfg, 8, rank=0, world_size=1))
    for stop in (1, 4, len(full) - 1):
        first = build_eval_loader(cfg, 8, rank=0, world_size=1)
        head = list(itertools.islice(iter(first), stop))
        resumed = build_eval_loader(cfg, 8, rank=0, world_size=1)
        resumed.load_state_dict(first.state_dict())
        tail = list(resumed)
        assert len(head) + len(tail) == len(full)
        assert all(same(a, b) for a, b in zip(head + tail, full))


def test_state_of_another_rank_restores_the_same_position(shard_dir):
    root = shard_dir(per_shard=[5, 4, 6], size=12, dtype="uint8")
    full1 = take(_pretrain(root, rank=1), 5)
    first0 = _pretrain(root, rank=0)
    take(first0, 3)
    resumed1 = _pretrain(root, rank=1)
    resumed1.load_state_dict(first0.state_dict())  # only rank 0's state was checkpointed
    assert all(same(a, b) for a, b in zip(take(resumed1, 2), full1[3:]))


def test_changed_topology_starts_the_next_epoch(shard_dir, caplog):
    root = shard_dir(per_shard=[5, 4, 6], size=12, dtype="uint8")
    first = _pretrain(root)
    take(first, 2)
    other = _pretrain(root, num_workers=1)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(first.state_dict())
    assert "num_workers" in caplog.text and other.epoch == 1 and other.batches == 0


def test_break_and_iterate_again_continues_the_epoch(shard_dir):
    root = shard_dir(per_shard=[5, 4, 6], size=12, dtype="uint8")
    full = take(_pretrain(root, num_workers=0), 5)
    loader = _pretrain(root, num_workers=0)
    head = list(itertools.islice(iter(loader), 2))
    rest = list(loader)
    assert all(same(a, b) for a, b in zip(head + rest, full)) and len(rest) == 3 and loader.epoch == 1
