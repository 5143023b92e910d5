"""Converter faults (issue 15): each case reproduces a fault and checks what the README promises.

Every test that can hang on a regression is bounded: subprocesses by ``timeout=``, in-process pool
runs by a SIGALRM deadline (``deadline`` fixture). Processes are made to die or be signalled at a
fixed point by patching the converter in the process that forks the workers (the workers inherit
the patch), so nothing here waits on timing. Real read-only / full file systems come from a
private mount namespace (``unshare -rm`` + tmpfs); where that is not allowed, the same errors are
injected at the shard writer (errno ENOSPC) and those tests still run.
"""

import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from shards.build import ShardWriter
from shards.convert import main
from shards.inputs import list_inputs, not_regular
from shards.synthetic import generate_archive
from shards.verify import verify
from tests.shards.conftest import read_samples
from tests.shards.conftest import run as run_convert

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
TIMEOUT_S = 120  # per subprocess: generous for a loaded 2-core machine; a hang fails instead of blocking CI
FLAGS = ("--max-samples-per-shard", "1")

# A converter CLI whose workers misbehave at a fixed point (FAULT=...); patched before the pool forks.
DRIVER = r"""
import os, signal, sys
import shards.build as build
from shards.writer import ShardWriter
fault, shard = os.environ["FAULT"], os.environ.get("FAULT_SHARD", "shard-000002.tar")
if fault == "kill9":  # SIGKILL the whole process group half-way through writing a shard
    write = ShardWriter.write
    def patched(self, key, image, meta, **kw):
        write(self, key, image, meta, **kw)
        if self.final.name == shard:
            os.killpg(0, signal.SIGKILL)
    ShardWriter.write = patched
else:  # "TERM-group", "TERM-parent", "INT-group": a signal arrives once a shard is finished
    sig, to = fault.split("-")
    close = ShardWriter.close
    def patched(self):
        close(self)
        if self.final.name == shard:
            sig_ = getattr(signal, "SIG" + sig)
            os.killpg(0, sig_) if to == "group" else os.kill(int(os.environ["FAULT_MAIN"]), sig_)
    ShardWriter.close = patched
os.environ["FAULT_MAIN"] = str(os.getpid())
from shards.convert import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(*args, fault=None, shard=None):
    """Run the converter CLI (DRIVER when ``fault`` is set) in its own session, bounded by
    TIMEOUT_S (the whole session is killed then). Returns CompletedProcess with ``pid`` (= its pgid)."""
    env = dict(ENV, FAULT=fault or "", FAULT_SHARD=shard or "shard-000002.tar")
    head = ["-c", DRIVER] if fault else ["-m", "shards.convert"]
    p = subprocess.Popen(
        [sys.executable, *head, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    r.pid = p.pid
    return r


def _tree(out):
    """{relative path: bytes} of every file under ``out`` (the byte-identical comparison)."""
    out = Path(out)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _error_line(stderr: str) -> str:
    """The one ``error:`` line a failed run prints, checked to be the only error and traceback-free."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr and "usage:" not in stderr, stderr
    return errors[0]


def _strict_json(path):
    def reject(name):
        raise AssertionError(f"{path}: {name} is not strict JSON")

    return json.loads(Path(path).read_text(), parse_constant=reject)


