"""Photometric augmentation: the worker and device paths agree, per op and over a whole pipeline."""

import numpy as np
import pytest
import torch

from engine.config import CropConfig, DataConfig
from engine.data import build_pretrain_loader, to_device
from engine.data.builders import build_normalizer, build_photometric
from engine.data.multicrop import DinoMultiCrop
from engine.data.photometric import GLOBAL_1, GLOBAL_2, LOCAL, PARAMS_SUFFIX, BandRange, Photometric
from engine.data.transforms import cast_back

RGB = {"dtype": "uint8", "num_bands": 3}


def _smooth_images(n, bands=3, size=48, dtype=np.uint8, hi=255.0, seed=0):
    """Low-frequency random images (blur and resize act on them as on real scenes)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, hi, (n, bands, 6, 6)).astype(np.float32))
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return list(x.round().clamp(0, hi).numpy().astype(dtype))


def _rows(photometric, n, bands, seed=0):
    rng = np.random.default_rng(seed)
    kinds = [GLOBAL_1, GLOBAL_2, LOCAL]
    return torch.from_numpy(np.stack([photometric.draw(rng, kinds[i % 3], bands) for i in range(n)]))


@pytest.mark.parametrize("mode", ["colour", "shared", "per_band", "blur"])
def test_batched_apply_equals_one_crop_at_a_time(mode):
    """The device path (all crops at once) computes what the worker path (one crop) computes."""
    bands = 3 if mode == "colour" else 5
    rng_range = BandRange([10.0] * bands, [900.0] * bands)
    ph = Photometric(
        rng_range,
        rgb=mode == "colour",
        spectral=mode if mode in ("shared", "per_band") else "none",
        blur_all_bands=True,
    )
    n = 24
    params = _rows(ph, n, bands)
    x = torch.from_numpy(np.stack(_smooth_images(n, bands, 40, np.float32, 1000.0)))
    batched = ph.apply(x.clone(), params)
    single = torch.cat([ph.apply(x[i : i + 1].clone(), params[i : i + 1]) for i in range(n)])
    torch.testing.assert_close(batched, single, atol=2e-4, rtol=1e-5)
    assert not torch.allclose(batched, x)  # something happened


@pytest.mark.parametrize(
    "bands, dtype, manifest_extra",
    [
        (3, np.uint8, {}),
        (3, np.uint16, {"p2": [80.0, 60.0, 50.0], "p98": [3000.0, 2600.0, 2500.0]}),
        (6, np.uint16, {"p2": [50.0] * 6, "p98": [2000.0] * 6}),
    ],
)
def test_worker_and_device_paths_agree_per_crop(bands, dtype, manifest_extra):
    """Same sample, same generator: identical geometry and parameters; with identity geometry the
    two paths differ only by the worker's final rounding (dtype tolerance: half a level)."""
    hi = 255.0 if dtype == np.uint8 else 4000.0
    manifest = {"dtype": np.dtype(dtype).name, "num_bands": bands, "stats": manifest_extra}
    crops = CropConfig(
        global_size=40,
        local_size=40,
        num_local=3,
        global_scale=(1.0, 1.0),
        local_scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        spectral_jitter="shared" if bands != 3 else "none",
        blur_all_bands=True,
    )
    ph = build_photometric(crops, manifest, None)
    worker = DinoMultiCrop(crops, patch_size=8, photometric=ph)
    device = DinoMultiCrop(crops, patch_size=8, photometric=ph, on_device=True)
    images = _smooth_images(8, bands, 40, dtype, hi, seed=3)
    rw, rd = np.random.default_rng(7), np.random.default_rng(7)
    bw = worker.collate([worker(a, rw) for a in images], rw)
    bd = device.collate([device(a, rd) for a in images], rd)
    assert rw.random() == rd.random()  # both paths consumed the generator identically
    assert set(bd) == set(bw) | {"global_crops" + PARAMS_SUFFIX, "local_crops" + PARAMS_SUFFIX}
    assert torch.equal(bw["masks"], bd["masks"])
    for key in ("global_crops", "local_crops"):
        on_device = ph.apply(bd[key].to(torch.float32), bd[key + PARAMS_SUFFIX])
        diff = (bw[key].to(torch.float32) - on_device).abs()
        assert float(diff.max()) <= 0.5 + 1e-3 * hi, key
        assert not torch.equal(bw[key], bd[key])  # the worker path did augment


