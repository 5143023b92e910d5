"""fMoW bounding boxes: one sample per box, grown by the fMoW baseline's context margin."""

import json

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from shards.boxes import box_window, fmow_context
from shards.synthetic import generate_archive

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def test_fmow_context_schedule_and_clipping():
    # the baseline's multipliers by box/image ratio
    assert [fmow_context(r) for r in (0.9, 0.5, 0.45, 0.35, 0.25, 0.15, 0.05)] == [0.15, 0.15, 0.2, 0.3, 0.5, 1, 2]
    # 100 x 40 box in a 1000 x 400 image: ratios 0.1 -> m = 1 both ways: int(100 / 2) = 50, int(40 / 2) = 20
    assert box_window([300, 200, 100, 40], 1000, 400, None) == (250, 180, 200, 80)
    # a fixed margin of 0.15: int(15 / 2) = 7, int(6 / 2) = 3; clipped at the image's top-left corner
    assert box_window([2, 1, 100, 40], 1000, 400, 0.15) == (0, 0, 109, 44)
    assert box_window([5, 5, 2, 50], 100, 100, None) is None  # tiny: width <= 2
    assert box_window([200, 5, 10, 10], 100, 100, 0.0) is None  # outside the image


def _sidecar(path, boxes):
    path.with_suffix(".json").write_text(json.dumps({"gsd": 0.5, "bounding_boxes": boxes}))


def test_crop_boxes_end_to_end(tmp_path, run_convert, read_shards):
    arc = generate_archive(tmp_path / "in", 2, (120, 160), kind="rgb", fmt="jpg", classes=["port", "zoo"])
    boxes = {
        arc.files[0].relpath: [
            {"box": [40, 30, 60, 50], "category": "port", "ID": 7},
            {"box": [0, 0, 1, 1], "category": "port", "ID": 8},
        ],  # tiny: skipped
        arc.files[1].relpath: {"box": [100, 70, 50, 40], "category": "zoo", "ID": 9},  # a single object
    }
    for f in arc.files:
        _sidecar(tmp_path / "in" / f.relpath, boxes[f.relpath])
    run_convert(tmp_path / "in", tmp_path / "out", "--crop-boxes", "--box-context", "0.5", "--labels", "folder")
    samples, m = read_shards(tmp_path / "out")
    assert sorted(samples) == ["port/port_00000_box0", "zoo/zoo_00001_box0"] and m["classes"] == ["port", "zoo"]
    arr, meta = samples["port/port_00000_box0"]
    assert meta["window"] == [25, 18, 90, 74]  # 60 x 50 box grown by int(30 / 2) = 15 and int(25 / 2) = 12 a side
    assert meta["box"] == {"box": [40, 30, 60, 50], "category": "port", "ID": 7} and "bounding_boxes" not in meta
    with rasterio.open(arc.files[0].path) as ds:
        np.testing.assert_array_equal(arr, ds.read(window=Window(25, 18, 90, 74)))
    # clipped at the right and bottom edges of the 160 x 120 image
    assert samples["zoo/zoo_00001_box0"][1]["window"] == [88, 60, 72, 60]
    # resized crops keep the crop's georeferencing, scaled
    run_convert(tmp_path / "in", tmp_path / "r", "--crop-boxes", "--resize", "32")
    resized, _ = read_shards(tmp_path / "r")
    assert all(a.shape == (3, 32, 32) for a, _ in resized.values())


def test_crop_boxes_skips_images_without_boxes_and_rejects_chips(tmp_path, run_convert, capsys):
    from shards.convert import main

    generate_archive(tmp_path / "in", 2, 40, kind="rgb", sidecars=True, layout="flat")
    (tmp_path / "in" / "img_00001.json").unlink()
    run_convert(tmp_path / "in", tmp_path / "out", "--crop-boxes")
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [e["source"] for e in skipped] == ["img_00001.tif"] and "bounding_boxes" in skipped[0]["reason"]
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--crop-boxes", "--chip-size", "16"])
    assert e.value.code == 2 and "--crop-boxes" in capsys.readouterr().err
