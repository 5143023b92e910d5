"""One file per band: scenes stacked on a reference grid equal rasterio's own reprojection."""

import json

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import reproject

from shards.convert import main

X0, Y0 = 500000.0, 4600000.0


def _band(path, res, size_m, seed, nodata=None, driver="GTiff", border=0):
    """One uint16 band of a size_m x size_m scene at ``res`` metres (UTM 33N); ``border`` blanks
    that many rows at the top with 0."""
    n = int(size_m // res)
    rng = np.random.default_rng(seed)
    data = rng.integers(200, 5000, (1, n, n)).astype(np.uint16)
    data[:, :border] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver=driver,
        width=n,
        height=n,
        count=1,
        dtype="uint16",
        crs="EPSG:32633",
        transform=Affine(res, 0, X0, 0, -res, Y0),
        nodata=nodata,
    )
    if driver == "JP2OpenJPEG":
        profile.update(QUALITY=100, REVERSIBLE="YES")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return data[0]


def _expected(src, src_res, dst_res, size_m, method, nodata=None):
    n = int(size_m // dst_res)
    out = np.zeros((n, n), np.uint16)
    reproject(
        src,
        out,
        src_transform=Affine(src_res, 0, X0, 0, -src_res, Y0),
        src_crs="EPSG:32633",
        dst_transform=Affine(dst_res, 0, X0, 0, -dst_res, Y0),
        dst_crs="EPSG:32633",
        resampling=method,
        src_nodata=nodata,
        dst_nodata=nodata,
    )
    return out


def _samples(out):
    import io
    import tarfile

    m = json.loads((out / "manifest.json").read_text())
    got = {}
    for s in m["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            mem = {i.name: tar.extractfile(i).read() for i in tar}
        for name, data in mem.items():
            if name.endswith(".img.npy"):
                key = name[: -len(".img.npy")]
                got[key] = (np.load(io.BytesIO(data)), json.loads(mem[key + ".json"]))
    return got, m


@pytest.mark.parametrize("method", ["bilinear", "nearest"])
def test_mixed_resolution_bands_match_rasterio_reprojection(tmp_path, method):
    # Landsat-style names; B4/B8 at 10 m, B5 at 20 m, B1 at 60 m, plus a QA band that is not asked for
    src = {}
    for i, (band, res) in enumerate([("B4", 10), ("B8", 10), ("B5", 20), ("B1", 60)]):
        src[band] = (_band(tmp_path / "in" / "tile" / f"S1_{band}.TIF", res, 600, i), res)
    _band(tmp_path / "in" / "tile" / "S1_QA.TIF", 30, 600, 9)
    rc = main(
        [
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "out"),
            "--band-files",
            "{scene}_{band}.TIF",
            "--bands",
            "B5,B4,B8,B1",
            "--chip-size",
            "20",
            "--resampling",
            method,
        ]
    )
    assert rc == 0
    got, m = _samples(tmp_path / "out")
    assert m["band_names"] == ["B5", "B4", "B8", "B1"] and m["dtype"] == "uint16" and len(got) == 9
    full = np.stack([_expected(src[b][0], src[b][1], 10, 600, Resampling[method]) for b in m["band_names"]])
    for key, (arr, meta) in got.items():
        col, row, w, h = meta["window"]
        np.testing.assert_array_equal(arr, full[:, row : row + h, col : col + w])
        assert meta["transform"] == [10.0, 0.0, X0 + 10 * col, 0.0, -10.0, Y0 - 10 * row]  # the 10 m grid
        assert meta["crs"] == "EPSG:32633" and meta["gsd"] == 10.0 and meta["source"] == "tile/S1"
        assert meta["band_sources"] == [f"tile/S1_{b}.TIF" for b in m["band_names"]]
        assert key == f"tile/S1_y{row}_x{col}"


def test_resolution_flag_resamples_to_a_coarser_grid_and_missing_band_skips_scene(tmp_path):
    a4 = _band(tmp_path / "in" / "A_B4.tif", 10, 400, 1, nodata=0, border=4)
    a5 = _band(tmp_path / "in" / "A_B5.tif", 20, 400, 2, nodata=0)
    _band(tmp_path / "in" / "B_B4.tif", 10, 400, 3)  # scene B has no B5
    rc = main(
        [
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "out"),
            "--band-files",
            "{scene}_{band}.tif",
            "--bands",
            "B4,B5",
            "--resolution",
            "20",
            "--resampling",
            "average",
        ]
    )
    assert rc == 0
    got, m = _samples(tmp_path / "out")
    assert list(got) == ["A"] and m["nodata"] == 0.0
    arr, meta = got["A"]
    np.testing.assert_array_equal(arr[0], _expected(a4, 10, 20, 400, Resampling.average, nodata=0))
    np.testing.assert_array_equal(arr[1], a5)  # already on the 20 m grid: read as is
    assert meta["transform"] == [20.0, 0.0, X0, 0.0, -20.0, Y0] and meta["gsd"] == 20.0
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"source": "B", "reason": "scene lacks band(s) B5 (found B4); --bands asks for B4,B5"}]


