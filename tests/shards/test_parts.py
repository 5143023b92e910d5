"""--part K/N + merge == one run, byte for byte; shards are full after the nodata filter."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from shards.convert import main
from shards.merge import merge
from shards.synthetic import generate_archive


def _files(d):
    """{name: bytes} of everything a conversion leaves in its --out."""
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def _float_archive(root, n=7):
    root.mkdir(parents=True)
    for i in range(n):
        data = np.random.default_rng(i).normal(0.2, 0.05, (2, 24, 32)).astype(np.float32)
        data[:, : 10 + i] = np.nan  # top rows missing: the nodata filter drops some chips
        with rasterio.open(
            root / f"f{i}.tif",
            "w",
            driver="GTiff",
            width=32,
            height=24,
            count=2,
            dtype="float32",
            crs="EPSG:32633",
            transform=Affine(10, 0, 0, 0, -10, 0),
        ) as dst:
            dst.write(data)


@pytest.mark.parametrize(
    "kind,flags",
    [
        ("s2", ["--max-samples-per-shard", "5"]),  # shards as planned
        ("s2", ["--max-samples-per-shard", "1"]),  # the truncated input's shards end up empty: not listed
        ("s2", ["--max-samples-per-shard", "5", "--max-nodata", "0.3"]),  # repacked after the filter
        ("float", ["--max-samples-per-shard", "3", "--max-nodata", "0.5"]),  # float moments, plan order
    ],
)
def test_three_parts_merged_are_byte_identical_to_one_run(tmp_path, kind, flags):
    if kind == "s2":
        generate_archive(
            tmp_path / "in",
            7,
            (40, 32),
            kind="s2",
            nodata_fraction=0.3,
            classes=["a", "b", "c"],
            bad_files=["truncated", "garbage"],
        )
        flags = flags + ["--labels", "folder", "--chip-size", "16", "--edge", "pad"]
    else:
        _float_archive(tmp_path / "in")
        flags = flags + ["--chip-size", "8"]
    common = [str(tmp_path / "in"), *flags]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    for k in (1, 2, 3):
        assert main(common + ["--out", str(tmp_path / f"p{k}"), "--part", f"{k}/3"]) == 0
    one = _files(tmp_path / "one")
    listed = json.loads(one["manifest.json"])["shards"]
    assert all(s["count"] > 0 for s in listed), "a shard without samples is listed"
    assert sorted(n for n in one if n.endswith(".tar")) == sorted(s["name"] for s in listed)
    part_shards = [n for k in (1, 2, 3) for n in _files(tmp_path / f"p{k}") if n.endswith(".tar")]
    if "--max-nodata" not in flags:
        assert sorted(part_shards) == sorted(n for n in one if n.endswith(".tar"))  # global numbers, no gaps
    merge([str(tmp_path / f"p{k}") for k in (3, 1, 2)], str(tmp_path / "merged"), workers=1 if kind == "s2" else 2)
    merged = _files(tmp_path / "merged")
    assert merged.keys() == one.keys()
    for name in one:
        assert merged[name] == one[name], name
    assert main(["verify", str(tmp_path / "merged")]) == 0
    if "--max-nodata" in flags:  # full shards except the last
        counts = [s["count"] for s in json.loads(one["manifest.json"])["shards"]]
        cap = int(flags[flags.index("--max-samples-per-shard") + 1])
        assert counts[:-1] == [cap] * (len(counts) - 1) and 0 < counts[-1] <= cap
    else:  # hard links: the merged archive costs no extra space
        shard = next(n for n in merged if n.endswith(".tar"))
        assert os.stat(tmp_path / "merged" / shard).st_nlink == 2


def test_balanced_shards_after_nodata_filter(tmp_path, run_convert):
    # 6 files x 9 chips of 16 px; the top 40 % of every image is nodata, so row 0 of chips is dropped
    generate_archive(tmp_path / "in", 6, 48, kind="s2", nodata_fraction=0.4)
    s = run_convert(
        tmp_path / "in",
        tmp_path / "out",
        "--chip-size",
        "16",
        "--max-nodata",
        "0.5",
        "--max-samples-per-shard",
        "4",
        "--workers",
        "2",
    )
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert s.dropped == 18 and m["total_samples"] == 36
    assert [sh["count"] for sh in m["shards"]] == [4] * 9 and not (tmp_path / "out" / ".convert-state").exists()


def test_interrupted_repacked_run_resumes_to_identical_output(tmp_path, run_convert):
    generate_archive(tmp_path / "in", 6, 48, kind="s2", nodata_fraction=0.4)
    flags = ("--chip-size", "16", "--max-nodata", "0.5", "--max-samples-per-shard", "4")
    run_convert(tmp_path / "in", tmp_path / "ref", *flags)

    def stop(res):
        if res.index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_convert(tmp_path / "in", tmp_path / "out", *flags, on_shard=stop)
    assert not list((tmp_path / "out").glob("*.tar"))  # planned shards are built in the run state
    s = run_convert(tmp_path / "in", tmp_path / "out", *flags, "--resume")
    assert s.kept == 3 and _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_merge_refuses_parts_that_do_not_fit_and_finishes_an_interrupted_merge(tmp_path, capsys):
    generate_archive(tmp_path / "in", 4, 32, kind="rgb")
    common = [str(tmp_path / "in"), "--chip-size", "16", "--max-samples-per-shard", "3"]
    for k in (1, 2, 3):
        main(common + ["--out", str(tmp_path / f"p{k}"), "--part", f"{k}/3"])
    main(common + ["--out", str(tmp_path / "q2"), "--part", "2/3", "--chip-size", "8"])

    def fail(argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith(("error: merge", "error: --out"))
        return err[0]

    assert "missing 3/3" in fail(["merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out", str(tmp_path / "m")])
    assert "chip" in fail(
        ["merge", str(tmp_path / "p1"), str(tmp_path / "q2"), str(tmp_path / "p3"), "--out", str(tmp_path / "m")]
    )
    assert "no part.json" in fail(["merge", str(tmp_path / "in"), "--out", str(tmp_path / "m")])
    # a merge killed after linking some shards: the same command completes it
    (tmp_path / "m").mkdir()
    first = sorted(p.name for p in (tmp_path / "p1").glob("*.tar"))[0]
    os.link(tmp_path / "p1" / first, tmp_path / "m" / first)
    assert (
        main(["merge", str(tmp_path / "p1"), str(tmp_path / "p2"), str(tmp_path / "p3"), "--out", str(tmp_path / "m")])
        == 0
    )
    assert main(["verify", str(tmp_path / "m")]) == 0
    assert "already holds a finished archive" in fail(
        ["merge", str(tmp_path / "p1"), str(tmp_path / "p2"), str(tmp_path / "p3"), "--out", str(tmp_path / "m")]
    )
