"""Every chip equals a direct rasterio windowed read: pixels, dtype, band order, transform."""

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from shards.chips import SENTINEL2_L1C
from shards.synthetic import generate_archive

# the reference reads below go through rasterio's own window_transform (Affine `*`) and open
# PNG/JPEG previews that have no georeferencing by design
pytestmark = pytest.mark.filterwarnings(
    "ignore::PendingDeprecationWarning", "ignore::rasterio.errors.NotGeoreferencedWarning"
)


def _direct(path, window, indexes=None, fill=None):
    """Reference read: rasterio's own boundless windowed read (pads past the edge with fill)."""
    col, row, w, h = window
    with rasterio.open(path) as ds:
        idx = indexes or list(range(1, ds.count + 1))
        arr = ds.read(idx, window=Window(col, row, w, h), boundless=True, fill_value=fill)
        return arr, list(ds.window_transform(Window(col, row, w, h)))[:6]


def test_s2_chips_with_stride_and_pad_match_rasterio(tmp_path, run_convert, read_shards):
    arc = generate_archive(tmp_path / "in", 3, (70, 52), kind="s2", seed=1)
    s = run_convert(
        tmp_path / "in",
        tmp_path / "out",
        "--chip-size",
        "32",
        "--stride",
        "24",
        "--edge",
        "pad",
        "--max-samples-per-shard",
        "5",
    )
    samples, m = read_shards(tmp_path / "out")
    # rows 0,24,48 (48+32 >= 70) x cols 0,24 (24+32 >= 52) = 6 windows per file
    assert s.chips == len(samples) == 18 and m["total_samples"] == 18 and len(m["shards"]) == 4
    assert m["band_names"] == SENTINEL2_L1C and m["dtype"] == "uint16" and m["nodata"] == 0.0
    by_file = {f.relpath: f.path for f in arc.files}
    for key, (arr, meta) in samples.items():
        assert "." not in key
        ref, tr = _direct(by_file[meta["source"]], meta["window"], fill=0)
        assert arr.dtype == np.uint16 and arr.shape == (13, 32, 32)
        np.testing.assert_array_equal(arr, ref)
        assert meta["transform"] == pytest.approx(tr)
        assert meta["crs"] == "EPSG:32633" and meta["band_names"] == SENTINEL2_L1C and meta["gsd"] == 10.0
        assert key.endswith(f"_y{meta['window'][1]}_x{meta['window'][0]}")


def test_edge_drop_keeps_only_inside_windows(tmp_path, run_convert, read_shards):
    generate_archive(tmp_path / "in", 2, (70, 52), kind="rgb")
    run_convert(tmp_path / "in", tmp_path / "out", "--chip-size", "32")
    samples, _ = read_shards(tmp_path / "out")
    assert sorted(tuple(m["window"]) for _, m in samples.values()) == [
        (0, 0, 32, 32),
        (0, 0, 32, 32),
        (0, 32, 32, 32),
        (0, 32, 32, 32),
    ]


def test_max_nodata_drops_mostly_empty_chips(tmp_path, run_convert, read_shards):
    generate_archive(tmp_path / "in", 2, 32, kind="s2", nodata_fraction=0.5)  # top half is nodata
    s = run_convert(tmp_path / "in", tmp_path / "out", "--chip-size", "16", "--max-nodata", "0.5")
    samples, m = read_shards(tmp_path / "out")
    assert s.dropped == 4 and s.chips == 4 and m["total_samples"] == 4
    assert all(meta["window"][1] == 16 for _, meta in samples.values())
    # without nodata, padding is what counts: 8 of 16 rows of the bottom chips are padding
    generate_archive(tmp_path / "rgb", 1, (24, 16), kind="rgb")
    s = run_convert(tmp_path / "rgb", tmp_path / "out2", "--chip-size", "16", "--edge", "pad", "--max-nodata", "0.4")
    assert (s.chips, s.dropped) == (1, 1)


def test_band_selection_by_name_and_index(tmp_path, run_convert, read_shards):
    arc = generate_archive(tmp_path / "in", 2, 24, kind="s2")
    run_convert(tmp_path / "in", tmp_path / "a", "--drop-bands", "B1,B9,B10")
    run_convert(tmp_path / "in", tmp_path / "b", "--bands", "B4,B3,B2")
    run_convert(tmp_path / "in", tmp_path / "c", "--bands", "4,3,2")
    a, ma = read_shards(tmp_path / "a")
    b, mb = read_shards(tmp_path / "b")
    c, _ = read_shards(tmp_path / "c")
    assert ma["band_names"] == [n for n in SENTINEL2_L1C if n not in ("B1", "B9", "B10")]
    assert mb["band_names"] == ["B4", "B3", "B2"] and len(mb["stats"]["mean"]) == 3
    keep = [i + 1 for i, n in enumerate(SENTINEL2_L1C) if n not in ("B1", "B9", "B10")]
    for f in arc.files:
        key = f.relpath[:-4]
        np.testing.assert_array_equal(a[key][0], _direct(f.path, (0, 0, 24, 24), keep)[0])
        np.testing.assert_array_equal(b[key][0], _direct(f.path, (0, 0, 24, 24), [4, 3, 2])[0])
        np.testing.assert_array_equal(b[key][0], c[key][0])