def test_sentinel2_safe_folders_read_jp2(tmp_path):
    """L1C (IMG_DATA/*.jp2) and L2A (IMG_DATA/R10m|R20m/*_10m.jp2: the finest copy of a band wins)."""
    l1c = tmp_path / "in" / "S2A_MSIL1C_X.SAFE" / "GRANULE" / "L1C_T33TUM_A1" / "IMG_DATA"
    l2a = tmp_path / "in" / "S2B_MSIL2A_Y.SAFE" / "GRANULE" / "L2A_T33TUM_A2" / "IMG_DATA"
    b2 = _band(l1c / "T33TUM_20200101T101421_B02.jp2", 10, 200, 1, driver="JP2OpenJPEG")
    b5 = _band(l1c / "T33TUM_20200101T101421_B05.jp2", 20, 200, 2, driver="JP2OpenJPEG")
    _band(l1c / "T33TUM_20200101T101421_TCI.jp2", 10, 200, 5, driver="JP2OpenJPEG")
    c2 = _band(l2a / "R10m" / "T33TUM_20200102T101421_B02_10m.jp2", 10, 200, 3, driver="JP2OpenJPEG")
    _band(l2a / "R20m" / "T33TUM_20200102T101421_B02_20m.jp2", 20, 200, 7, driver="JP2OpenJPEG")
    c5 = _band(l2a / "R20m" / "T33TUM_20200102T101421_B05_20m.jp2", 20, 200, 4, driver="JP2OpenJPEG")
    rc = main(
        [
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "out"),
            "--band-files",
            "safe",
            "--bands",
            "B2,B5",
            "--resampling",
            "nearest",
        ]
    )
    assert rc == 0
    got, m = _samples(tmp_path / "out")
    assert m["band_names"] == ["B2", "B5"] and len(got) == 2
    by_source = {meta["source"]: arr for arr, meta in got.values()}
    near = Resampling.nearest
    np.testing.assert_array_equal(
        by_source["S2A_MSIL1C_X.SAFE/GRANULE/L1C_T33TUM_A1"], np.stack([b2, _expected(b5, 20, 10, 200, near)])
    )
    np.testing.assert_array_equal(
        by_source["S2B_MSIL2A_Y.SAFE/GRANULE/L2A_T33TUM_A2"], np.stack([c2, _expected(c5, 20, 10, 200, near)])
    )


@pytest.mark.parametrize(
    "flags,what",
    [
        (["--band-files", "{scene}.tif", "--bands", "B4"], "{band}"),
        (["--band-files", "{scene}_{band}.tif"], "--bands"),
        (["--band-files", "{scene}_{band}.tif", "--bands", "B4", "--drop-bands", "B4"], "--drop-bands"),
        (["--resolution", "10"], "--band-files"),
        (["--band-files", "{scene}_{band}.tif", "--bands", "B4", "--resolution", "0"], "--resolution"),
    ],
)
def test_band_file_flag_errors(tmp_path, capsys, flags, what):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and what in err[0]
