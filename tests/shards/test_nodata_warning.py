"""A zero border in files without a nodata value is reported, with the flag that fixes the stats."""

import logging

import numpy as np

from shards.stats import BandStats, undeclared_nodata_warning
from shards.synthetic import default_pixels, generate_archive


def _bordered(rng, class_index, c, h, w):
    x = default_pixels(rng, class_index, c, h, w)
    x[:, : h // 5] = 0  # a 20 % scene border of exact zeros
    return x


def test_zero_border_without_nodata_is_reported(tmp_path, run_convert, caplog):
    generate_archive(tmp_path / "in", 3, 40, kind="s2", nodata=None, pixel_fn=_bordered)
    with caplog.at_level(logging.WARNING):
        run_convert(tmp_path / "in", tmp_path / "out")
    msg = [r.getMessage() for r in caplog.records if "--nodata 0" in r.getMessage()]
    assert len(msg) == 1 and msg[0].startswith("3 file(s) declare no nodata value, yet 20.0 %")
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # declared: the border is excluded and nothing is said
        run_convert(tmp_path / "in", tmp_path / "out2", "--nodata", "0")
        generate_archive(tmp_path / "clean", 2, 40, kind="s2", nodata=None)
        run_convert(tmp_path / "clean", tmp_path / "out3")
    assert not [r for r in caplog.records if "--nodata 0" in r.getMessage()]


def test_warning_uses_the_band_with_fewest_zeros_and_sums_over_shards():
    # a.tif spans two shards: 30 of 1000 pixels are zero in band 0, 12 in band 1 -> 1.2 %
    rec = [["a.tif", 600, [20, 2]], ["a.tif", 400, [10, 10]], ["b.tif", 1000, [500, 5]]]
    msg = undeclared_nodata_warning(rec)
    assert msg.startswith("1 file(s) declare") and "(e.g. 'a.tif': 1.2 %)" in msg
    assert undeclared_nodata_warning([["b.tif", 1000, [500, 5]]]) is None


def test_float_zero_counts():
    s = BandStats(2, "float32")
    chip = np.ones((2, 4, 5), np.float32)
    chip[0, 0] = 0.0
    chip[1, :, 0] = 0.0
    chip[1, 0, 0] = np.nan
    s.add(chip)
    assert s.zero_counts().tolist() == [5, 3]
