"""Bad inputs are skipped and reported; user mistakes are one line and exit code 2."""

import json
import subprocess
import sys

import pytest

from shards.convert import main
from shards.synthetic import generate_archive


def _fail(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_corrupt_truncated_and_mismatched_files_are_skipped(tmp_path, capsys, read_shards):
    arc = generate_archive(tmp_path / "in", 3, 24, kind="s2", bad_files=["garbage", "truncated", "bandcount"])
    (tmp_path / "in" / "notes.txt").write_text("not an image, not listed")
    rc = main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--chip-size", "12"])
    assert rc == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: 3 files -> 12 chips in 1 shards, 3 skipped") and "MB/s" in summary
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    reasons = {e["source"]: e["reason"] for e in skipped}
    assert set(reasons) == {"bad_garbage.tif", "bad_truncated.tif", "bad_bandcount.tif"}
    assert "not recognized" in reasons["bad_garbage.tif"] or "RasterioIOError" in reasons["bad_garbage.tif"]
    assert "14 bands" in reasons["bad_bandcount.tif"]
    assert "read failed" in reasons["bad_truncated.tif"]
    samples, m = read_shards(tmp_path / "out")
    assert {meta["source"] for _, meta in samples.values()} == {f.relpath for f in arc.files}
    assert m["total_samples"] == 12


def test_strict_stops_at_first_bad_input(tmp_path, capsys):
    generate_archive(tmp_path / "in", 2, 16, kind="rgb", bad_files=["garbage"])
    msg = _fail(capsys, [tmp_path / "in", "--out", tmp_path / "out", "--strict"])
    assert "bad_garbage.tif" in msg and "--strict" in msg


def test_out_of_range_band_selection_is_reported(tmp_path, capsys):
    generate_archive(tmp_path / "in", 2, 16, kind="rgb")
    msg = _fail(capsys, [tmp_path / "in", "--out", tmp_path / "out", "--bands", "2,7"])
    assert "all 2 file(s) were skipped" in msg
    reason = json.loads((tmp_path / "out" / "skipped.jsonl").read_text().splitlines()[0])["reason"]
    assert "band index 7 out of range" in reason


def test_empty_input_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.md").write_text("x")
    msg = _fail(capsys, [tmp_path / "in", "--out", tmp_path / "out"])
    assert "no raster files found" in msg
    assert "no such file" in _fail(capsys, [tmp_path / "missing", "--out", tmp_path / "out"])


def test_foreign_or_previous_output_dir_is_refused(tmp_path, capsys):
    generate_archive(tmp_path / "in", 1, 16, kind="rgb")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    msg = _fail(capsys, [tmp_path / "in", "--out", out])
    assert "precious.txt" in msg and "did not write" in msg
    msg = _fail(capsys, [tmp_path / "in", "--out", out, "--overwrite"])  # overwrite never deletes foreign files
    assert (out / "precious.txt").read_text() == "keep me"
    out2 = tmp_path / "out2"
    assert main([str(tmp_path / "in"), "--out", str(out2)]) == 0
    assert "--resume" in _fail(capsys, [tmp_path / "in", "--out", out2])
    assert main([str(tmp_path / "in"), "--out", str(out2), "--overwrite"]) == 0


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--chip-size", "0"], "--chip-size"),
        (["--stride", "8"], "--stride needs --chip-size"),
        (["--max-shard-bytes", "lots"], "--max-shard-bytes"),
        (["--max-nodata", "2"], "--max-nodata"),
        (["--labels", "nowhere.csv"], "--labels"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, needle):
    generate_archive(tmp_path / "in", 1, 16, kind="rgb")
    assert needle in _fail(capsys, [tmp_path / "in", "--out", tmp_path / "out", *argv])


def test_python_dash_m_entry_point(tmp_path):
    generate_archive(tmp_path / "in", 2, 16, kind="rgb")
    r = subprocess.run(
        [sys.executable, "-m", "shards.convert", str(tmp_path / "in"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("done: 2 files -> 2 chips in 1 shards")
    r = subprocess.run(
        [sys.executable, "-m", "shards.convert", "verify", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert r.returncode == 0 and "2 samples: OK" in r.stdout
