"""Interrupted runs resume to exactly the uninterrupted output; output is independent of --workers."""

import json
import os
from pathlib import Path

import pytest

from shards.state import STATE_DIR
from shards.synthetic import generate_archive

FLAGS = ("--chip-size", "16", "--max-samples-per-shard", "3", "--labels", "folder")


def _shards(out):
    m = json.loads((Path(out) / "manifest.json").read_text())
    return [(s["name"], s["count"], s["sha256"]) for s in m["shards"]], m


@pytest.fixture
def archive(tmp_path):
    # 6 files x 4 chips = 24 samples -> 8 shards of 3
    return generate_archive(tmp_path / "in", 6, 32, kind="s2", classes=["a", "b"])


class Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_parallel_run_resumes_to_identical_output(tmp_path, archive, run_convert, read_shards):
    run_convert(tmp_path / "in", tmp_path / "ref", *FLAGS)  # uninterrupted, 1 worker
    ref, ref_m = _shards(tmp_path / "ref")
    assert len(ref) == 8

    seen = []

    def stop_after_two(res):
        seen.append(res.name)
        if len(seen) == 2:
            raise Interrupt()

    out = tmp_path / "out"
    with pytest.raises(Interrupt):  # Ctrl-C in the parent while 2 workers are busy
        run_convert(tmp_path / "in", out, *FLAGS, "--workers", "2", on_shard=stop_after_two)
    names = os.listdir(out)
    assert "manifest.json" not in names and not [n for n in names if n.startswith(".tmp-")]
    assert {n for n in names if n.endswith(".tar")} >= set(seen)

    s = run_convert(tmp_path / "in", out, *FLAGS, "--resume")
    assert s.kept >= 2 and s.shards == 8
    got, m = _shards(out)
    assert got == ref  # same names, counts and bytes (sha256) as the uninterrupted run
    assert m["stats"] == ref_m["stats"] and m["classes"] == ["a", "b"]
    keys = read_shards(out)[0]
    assert sorted(keys) == sorted(read_shards(tmp_path / "ref")[0])
    assert not (out / STATE_DIR).exists()


def test_resume_after_kill_leftovers(tmp_path, archive, run_convert):
    """What kill -9 can leave: a temp file, a finished shard without a done record, a shard whose
    bytes no longer match its record. Resume rebuilds exactly those."""
    run_convert(tmp_path / "in", tmp_path / "ref", *FLAGS)
    ref, _ = _shards(tmp_path / "ref")

    def stop_after_shard_4(res):
        if res.index == 4:
            raise Interrupt()

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        run_convert(tmp_path / "in", out, *FLAGS, on_shard=stop_after_shard_4)
    state = out / STATE_DIR
    assert sorted(p.name for p in state.glob("*.done.json")) == [f"shard-00000{i}.tar.done.json" for i in range(5)]
    (state / "shard-000004.tar.done.json").unlink()  # killed before its commit
    with open(out / "shard-000001.tar", "r+b") as f:  # torn / tampered
        f.seek(700)
        f.write(b"\xff\xff")
    (out / ".tmp-shard-000005.tar.x1y2").write_bytes(b"partial")  # killed mid-write

    s = run_convert(tmp_path / "in", out, *FLAGS, "--resume")
    assert s.kept == 3  # shards 0, 2, 3
    got, _ = _shards(out)
    assert got == ref
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_output_identical_for_any_worker_count(tmp_path, archive, run_convert):
    run_convert(tmp_path / "in", tmp_path / "w1", *FLAGS)
    run_convert(tmp_path / "in", tmp_path / "w2", *FLAGS, "--workers", "2")
    a, ma = _shards(tmp_path / "w1")
    b, mb = _shards(tmp_path / "w2")
    assert a == b and ma["stats"] == mb["stats"]


def test_resume_refuses_other_settings_and_finished_run_is_a_no_op(tmp_path, archive, run_convert, capsys):
    from shards.convert import main

    out = tmp_path / "out"
    run_convert(tmp_path / "in", out, *FLAGS)
    before = _shards(out)[0]
    s = run_convert(tmp_path / "in", out, *FLAGS, "--resume")
    assert s.already_complete and _shards(out)[0] == before
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "in"), "--out", str(out), "--chip-size", "8", "--resume"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --resume") and "chip" in err[-1]
