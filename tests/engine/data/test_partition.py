"""Rank x worker partitioning: exact epochs are disjoint and complete; fixed-length epochs agree."""

from collections import Counter

import pytest

from engine.config import CropConfig, DataConfig
from engine.data import build_eval_loader, build_pretrain_loader


def ids(images):
    """Band 0 of every fake sample is its global index (see fake_shards)."""
    return [int(v) for v in images[:, 0, 0, 0]]


def _cfg(root, **kw):
    base = dict(shards=str(root), batch_size=2, num_workers=2, shuffle_buffer=4)
    base.update(kw)
    return DataConfig(**base)


CROPS = CropConfig(global_size=16, local_size=8, num_local=0)


@pytest.mark.parametrize("per_shard", [[3, 5, 2, 4, 6], [4, 3, 5], [7]])
def test_exact_epoch_disjoint_and_complete_per_rank_and_worker(shard_dir, per_shard):
    """Two simulated ranks x two workers, in-process: every sample exactly once per epoch, and (with
    enough shards) no shard read by two workers; checked on two epochs (shard order reshuffled)."""
    root = shard_dir(per_shard=per_shard, size=8)
    total = sum(per_shard)
    shard_of = [s for s, c in enumerate(per_shard) for _ in range(c)]
    cfg = _cfg(root, resampled=False)
    streams = [
        build_pretrain_loader(cfg, CROPS, "mae", patch_size=8, rank=r, world_size=2, seed=3).dataset for r in range(2)
    ]
    for s in streams:
        s.plan.drop_last = False  # count every sample; the training cut is tested below
    for epoch in (0, 1):
        seen, owners = Counter(), {}
        for r, stream in enumerate(streams):
            stream.epoch = epoch
            for w in range(2):
                got = [i for b in stream.worker_batches(w, 2) for i in ids(b["images"])]
                assert len(got) == stream.expected_samples(epoch, w, 2)
                seen.update(got)
                for i in got:
                    owners.setdefault(shard_of[i], set()).add((r, w))
        assert sorted(seen) == list(range(total)) and max(seen.values()) == 1
        if len(per_shard) >= 4:
            assert all(len(o) == 1 for o in owners.values()), owners


def test_eval_loader_two_ranks_two_workers_every_sample_once(shard_dir):
    root = shard_dir(per_shard=[3, 5, 2, 4, 6], size=8, classes=["a", "b", "c"])
    cfg = _cfg(root, num_workers=2)
    got = []
    for r in range(2):
        loader = build_eval_loader(cfg, 8, rank=r, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        rank_ids = [i for b in batches for i in ids(b["images"])]
        assert len(rank_ids) == loader.num_samples
        labels = [int(v) for b in batches for v in b["labels"]]
        assert labels == [["a", "b", "c"].index(["a", "b", "c"][i % 3]) for i in rank_ids]
        assert [i for b in loader for i in ids(b["images"])] == rank_ids  # same order every pass
        got += rank_ids
    assert sorted(got) == list(range(20))


@pytest.mark.parametrize("per_shard", [[5, 1, 3], [9]])
def test_resampled_every_rank_same_number_of_batches(shard_dir, per_shard):
    root = shard_dir(per_shard=per_shard, size=8)
    cfg = _cfg(root, resampled=True, steps_per_epoch=5)
    counts = []
    for r in range(2):
        loader = build_pretrain_loader(cfg, CROPS, "mae", patch_size=8, rank=r, world_size=2, seed=0)
        assert len(loader) == 5
        counts.append([len(list(loader)) for _ in range(2)])  # two epochs
        assert loader.epoch == 2
    assert counts == [[5, 5], [5, 5]]


def test_default_steps_per_epoch_from_manifest(shard_dir):
    root = shard_dir(per_shard=[6, 6, 5], size=8)
    loader = build_pretrain_loader(_cfg(root, num_workers=0), CROPS, "mae", patch_size=8, rank=1, world_size=2)
    assert len(loader) == 17 // (2 * 2)


def test_exact_training_epochs_are_cut_to_the_shortest_rank(shard_dir):
    root = shard_dir(per_shard=[6, 1, 5, 2], size=8)
    cfg = _cfg(root, resampled=False, num_workers=2)
    lens = []
    for r in range(2):
        loader = build_pretrain_loader(cfg, CROPS, "mae", patch_size=8, rank=r, world_size=2, seed=5)
        expected = len(loader)  # of the current epoch; the epoch advances after iterating
        n = sum(1 for _ in loader)
        assert n == expected
        lens.append(n)
    assert lens[0] == lens[1] > 0
