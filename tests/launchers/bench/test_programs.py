"""The benchmark programs at their smallest, as a user runs them (subprocesses, bounded): each prints its
table and writes the harness's result file with its providers. No figure is checked: benchmarks are
not tests. LoRA and attention run in test_gpu_check's smoke mode; training in the GPU check itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _run(tmp_path: Path, module: str, *args: str) -> tuple[str, dict]:
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", f"launchers.bench.{module}", *args, "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == module and result["environment"]["cpu_count"] >= 1
    return proc.stdout, result


def test_convert(tmp_path):
    stdout, result = _run(
        tmp_path,
        "convert",
        "--files",
        "6",
        "--size",
        "64",
        "--workers",
        "1",
        "--repeats",
        "1",
        "--workdir",
        str(tmp_path / "work"),
    )
    assert [r["provider"] for r in result["rows"]] == ["raw", "raw-tuned", "prototype", "convert/1"]
    assert result["decoded_bytes"] == 6 * 13 * 64 * 64 * 2 and "convert/1" in stdout


def test_data(tmp_path):
    stdout, result = _run(
        tmp_path,
        "data",
        "--files",
        "20",
        "--kinds",
        "rgb",
        "--modes",
        "decode",
        "--epochs",
        "1",
        "--repeat",
        "1",
        "--workers",
        "0",
        "--batch-size",
        "8",
        "--work",
        str(tmp_path / "work"),
    )
    assert [r["provider"] for r in result["rows"]] == ["naive", "stream", "stream-f32"]
    assert result["rows"][0]["vs_naive"] == 1.0 and "| rgb | decode | 0 ms | stream |" in stdout


def test_augment(tmp_path):
    stdout, result = _run(
        tmp_path,
        "augment",
        "--images",
        "8",
        "--batch-size",
        "4",
        "--size",
        "64",
        "--global-size",
        "56",
        "--local-size",
        "28",
        "--num-local",
        "2",
        "--repeat",
        "1",
        "--loader-epochs",
        "1",
        "--device",
        "cpu",
    )
    sides = [(r["side"], r["provider"]) for r in result["rows"]]
    assert sides == [
        ("worker thread", "worker"),
        ("worker thread", "device"),
        ("worker process", "worker"),
        ("worker process", "device"),
        ("cpu", "normalise"),
        ("cpu", "photometric+normalise"),
    ]
    assert "| worker process | device |" in stdout


@pytest.mark.parametrize(
    "module,args",
    [
        ("data", ["--modes", "decode,crop"]),
        ("convert", ["--workers", "1,x"]),
        ("attention", ["--device", "cpu", "--shapes", "1,2,3"]),
    ],
)
def test_bad_flag_is_one_error_line(tmp_path, module, args):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", f"launchers.bench.{module}", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"error: {args[-2]} ")
