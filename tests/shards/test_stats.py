"""Streaming statistics equal numpy's over the same valid pixels."""

import numpy as np
import pytest

from shards.stats import BandStats


def _numpy_stats(valid_per_band):
    return {
        "count": [v.size for v in valid_per_band],
        "mean": [float(v.astype(np.float64).mean()) for v in valid_per_band],
        "std": [float(v.astype(np.float64).std()) for v in valid_per_band],
        "min": [float(v.min()) for v in valid_per_band],
        "max": [float(v.max()) for v in valid_per_band],
        "p2": [float(np.percentile(v.astype(np.float64), 2)) for v in valid_per_band],
        "p98": [float(np.percentile(v.astype(np.float64), 98)) for v in valid_per_band],
    }


def _chips(rng, dtype, n=7, c=3):
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -3000), min(info.max, 9000)
    return [rng.integers(lo, hi, (c, rng.integers(3, 40), rng.integers(3, 40))).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype,nodata", [("uint16", 0.0), ("uint8", None), ("int16", -3000.0), ("int8", 5.0)])
def test_exact_integer_stats_match_numpy(dtype, nodata):
    rng = np.random.default_rng(3)
    chips = _chips(rng, dtype)
    if nodata is not None:
        chips[0][1, :2] = nodata  # some nodata in band 1
    s = BandStats(3, dtype)
    for ch in chips:
        s.add(ch, nodata)
    got = s.result()
    valid = []
    for b in range(3):
        v = np.concatenate([ch[b].ravel() for ch in chips])
        valid.append(v[v != nodata] if nodata is not None else v)
    want = _numpy_stats(valid)
    assert got["count"] == want["count"]
    for k in ("mean", "std", "min", "max", "p2", "p98"):  # exact histogram: percentiles exact too
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-9, err_msg=k)


def test_padding_without_nodata_is_not_counted():
    rng = np.random.default_rng(0)
    chip = rng.integers(1, 100, (2, 8, 8)).astype(np.uint16)
    padded = chip.copy()
    padded[:, 6:] = 0  # 16 padded pixels filled with 0 (no nodata value to mark them)
    s = BandStats(2, "uint16")
    s.add(padded, None, pad_pixels=16, pad_value=0)
    assert s.result()["count"] == [48, 48]
    assert s.result()["min"] == [float(chip[0, :6].min()), float(chip[1, :6].min())]


def test_float_stats_exclude_nan_and_nodata():
    rng = np.random.default_rng(1)
    chips = [rng.normal(0.3, 0.1, (2, 20, 30)).astype(np.float32) for _ in range(4)]
    chips[1][0, :3] = np.nan
    chips[2][1, 5:] = -9999.0
    s = BandStats(2, "float32")
    for ch in chips:
        s.add(ch, -9999.0)
    got = s.result()
    valid = []
    for b in range(2):
        v = np.concatenate([ch[b].ravel() for ch in chips]).astype(np.float64)
        valid.append(v[~np.isnan(v) & (v != -9999.0)])
    want = _numpy_stats(valid)
    assert got["count"] == want["count"]
    for k in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, err_msg=k)
    for k in ("p2", "p98"):  # 4096-bin histogram: within half a bin (<= range / 4094)
        np.testing.assert_allclose(got[k], want[k], atol=(max(want["max"]) - min(want["min"])) / 2000, err_msg=k)


def test_float_histogram_survives_growing_ranges_and_merges():
    rng = np.random.default_rng(2)
    parts = [rng.normal(0, 1, (1, 50, 50)), rng.normal(1000, 5, (1, 50, 50)), rng.normal(-3e5, 1, (1, 10, 10))]
    one = BandStats(1, "float64")
    for p in parts:
        one.add(p)
    a, b = BandStats(1, "float64"), BandStats(1, "float64")
    a.add(parts[0])
    b.add(parts[1])
    b.add(parts[2])
    a.merge(b)
    v = np.concatenate([p.ravel() for p in parts])
    for s in (one, a):
        r = s.result()
        assert r["count"] == [v.size]
        np.testing.assert_allclose(r["mean"], [v.mean()], rtol=1e-9)
        np.testing.assert_allclose(r["std"], [v.std()], rtol=1e-9)
        span = v.max() - v.min()
        for q, k in ((2, "p2"), (98, "p98")):
            assert abs(r[k][0] - np.percentile(v, q)) <= span / 2000


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_sparse_state_round_trip_and_order_free_merge(dtype):
    rng = np.random.default_rng(4)
    chips = [(rng.random((2, 9, 11)) * 500).astype(dtype) for _ in range(5)]
    parts = []
    for ch in chips:
        s = BandStats(2, dtype)
        s.add(ch)
        parts.append(s.to_arrays())
    fwd, rev = BandStats(2, dtype), BandStats(2, dtype)
    for p in parts:
        fwd.merge_arrays(p)
    for p in reversed(parts):
        rev.merge_arrays(p)
    whole = BandStats(2, dtype)
    for ch in chips:
        whole.add(ch)
    for k, v in whole.result().items():
        np.testing.assert_allclose(fwd.result()[k], v, rtol=1e-12, err_msg=k)
        np.testing.assert_allclose(rev.result()[k], v, rtol=1e-12, err_msg=k)