def test_resize_changes_shape_and_transform_not_dtype(tmp_path, run_convert, read_shards):
    arc = generate_archive(tmp_path / "in", 1, 40, kind="s2")
    run_convert(tmp_path / "in", tmp_path / "out", "--chip-size", "20", "--resize", "10", "--resampling", "average")
    samples, _ = read_shards(tmp_path / "out")
    assert len(samples) == 4
    with rasterio.open(arc.files[0].path) as ds:
        for arr, meta in samples.values():
            col, row, w, h = meta["window"]
            ref = ds.read(
                window=Window(col, row, w, h), out_shape=(13, 10, 10), resampling=rasterio.enums.Resampling.average
            )
            assert arr.dtype == np.uint16 and arr.shape == (13, 10, 10)
            np.testing.assert_array_equal(arr, ref)
            t = ds.window_transform(Window(col, row, w, h))
            assert meta["transform"] == pytest.approx([t.a * 2, t.b, t.c, t.d, t.e * 2, t.f])
            assert meta["gsd"] == 20.0


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_png_and_jpeg_previews(tmp_path, run_convert, read_shards, fmt):
    arc = generate_archive(tmp_path / "in", 2, (30, 40), kind="rgb", fmt=fmt, classes=["a", "b"])
    run_convert(tmp_path / "in", tmp_path / "out", "--labels", "folder")
    samples, m = read_shards(tmp_path / "out")
    assert m["band_names"] == ["red", "green", "blue"] and m["dtype"] == "uint8" and m["classes"] == ["a", "b"]
    for f in arc.files:
        arr, meta = samples[f.relpath.rsplit(".", 1)[0]]
        with rasterio.open(f.path) as ds:
            np.testing.assert_array_equal(arr, ds.read())
        assert meta["crs"] is None and meta["transform"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert meta["label"] == f.label


def test_world_file_sidecar_georeferences_a_png(tmp_path, run_convert, read_shards):
    """GDAL still finds sidecars by name with folder listing off (GDAL_DISABLE_READDIR_ON_OPEN=TRUE in
    raster.READ_OPTIONS; EMPTY_DIR would lose them)."""
    generate_archive(tmp_path / "in", 1, (30, 40), kind="rgb", fmt="png")
    png = next((tmp_path / "in").rglob("*.png"))
    png.with_suffix(".pgw").write_text("10\n0\n0\n-10\n500000\n4000000\n")  # pixel 10 m, top-left corner
    run_convert(tmp_path / "in", tmp_path / "out", "--chip-size", "10")
    samples, _ = read_shards(tmp_path / "out")
    metas = sorted((meta["transform"][2], meta["transform"][5]) for _, meta in samples.values())
    # world files name the centre of the top-left pixel: corner = centre - half a pixel
    assert metas[0] == (499995.0, 3999805.0) and metas[-1] == (500295.0, 4000005.0)
    assert all(meta["transform"][0] == 10.0 for _, meta in samples.values())


def test_labels_from_folder_csv_and_sidecars(tmp_path, run_convert, read_shards):
    arc = generate_archive(
        tmp_path / "in", 4, 16, kind="rgb", classes=["farm", "port"], sidecars=True, labels_csv=True, layout="flat"
    )
    # flat layout: every parent folder is 'in', so folder labels give one class; the CSV gives the truth
    run_convert(tmp_path / "in", tmp_path / "f", "--labels", "folder")
    run_convert(tmp_path / "in", tmp_path / "c", "--labels", arc.labels_csv)
    f, mf = read_shards(tmp_path / "f")
    c, mc = read_shards(tmp_path / "c")
    assert mf["classes"] == ["in"] and mc["classes"] == ["farm", "port"]
    for sf in arc.files:
        meta = c[sf.relpath[:-4]][1]
        assert meta["label"] == sf.label
        # fMoW-style sidecar: gsd/timestamp fill the core fields, the rest is merged as is
        assert meta["gsd"] == 0.5 and meta["timestamp"].startswith("2017-") and meta["utm"] == "33T"
        assert meta["bounding_boxes"][0]["category"] == sf.label


def test_keys_are_stable_dot_free_and_unique(tmp_path, run_convert, read_shards):
    import shutil

    arc = generate_archive(tmp_path / "in", 1, 16, kind="rgb")
    src = arc.files[0].path
    shutil.copy(src, tmp_path / "in" / "scene.v1.tif")
    shutil.copy(src, tmp_path / "in" / "scene_v1.tif")
    shutil.copy(src, tmp_path / "in" / "img_00000.tiff")
    run_convert(tmp_path / "in", tmp_path / "out")
    samples, _ = read_shards(tmp_path / "out")
    keys = sorted(samples)
    assert len(keys) == 4 and all("." not in k for k in keys)
    assert "scene_v1" in keys  # an already-safe name stays readable
    run_convert(tmp_path / "in", tmp_path / "out2")
    assert sorted(read_shards(tmp_path / "out2")[0]) == keys
