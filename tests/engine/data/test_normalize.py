"""Device-side normalisation uses the manifest's per-band statistics."""

import numpy as np
import pytest
import torch

from engine.config import DataConfig
from engine.data import Normalizer, build_eval_loader, to_device
from engine.data.normalize import uint16_bits_to_float32
from engine.errors import UserError


def test_loader_normalizer_uses_manifest_stats(shard_dir):
    root = shard_dir(per_shard=[4, 4], bands=4, size=8, dtype="uint16", classes=["a"])
    import json

    m = json.loads((root / "manifest.json").read_text())
    loader = build_eval_loader(
        DataConfig(shards=str(root), batch_size=8, num_workers=0, bands=[3, 1]), 8, rank=0, world_size=1
    )
    batch = next(iter(loader))
    assert batch["images"].dtype == torch.uint16 and batch["images"].shape == (8, 2, 8, 8)
    out = to_device(batch, "cpu", loader.normalizer)
    assert out["images"].dtype == torch.float32 and out["labels"].dtype == torch.long
    mean = torch.tensor([m["stats"]["mean"][3], m["stats"]["mean"][1]]).view(1, 2, 1, 1)
    std = torch.tensor([m["stats"]["std"][3], m["stats"]["std"][1]]).view(1, 2, 1, 1)
    assert torch.allclose(out["images"], (batch["images"].float() - mean) / std)


def test_percentile_clip_nodata_and_overrides():
    manifest = {
        "num_bands": 2,
        "nodata": 0,
        "stats": {"mean": [10.0, 100.0], "std": [2.0, 50.0], "p2": [5.0, 20.0], "p98": [15.0, 180.0]},
    }
    x = torch.tensor([[[0, 4], [12, 40]], [[0, 10], [100, 300]]], dtype=torch.uint16)[None]  # (1, 2, 2, 2)
    y = Normalizer.from_manifest(manifest, clip=True)(x)
    expect = torch.tensor(
        [[[0.0, (5 - 10) / 2], [(12 - 10) / 2, (15 - 10) / 2]], [[0.0, (20 - 100) / 50], [0.0, (180 - 100) / 50]]]
    )[None]
    assert torch.allclose(y, expect)
    z = Normalizer.from_manifest(manifest, bands=[1], mean=[0.0], std=[1.0])(x[:, 1:])
    assert z[0, 0, 1, 1] == 300.0 and z[0, 0, 0, 0] == 0.0


def test_float_nan_is_zeroed_and_errors_are_user_errors():
    n = Normalizer([1.0], [2.0])
    x = torch.tensor([[[[np.nan, 3.0]]]])
    assert n(x).tolist() == [[[[0.0, 1.0]]]]
    with pytest.raises(UserError, match="no per-band 'p2'"):
        Normalizer.from_manifest({"num_bands": 1, "stats": {"mean": [0], "std": [1]}}, clip=True)
    with pytest.raises(UserError, match="out of range"):
        Normalizer.from_manifest({"num_bands": 1, "stats": {"mean": [0], "std": [1]}}, bands=[2])
    with pytest.raises(ValueError, match="1 bands, batch has 2"):
        n(torch.zeros(1, 2, 2, 2))


def test_uint16_fallback_conversion_is_exact():
    x = torch.tensor([0, 1, 32767, 32768, 40000, 65535], dtype=torch.int32).to(torch.uint16)
    assert uint16_bits_to_float32(x).tolist() == [0.0, 1.0, 32767.0, 32768.0, 40000.0, 65535.0]
