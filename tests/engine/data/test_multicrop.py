"""Multi-crop, MAE and eval views: shapes, dtypes, crop-major order, spectral safety."""

import numpy as np
import pytest
import torch

from engine.config import CropConfig, DataConfig
from engine.data import build_pretrain_loader
from engine.data.builders import build_photometric
from engine.data.multicrop import DinoMultiCrop, EvalView, SingleCrop


@pytest.mark.parametrize("bands, dtype", [(3, "uint8"), (13, "uint16")])
def test_dino_batch_shapes_and_dtypes(shard_dir, bands, dtype):
    root = shard_dir(per_shard=[4, 4], bands=bands, size=20, dtype=dtype)
    crops = CropConfig(global_size=16, local_size=8, num_global=2, num_local=3)
    cfg = DataConfig(shards=str(root), batch_size=4, num_workers=0, shuffle_buffer=0, steps_per_epoch=1)
    batch = next(iter(build_pretrain_loader(cfg, crops, "dino", patch_size=4, rank=0, world_size=1)))
    tdt = torch.uint8 if dtype == "uint8" else torch.uint16
    assert batch["global_crops"].shape == (8, bands, 16, 16) and batch["global_crops"].dtype == tdt
    assert batch["local_crops"].shape == (12, bands, 8, 8) and batch["local_crops"].dtype == tdt
    assert batch["masks"].shape == (8, 16) and batch["masks"].dtype == torch.bool
    mae = next(iter(build_pretrain_loader(cfg, crops, "mae", patch_size=4, rank=0, world_size=1)))
    assert set(mae) == {"images"} and mae["images"].shape == (4, bands, 16, 16) and mae["images"].dtype == tdt


def test_crop_major_order_and_bands_never_mixed():
    """13-band uint16: band b of sample i is constant 1000*i + b; every crop keeps that exactly."""
    view = DinoMultiCrop(
        CropConfig(global_size=16, local_size=8, num_local=2),
        patch_size=8,
        num_groups=3,
        photometric=build_photometric(CropConfig(), {"dtype": "uint16", "num_bands": 13}, None),
    )
    rng = np.random.default_rng(0)
    arrs = [
        np.broadcast_to((1000 * i + np.arange(13, dtype=np.uint16))[:, None, None], (13, 24, 30)).copy()
        for i in range(3)
    ]
    batch = view.collate([view(a, rng) for a in arrs], rng)
    assert batch["masks"].shape == (6, 3 * 4)
    for key, n in (("global_crops", 2), ("local_crops", 2)):
        x = batch[key]
        for g in range(n):
            for b in range(3):
                assert torch.all(x[g * 3 + b] == torch.from_numpy(arrs[b][:, :1, :1])), (key, g, b)


def test_rgb_colour_augmentation_only_on_three_bands():
    rng = np.random.default_rng(1)
    rgb = np.random.default_rng(2).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    crops = CropConfig(
        global_size=32, local_size=16, num_local=0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), dihedral=False
    )
    manifest = {"dtype": "uint8", "num_bands": 3}
    view = DinoMultiCrop(crops, patch_size=8, photometric=build_photometric(crops, manifest, None))
    outs = [view(rgb, rng)["global"][0][0] for _ in range(4)]
    assert any(not torch.equal(o, torch.from_numpy(rgb)) for o in outs)  # jitter/blur changed the pixels
    off = CropConfig(**{**vars(crops), "rgb_augment": False})
    no_rgb = DinoMultiCrop(off, patch_size=8, photometric=build_photometric(off, manifest, None))
    assert torch.equal(no_rgb(rgb, rng)["global"][0][0], torch.from_numpy(rgb))  # identity crop, no colour ops
    four = np.concatenate([rgb, rgb[:1]])
    view4 = DinoMultiCrop(crops, patch_size=8, photometric=build_photometric(crops, {**manifest, "num_bands": 4}, None))
    assert torch.equal(view4(four, rng)["global"][0][0], torch.from_numpy(four))  # 4 bands: never colour-jittered


def test_uint16_resize_keeps_dtype_and_range():
    arr = np.zeros((2, 10, 10), dtype=np.uint16)
    arr[:, ::2] = 65535
    out = SingleCrop(23, CropConfig(single_scale=(0.5, 1.0)))(arr, np.random.default_rng(0))["image"]
    assert out.dtype == torch.uint16 and out.shape == (2, 23, 23)
    vals = out.to(torch.int32)
    assert int(vals.max()) <= 65535 and int(vals.min()) >= 0 and int(vals.max()) > 30000


def test_eval_view_is_deterministic_center_crop():
    arr = np.arange(3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16)
    view = EvalView(8, crop_pct=0.5)
    a = view(arr)["image"]
    assert a.dtype == torch.float32 and torch.equal(a, torch.from_numpy(arr[:, 4:12, 4:12]))
    assert torch.equal(EvalView(8, crop_pct=1.0)(arr)["image"], EvalView(8, crop_pct=1.0)(arr)["image"])


def test_finetune_loader_labels_and_eval_split(shard_dir, tmp_path):
    from engine.data import build_eval_loader, build_finetune_loader
    from engine.errors import UserError

    base = tmp_path / "splits"
    shard_dir("splits/train", per_shard=[4, 4], bands=13, size=20, classes=["crop", "forest"])
    shard_dir("splits/val", per_shard=[3], bands=13, size=20, classes=["crop", "forest"])
    cfg = DataConfig(shards=str(base), batch_size=4, num_workers=0, steps_per_epoch=2)
    ft = build_finetune_loader(cfg, CropConfig(), 16, split="train", rank=0, world_size=1)
    batch = next(iter(ft))
    assert batch["images"].shape == (4, 13, 16, 16) and batch["images"].dtype == torch.uint16
    ids = batch["images"][:, 0, 0, 0].to(torch.int64)
    assert torch.equal(batch["labels"], ids % 2) and ft.classes.classes == ["crop", "forest"]
    ev = build_eval_loader(cfg, 16, split="val", rank=0, world_size=1)
    assert ev.num_samples == 3 and [b["labels"].tolist() for b in ev] == [[0, 1, 0]]
    with pytest.raises(UserError, match="no 'test' split"):
        build_eval_loader(cfg, 16, split="test", rank=0, world_size=1)