def test_empty_band_reports_nulls():
    s = BandStats(1, "uint16")
    s.add(np.zeros((1, 4, 4), np.uint16), 0.0)
    assert s.result() == {
        "count": [0],
        "mean": [None],
        "std": [None],
        "min": [None],
        "max": [None],
        "p2": [None],
        "p98": [None],
    }


def test_manifest_stats_equal_numpy_over_the_written_chips(tmp_path, run_convert, read_shards):
    from shards.synthetic import generate_archive

    generate_archive(tmp_path / "in", 5, (40, 36), kind="s2", nodata_fraction=0.3)
    run_convert(
        tmp_path / "in",
        tmp_path / "out",
        "--chip-size",
        "16",
        "--stride",
        "12",
        "--edge",
        "pad",
        "--bands",
        "B2,B8A,B12",
        "--max-samples-per-shard",
        "7",
    )
    samples, m = read_shards(tmp_path / "out")
    stack = [a for a, _ in samples.values()]
    valid = [np.concatenate([a[b].ravel() for a in stack]) for b in range(3)]
    valid = [v[v != 0] for v in valid]  # nodata 0, also what edge padding was filled with
    want = _numpy_stats(valid)
    assert m["stats"]["count"] == want["count"]
    for k in ("mean", "std", "min", "max", "p2", "p98"):
        np.testing.assert_allclose(m["stats"][k], want[k], rtol=1e-12, err_msg=k)


def test_float_archive_with_nan_nodata_and_padding(tmp_path, run_convert, read_shards):
    import rasterio
    from rasterio.transform import Affine

    rng = np.random.default_rng(5)
    (tmp_path / "in").mkdir()
    for i in range(2):
        data = rng.normal(0.2, 0.05, (4, 30, 26)).astype(np.float32)
        data[:, :3, :5] = np.nan
        with rasterio.open(
            tmp_path / "in" / f"f{i}.tif",
            "w",
            driver="GTiff",
            width=26,
            height=30,
            count=4,
            dtype="float32",
            nodata=float("nan"),
            crs="EPSG:4326",
            transform=Affine(0.001, 0, 10, 0, -0.001, 50),
        ) as dst:
            dst.write(data)
    run_convert(tmp_path / "in", tmp_path / "out", "--chip-size", "16", "--edge", "pad")
    samples, m = read_shards(tmp_path / "out")
    assert m["dtype"] == "float32" and len(samples) == 8 and m["nodata"] == "nan"  # strict JSON: STAC convention
    assert all(meta["gsd"] is None for _, meta in samples.values())  # degrees: no metric gsd
    valid = [np.concatenate([a[b].ravel() for a, _ in samples.values()]).astype(np.float64) for b in range(4)]
    valid = [v[~np.isnan(v)] for v in valid]  # NaN nodata and NaN edge padding
    want = _numpy_stats(valid)
    assert m["stats"]["count"] == want["count"] == [2 * (30 * 26 - 15)] * 4
    for k in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(m["stats"][k], want[k], rtol=1e-9, err_msg=k)
    for k in ("p2", "p98"):
        np.testing.assert_allclose(m["stats"][k], want[k], atol=(max(want["max"]) - min(want["min"])) / 2000)


@pytest.mark.parametrize("dtype,nodata,pad", [("uint16", 0.0, 0), ("int16", None, 5), ("uint8", 7.0, 3)])
def test_band_by_band_adder_equals_add(dtype, nodata, pad):
    """ShardWriter.write(visit=...) feeds the stats one band at a time; same result as add()."""
    rng = np.random.default_rng(4)
    chips = _chips(rng, dtype, n=4, c=3)
    a, b = BandStats(3, dtype), BandStats(3, dtype)
    for ch in chips:
        a.add(ch, nodata, pad, 0)
        adder = b.band_adder(nodata, pad, 0)
        for i in range(ch.shape[0]):
            adder(i, ch[i].reshape(-1))
    assert a.result() == b.result() and (a.hist == b.hist).all()
    assert BandStats(3, "float32").band_adder(None) is None