@pytest.fixture(autouse=True)
def _own_logging():
    """main() points the root logger at the test's captured stderr (logging.basicConfig(force=True)),
    which closes after the test: drop such stale handlers (an earlier test's main() left them) and
    put the previous ones back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [h for h in handlers if not getattr(getattr(h, "stream", None), "closed", False)]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def archive(tmp_path):
    """6 s2 files (13 x uint16, 32 px), a reference conversion of them one shard each."""
    generate_archive(tmp_path / "in", 6, 32, kind="s2")
    run_convert(tmp_path / "in", tmp_path / "ref", *FLAGS)
    return tmp_path


# ---- item 3: non-regular files --------------------------------------------------------------------
def test_fifo_named_tif_is_skipped_never_opened(tmp_path):
    generate_archive(tmp_path / "in", 2, 16, kind="rgb", layout="flat")
    os.mkfifo(tmp_path / "in" / "pipe.tif")  # rasterio.open would block on it forever
    r = _cli(tmp_path / "in", "--out", tmp_path / "out", "--workers", "2")
    assert r.returncode == 0, r.stderr
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [
        {"source": "pipe.tif", "reason": "a FIFO (named pipe), not a regular file; only regular files are read"}
    ]
    assert _strict_json(tmp_path / "out" / "manifest.json")["total_samples"] == 2
    # a glob and a list file keep it listed (so it is reported), a FIFO given as a list file is refused
    assert "pipe.tif" in {f.relpath for f in list_inputs([str(tmp_path / "in" / "*.tif")])}
    (tmp_path / "list.txt").write_text("in/pipe.tif\nin/img_00000.tif\n")
    assert len(list_inputs([str(tmp_path / "list.txt")])) == 2
    os.mkfifo(tmp_path / "list.fifo")
    r = _cli(tmp_path / "list.fifo", "--out", tmp_path / "out2")
    assert r.returncode == 2 and "FIFO" in _error_line(r.stderr)
    assert not_regular(str(tmp_path / "in" / "img_00000.tif")) is None
    assert "character device" in not_regular("/dev/null")


# ---- item 4: stats only over written samples, strict JSON, verify checks them ---------------------
def _float_file(path, data):
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype="float32",
        crs="EPSG:32633",
        transform=rasterio.transform.Affine(10, 0, 0, 0, -10, 0),
    ) as dst:
        dst.write(data)


def test_skipped_input_adds_nothing_to_stats(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(3):
        data = rng.normal(0.3, 0.1, (2, 16, 32)).astype(np.float32)
        if i == 1:
            data[0, 3, 20] = np.inf  # second chip of this file: its first chip is kept
        if i == 2:
            data[1, 0, 0] = -np.inf  # first chip: the whole file is skipped
        _float_file(tmp_path / "in" / f"f{i}.tif", data)
    assert main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--chip-size", "16"]) == 0
    reasons = {
        e["source"]: e["reason"] for e in map(json.loads, (tmp_path / "out" / "skipped.jsonl").read_text().splitlines())
    }
    assert reasons["f1.tif"].startswith("+-inf pixel values at window [16, 0, 16, 16]")
    assert reasons["f1.tif"].endswith("1 earlier window(s) of it kept")
    assert reasons["f2.tif"].startswith("+-inf pixel values at window [0, 0, 16, 16]")
    assert "earlier" not in reasons["f2.tif"]
    m = _strict_json(tmp_path / "out" / "manifest.json")
    samples, _ = read_samples(tmp_path / "out")
    assert m["total_samples"] == len(samples) == 3  # f0: 2 chips, f1: 1 chip
    for b in range(2):  # exactly the written pixels
        v = np.concatenate([a[b].ravel() for a, _ in samples.values()]).astype(np.float64)
        assert m["stats"]["count"][b] == v.size
        assert m["stats"]["mean"][b] == pytest.approx(v.mean(), rel=1e-12)
        assert m["stats"]["max"][b] == pytest.approx(v.max(), rel=1e-12)
    assert main(["verify", str(tmp_path / "out")]) == 0


def test_nan_nodata_manifest_is_strict_json(tmp_path):
    data = np.full((1, 8, 8), 0.5, np.float32)
    data[0, 0, :4] = np.nan
    (tmp_path / "in").mkdir()
    with rasterio.open(
        tmp_path / "in" / "a.tif", "w", driver="GTiff", width=8, height=8, count=1, dtype="float32", nodata=float("nan")
    ) as dst:
        dst.write(data)
    run_convert(tmp_path / "in", tmp_path / "out")
    m = _strict_json(tmp_path / "out" / "manifest.json")
    assert m["nodata"] == "nan" and math.isnan(float(m["nodata"])) and m["stats"]["count"] == [60]
    _, meta = next(iter(read_samples(tmp_path / "out")[0].values()))
    assert meta["nodata"] == "nan"


def test_verify_checks_stats_and_counts(tmp_path, capsys):
    generate_archive(tmp_path / "in", 4, 16, kind="rgb")
    run_convert(tmp_path / "in", tmp_path / "out", "--max-samples-per-shard", "2")
    path = tmp_path / "out" / "manifest.json"
    good = json.loads(path.read_text())

    def problems_with(**change):
        m = json.loads(json.dumps(good))
        for k, v in change.items():
            if k == "total_samples":
                m[k] = v
            else:
                m["stats"][k][0] = v
        path.write_text(json.dumps(m))  # Python writes NaN/Infinity tokens, as the old converter did
        return verify(str(tmp_path / "out")).problems

    assert problems_with() == []
    probs = problems_with(mean=float("nan"), max=float("inf"))
    assert any("not strict JSON" in p for p in probs)
    assert any("band 0: mean, max not a finite number" in p for p in probs)
    assert any("count 99999, but the samples hold 1024 pixels" in p for p in problems_with(count=99999))
    assert any("out of order" in p for p in problems_with(min=1000.0))
    assert any("count 0 but values" in p for p in problems_with(count=0))
    probs = problems_with(total_samples=5)
    assert any("total_samples 5, its shards list 4" in p for p in probs)
    assert main(["verify", str(tmp_path / "out")]) == 1


# ---- item 5: file-system errors are one line, exit 2; the run resumes ------------------------------
def test_out_below_a_regular_file(tmp_path, capsys):
    generate_archive(tmp_path / "in", 1, 16, kind="rgb")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "in"), "--out", str(tmp_path / "file" / "out")])
    assert e.value.code == 2
    line = _error_line(capsys.readouterr().err)
    assert "[ENOTDIR]" in line and "a part of the path is a file" in line


@pytest.mark.parametrize("nworkers", ["1", "2"])
def test_disk_full_injected_at_the_writer(archive, capsys, monkeypatch, fork_workers, deadline, nworkers):
    """ENOSPC from the shard writer's write (as a full disk raises it: no file name), in the main
    process or in a pool worker (where it used to surface as a RemoteTraceback)."""
    deadline(60)
    put = ShardWriter._put

    def full(self, data):
        if self.final.name == "shard-000003.tar" and self.bytes > 2000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        put(self, data)

    monkeypatch.setattr(ShardWriter, "_put", full)
    out = archive / "out"
    with pytest.raises(SystemExit) as e:
        main([str(archive / "in"), "--out", str(out), *FLAGS, "--workers", nworkers])
    assert e.value.code == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out '{out}': No space left on device [ENOSPC]") and "--resume" in line
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-") or n == "manifest.json"]
    monkeypatch.setattr(ShardWriter, "_put", put)  # space freed
    assert main([str(archive / "in"), "--out", str(out), *FLAGS, "--resume"]) == 0
    assert _tree(out) == _tree(archive / "ref")


def _namespace_mounts_work() -> bool:
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


needs_mounts = pytest.mark.skipif(
    not shutil.which("unshare") or not _namespace_mounts_work(),
    reason="no private mount namespace here (unshare -rm + tmpfs); "
    "test_disk_full_injected_at_the_writer covers the error path",
)


@needs_mounts
def test_real_read_only_and_full_file_systems(archive):
    """A real read-only tmpfs and a real 256 KiB tmpfs (the output with its run state needs ~1.5 MB),
    in a private mount namespace: exit 2 with one error line; after the file system grows,
    --resume finishes with output identical to an uninterrupted run."""
    mnt, copy = archive / "mnt", archive / "copy"
    mnt.mkdir()
    py = f"'{sys.executable}' -m shards.convert '{archive / 'in'}' --max-samples-per-shard 1"
    script = f"""
    set -u
    cd '{mnt}'
    mkdir ro full && mount -t tmpfs tmpfs ro && mkdir ro/out && mount -o remount,ro ro
    {py} --out ro/out 2> ro.err; echo "rc ro $?"
    {py} --out ro/new 2> ro-new.err; echo "rc ro-new $?"
    mount -t tmpfs -o size=256k tmpfs full
    {py} --out full/out --workers 2 2> full.err; echo "rc full $?"
    mount -o remount,size=16m full
    {py} --out full/out --resume 2> resume.err; echo "rc resume $?"
    cp -r full/out '{copy}'; cp *.err '{archive}'
    """
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    codes = dict(line.split()[1:] for line in r.stdout.splitlines() if line.startswith("rc "))
    assert codes == {"ro": "2", "ro-new": "2", "full": "2", "resume": "0"}, (r.stdout, r.stderr)
    for name in ("ro", "ro-new"):
        line = _error_line((archive / f"{name}.err").read_text())
        assert "Read-only file system [EROFS]" in line and "choose a writable --out" in line
    line = _error_line((archive / "full.err").read_text())
    assert "No space left on device [ENOSPC]" in line and "--resume" in line
    assert _tree(copy) == _tree(archive / "ref")


# ---- item 6: contradictory band flags ------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--bands", "1,2", "--drop-bands", "2"], "--bands and --drop-bands: give one of them"),
        (["--bands", "1,1,2"], "--bands '1,1,2': band 1 is listed twice"),
        (["--bands", "2,1-3"], "band 2 is listed twice"),
        (["--bands", "B2,b2"], "band b2 is listed twice"),
        (["--drop-bands", "0-2"], "--drop-bands '0-2': band indexes start at 1"),
    ],
)
def test_contradictory_band_flags_are_errors(tmp_path, capsys, flags, needle):
    generate_archive(tmp_path / "in", 1, 16, kind="rgb")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), *flags])
    assert e.value.code == 2 and needle in _error_line(capsys.readouterr().err)


def test_descending_band_range_is_honoured(tmp_path):
    generate_archive(tmp_path / "in", 1, 16, kind="rgb", layout="flat")
    run_convert(tmp_path / "in", tmp_path / "a")
    run_convert(tmp_path / "in", tmp_path / "b", "--bands", "3-1")
    ((a, _),) = read_samples(tmp_path / "a")[0].values()
    ((b, meta),) = read_samples(tmp_path / "b")[0].values()
    assert meta["band_names"] == ["blue", "green", "red"]
    np.testing.assert_array_equal(b, a[::-1])


def test_same_band_by_name_and_index_is_skipped_with_reason(tmp_path, capsys):
    generate_archive(tmp_path / "in", 2, 16, kind="rgb")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--bands", "green,2"])
    assert "band 2 (green) is selected twice by --bands" in _error_line(capsys.readouterr().err)


# ---- item 8: --resume with other --workers; kill -9; SIGTERM / SIGINT ---------------------------------
def test_kill9_mid_write_then_resume_with_other_workers_is_byte_identical(archive):
    out = archive / "out"
    r = _cli(archive / "in", "--out", out, *FLAGS, "--workers", "2", fault="kill9", shard="shard-000003.tar")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "manifest.json" not in os.listdir(out)
    assert [n for n in os.listdir(out) if n.startswith(".tmp-shard-000003.tar")]  # killed mid-write
    assert run_convert(archive / "in", out, *FLAGS, "--resume", "--workers", "1").kept >= 1
    assert _tree(out) == _tree(archive / "ref")  # manifest.json included: no worker count in it
    assert "workers" not in json.loads((out / "manifest.json").read_text())["converter"]["args"]


@pytest.mark.parametrize(
    "fault,nworkers,code",
    [
        ("TERM-group", "2", 143),  # kill -TERM -<pgid>: a scheduler's preemption
        ("TERM-parent", "2", 143),  # kill -TERM <pid>
        ("TERM-parent", "1", 143),  # in-process conversion
        ("INT-group", "2", 130),  # Ctrl-C in a terminal
    ],
)
def test_signal_mid_run_stops_cleanly_and_resumes(archive, fault, nworkers, code):
    out = archive / "out"
    r = _cli(archive / "in", "--out", out, *FLAGS, "--workers", nworkers, fault=fault)
    assert r.returncode == code, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    assert last == (
        "interrupted"
        if code == 130
        else "terminated (SIGTERM): finished shards are kept; rerun the same command with --resume"
    )
    names = os.listdir(out)
    assert "manifest.json" not in names and not [n for n in names if n.startswith(".tmp-")]
    assert "shard-000002.tar" in names
    with pytest.raises(ProcessLookupError):  # no worker outlives the run
        os.killpg(r.pid, 0)
    run_convert(archive / "in", out, *FLAGS, "--resume")
    assert _tree(out) == _tree(archive / "ref")


# ---- item 11: one-line errors, reasons summarized ----------------------------------------------
@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--nodata", "abc"], "error: --nodata: invalid float value: 'abc'; see 'geoexplora-convert --help'"),
        (["--workers", "two"], "error: --workers: invalid int value: 'two'"),
        (["--edge", "wrap"], "error: --edge: invalid choice: 'wrap'"),
        (["--stall-timeout", "-1"], "error: --stall-timeout -1: use seconds >= 0"),
    ],
)
def test_bad_flag_value_is_one_line(tmp_path, capsys, flags, needle):
    """argparse used to print its 12-line usage before the message."""
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines() == [_error_line(err)]
    assert _error_line(err).startswith(needle)


def test_all_inputs_skipped_shows_first_reason_and_counts(tmp_path, capsys):
    generate_archive(tmp_path / "in", 3, 16, kind="rgb", bad_files=["garbage"])
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--bands", "5"])
    err = capsys.readouterr().err
    line = _error_line(err)
    assert e.value.code == 2 and "all 4 file(s) were skipped; first: 'bad_garbage.tif': " in line
    kinds = [x.split(" skipped: ", 1)[1] for x in err.splitlines() if " skipped: " in x]
    assert len(kinds) == 2  # one log line per kind of reason, the most frequent first
    assert kinds[0].startswith("3 x ValueError: band index 5 out of range")
    assert kinds[1].startswith("1 x RasterioIOError") and kinds[1].endswith("(e.g. 'bad_garbage.tif')")


# ---- the suite's converter cases: truncated shards, a killed run's directory ----------------------
@pytest.mark.parametrize("keep", [0, 0.5])
def test_truncated_shard_is_found_by_verify(archive, capsys, keep):
    out = archive / "ref"
    path = out / "shard-000002.tar"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"shard-000002.tar: {int(len(data) * keep)} bytes, manifest says {len(data)}" in err


def test_verify_of_an_interrupted_run_is_one_line(archive, capsys):
    def stop(res):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_convert(archive / "in", archive / "out", *FLAGS, on_shard=stop)
    with pytest.raises(SystemExit) as e:
        main(["verify", str(archive / "out")])
    assert e.value.code == 2 and "--resume" in _error_line(capsys.readouterr().err)