def _normalised_crops(root, augment_on, steps=12):
    cfg = DataConfig(
        shards=str(root), batch_size=8, num_workers=0, shuffle_buffer=16, steps_per_epoch=steps, augment_on=augment_on
    )
    crops = CropConfig(global_size=32, local_size=16, num_local=4)
    loader = build_pretrain_loader(cfg, crops, "dino", patch_size=8, rank=0, world_size=1, seed=5)
    assert (loader.photometric is not None) == (augment_on == "device")
    out = {"global_crops": [], "local_crops": []}
    for batch in loader:
        b = to_device(batch, "cpu", loader.normalizer, loader.photometric)
        for k in out:
            out[k].append(b[k])
    return {k: torch.cat(v) for k, v in out.items()}


def test_whole_pipeline_statistics_match(tmp_path):
    """A few hundred crops: per-band mean, std and histogram of the device path match the worker path.
    Histograms are taken in source units with bins of 16 levels edged at half levels, so the worker's
    rounding to uint8 never moves a value across a bin edge."""
    import json

    root = _archive(tmp_path / "rgb", _smooth_images(24, 3, 48, seed=4), "uint8")
    stats = json.loads((root / "manifest.json").read_text())["stats"]
    mean, std = torch.tensor(stats["mean"]).view(3, 1), torch.tensor(stats["std"]).view(3, 1)
    w = _normalised_crops(root, "worker")
    d = _normalised_crops(root, "device")
    for key in w:
        a, b = w[key].transpose(0, 1).reshape(3, -1), d[key].transpose(0, 1).reshape(3, -1)
        assert a.shape[1] >= 300 * (16 * 16)
        torch.testing.assert_close(a.mean(1), b.mean(1), atol=0.005, rtol=0)
        torch.testing.assert_close(a.std(1), b.std(1), atol=0.005, rtol=0)
        a, b = a * std + mean, b * std + mean
        for c in range(3):
            ha = torch.histc(a[c], 16, -0.5, 255.5) / a.shape[1]
            hb = torch.histc(b[c], 16, -0.5, 255.5) / b.shape[1]
            assert float((ha - hb).abs().sum()) < 0.01, (key, c)


def test_sixteen_bit_crops_stay_within_documented_range(tmp_path):
    """A Landsat-like 16-bit archive (heavy tail, saturated pixels far above p98): every normalised
    colour-augmented crop lies within [(p2 - mean) / std, (p98 - mean) / std] per band, on both paths."""
    rng = np.random.default_rng(0)
    scenes = [np.minimum(rng.gamma(2.0, 2000.0, (3, 40, 40)), 24147).astype(np.uint16) for _ in range(12)]
    for s in scenes:
        s[:, :2, :2] = 24147
    _archive(tmp_path / "l8", scenes, "uint16")
    stats = _stats(scenes)
    lo = (np.array(stats["p2"]) - np.array(stats["mean"])) / np.array(stats["std"])
    hi = (np.array(stats["p98"]) - np.array(stats["mean"])) / np.array(stats["std"])
    for augment_on in ("worker", "device"):
        crops = _normalised_crops(tmp_path / "l8", augment_on, steps=3)
        for key, x in crops.items():
            per_band = x.transpose(0, 1).reshape(3, -1)
            assert (per_band.min(1).values >= torch.tensor(lo, dtype=torch.float32) - 1e-3).all(), (augment_on, key)
            assert (per_band.max(1).values <= torch.tensor(hi, dtype=torch.float32) + 1e-3).all(), (augment_on, key)
            assert float(x.abs().max()) < 5.0


