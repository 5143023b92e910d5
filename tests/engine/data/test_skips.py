"""Bad data: corrupt samples and shards are logged with their key, skipped and counted; too many abort."""

import logging

import numpy as np
import pytest

from engine.config import CropConfig, DataConfig
from engine.data import SkipRateExceeded, build_eval_loader, build_pretrain_loader, skips


def ids(loader):
    return sorted(int(v) for b in loader for v in b["images"][:, 0, 0, 0])


def test_corrupt_sample_and_shards_are_skipped_and_counted(shard_dir, caplog):
    root = shard_dir(per_shard=[4, 4, 4, 4], size=8, bad_ids=[2])
    (root / "shard-000001.tar").write_bytes(np.random.default_rng(0).bytes(3000))  # garbage: 4 samples lost
    t = root / "shard-000003.tar"
    t.write_bytes(t.read_bytes()[: int(t.stat().st_size * 0.6)])  # truncated mid-shard
    cfg = DataConfig(shards=str(root), batch_size=3, num_workers=2, max_skip_rate=0.9)
    loader = build_eval_loader(cfg, 8, labels=False, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        got = ids(loader)
    kept_tail = [i for i in range(12, 16) if i in got]
    assert got == [0, 1, 3, 8, 9, 10, 11] + kept_tail and len(kept_tail) < 4
    assert loader.totals == {"seen": len(got), "skipped": 16 - len(got), "bad_shards": 2}
    assert "tile00002_0_0" in caplog.text and "shard-000001.tar" in caplog.text


def test_skip_rate_above_threshold_aborts(shard_dir, monkeypatch):
    monkeypatch.setattr(skips, "MIN_SAMPLES_FOR_ABORT", 4)
    root = shard_dir(per_shard=[4, 4], size=8, bad_ids=[0, 1, 5])
    cfg = DataConfig(shards=str(root), batch_size=2, num_workers=0, max_skip_rate=0.2)
    with pytest.raises(SkipRateExceeded, match="skipped .* samples"):
        ids(build_eval_loader(cfg, 8, labels=False, rank=0, world_size=1))


def test_all_corrupt_resampled_stream_aborts_instead_of_spinning(shard_dir, monkeypatch):
    monkeypatch.setattr(skips, "MIN_SAMPLES_FOR_ABORT", 8)
    root = shard_dir(per_shard=[2, 2], size=8)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        (root / name).write_bytes(b"\0garbage" * 100)
    cfg = DataConfig(shards=str(root), batch_size=2, num_workers=2, max_skip_rate=1.0, steps_per_epoch=3)
    loader = build_pretrain_loader(
        cfg, CropConfig(global_size=8, local_size=4, num_local=0), "mae", patch_size=4, rank=0, world_size=1
    )
    with pytest.raises(SkipRateExceeded) as err:
        list(loader)
    assert "Traceback" not in str(err.value) and "re-convert the bad shards" in str(err.value)