def _stats(scenes):
    px = np.concatenate([s.reshape(s.shape[0], -1).astype(np.float64) for s in scenes], axis=1)
    return {
        "count": [px.shape[1]] * px.shape[0],
        "mean": px.mean(1).tolist(),
        "std": px.std(1).tolist(),
        "min": px.min(1).tolist(),
        "max": px.max(1).tolist(),
        "p2": np.percentile(px, 2, axis=1).tolist(),
        "p98": np.percentile(px, 98, axis=1).tolist(),
    }


def _archive(root, scenes, dtype):
    """A two-shard archive (tests/engine/data/fake_shards layout) holding ``scenes``, with their stats."""
    import io
    import json
    import sys
    import tarfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fake_shards import npy_bytes, write_shards

    half = len(scenes) // 2
    manifest = write_shards(
        root, per_shard=[half, len(scenes) - half], bands=scenes[0].shape[0], size=scenes[0].shape[1], dtype=dtype
    )
    it = iter(scenes)
    for entry in manifest["shards"]:
        path = root / entry["name"]
        with tarfile.open(path) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
        with tarfile.open(path, "w") as tf:
            for m, data in members:
                if m.name.endswith(".img.npy"):
                    data = npy_bytes(next(it))
                    m.size = len(data)
                tf.addfile(m, io.BytesIO(data))
    manifest["stats"] = _stats(scenes)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_spectral_jitter_shared_factors_keep_band_ratios():
    ph = Photometric(BandRange([0.0] * 4, [100.0] * 4), rgb=True, spectral="shared")
    rows = _rows(ph, 60, 4)
    jittered = rows[rows[:, 0] >= 0]
    assert len(jittered) > 20
    bright, contrast = jittered[:, 9:13], jittered[:, 13:17]
    assert torch.equal(bright, bright[:, :1].expand(-1, 4)) and torch.equal(contrast, contrast[:, :1].expand(-1, 4))
    x = torch.rand(1, 4, 16, 16) * 50 + 10  # stays inside [lo, hi] under brightness alone
    row = jittered[:1].clone()
    row[0, 0:4] = torch.tensor([0.0, -1, -1, -1])  # brightness only
    y = ph.apply(x.clone(), row)
    torch.testing.assert_close(y[0, 1:] / y[0, :1], x[0, 1:] / x[0, :1])  # band ratios kept
    per_band = Photometric(BandRange([0.0] * 4, [100.0] * 4), spectral="per_band")
    assert not torch.equal(_rows(per_band, 1, 4, seed=3)[0, 9:13], _rows(per_band, 1, 4, seed=3)[0, 9:10].expand(4))


def test_device_resume_is_the_continuation(shard_dir):
    """Exact resume with device-side photometrics: parameters are drawn in the workers from the
    step's generator, so the resumed batches (and their parameter rows) equal the uninterrupted run's."""
    import itertools

    root = shard_dir(per_shard=[5, 4, 6], size=12, dtype="uint8")

    def make():
        cfg = DataConfig(
            shards=str(root), batch_size=2, num_workers=2, shuffle_buffer=4, steps_per_epoch=5, augment_on="device"
        )
        return build_pretrain_loader(
            cfg,
            CropConfig(global_size=8, local_size=8, num_local=2),
            "dino",
            patch_size=8,
            rank=0,
            world_size=1,
            seed=3,
        )

    full = list(itertools.islice(make().infinite(), 7))
    first = make()
    head = list(itertools.islice(first.infinite(), 3))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = list(itertools.islice(resumed.infinite(), 4))
    for a, b in zip(head + tail, full):
        assert a.keys() == b.keys() and "global_crops" + PARAMS_SUFFIX in a
        assert all(torch.equal(a[k], b[k]) for k in a)
    for loader in (first, resumed):
        loader.close()


def test_to_device_refuses_parameters_without_photometric():
    batch = {
        "global_crops": torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
        "global_crops" + PARAMS_SUFFIX: torch.zeros(2, 15),
    }
    with pytest.raises(ValueError, match="photometric"):
        to_device(batch, "cpu", build_normalizer(DataConfig(mean=[0, 0, 0], std=[1, 1, 1]), None))


def test_worker_path_output_is_integer_source_dtype():
    ph = build_photometric(CropConfig(), RGB, None)
    x = torch.from_numpy(np.stack(_smooth_images(4, 3, 16))).to(torch.float32)
    y = cast_back(ph.apply(x, _rows(ph, 4, 3)), np.uint8)
    assert y.dtype == torch.uint8 and y.shape == x.shape


def test_pretrain_runs_with_device_augmentation(shard_dir, tmp_path):
    """The launcher hands the loader's photometric to to_device: two DINO steps with the colour ops
    applied on the (CPU) device, in a subprocess bounded by a timeout."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    tiny = repo / "engine" / "presets" / "tiny_cpu.yaml"
    root = shard_dir(per_shard=[8, 8], size=64, dtype="uint8")
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "launchers/pretrain.py",
        "--config",
        str(tiny),
        "--data.shards",
        str(root),
        "--data.augment_on",
        "device",
        "--train.max_steps",
        "2",
        "--train.log_every",
        "1",
        "--train.output_dir",
        str(tmp_path / "run"),
        "--train.export",
        "false",
    ]
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its loader workers
        pytest.fail(f"launchers/pretrain.py hung; stderr tail:\n{proc.communicate()[1][-2000:]}")
    assert proc.returncode == 0, err[-3000:]
    assert "photometric augmentation on the device" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"loss"') >= 2


def test_band_range_from_manifest():
    from engine.data.builders import band_range
    from engine.errors import UserError

    assert band_range({"dtype": "uint8", "num_bands": 2}, None).hi.tolist() == [255.0, 255.0]
    stats = {"p2": [100.0, 7.0, 7.0], "p98": [900.0, 7.0, 7.0], "max": [4000.0, 50.0, 7.0]}
    r = band_range({"dtype": "uint16", "num_bands": 3, "stats": stats}, [2, 0, 1])
    assert r.lo.tolist() == [7.0, 100.0, 7.0] and r.hi.tolist() == [8.0, 900.0, 50.0]  # degenerate bands widened
    with pytest.raises(UserError, match="p2/p98"):
        band_range({"dtype": "uint16", "num_bands": 3, "stats": {}}, None)


def test_nodata_pixels_stay_masked_on_both_paths():
    """16-bit RGB with nodata 0 (a scene border): colour ops clip to [p2, p98], which would lift the
    border off 0; after normalisation the border is still 0 ("no information") on both paths."""
    manifest = {
        "dtype": "uint16",
        "num_bands": 3,
        "nodata": 0,
        "stats": {"mean": [2000.0] * 3, "std": [500.0] * 3, "p2": [900.0] * 3, "p98": [3100.0] * 3},
    }
    crops = CropConfig(
        global_size=24,
        local_size=24,
        num_local=1,
        global_scale=(1.0, 1.0),
        local_scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        dihedral=False,
    )
    ph = build_photometric(crops, manifest, None)
    normalizer = build_normalizer(DataConfig(), manifest)
    img = _smooth_images(1, 3, 24, np.uint16, 4000.0, seed=2)[0]
    img[:, :, :6] = 0
    out = {}
    for on_device in (False, True):
        view = DinoMultiCrop(crops, patch_size=8, photometric=ph, on_device=on_device)
        rng = np.random.default_rng(0)
        batch = view.collate([view(img, rng)], rng)
        out[on_device] = to_device(batch, "cpu", normalizer, ph if on_device else None)["global_crops"]
    for x in out.values():
        assert torch.equal(x[..., :6], torch.zeros_like(x[..., :6]))
        assert float(x[..., 6:].abs().min()) > 0 or float(x[..., 6:].std()) > 0
