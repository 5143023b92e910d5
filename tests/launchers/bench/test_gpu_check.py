"""launchers/bench/gpu_check.sh, the one-shot GPU check: its plumbing, without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "launchers" / "bench" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the real check")


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    full.update(GX_PYTHON=sys.executable, PYTHONPATH=str(REPO), GX_WHEELS=str(out / "no-wheels"), **env)
    return subprocess.run(
        ["bash", str(SCRIPT), str(out)], cwd=REPO, env=full, capture_output=True, text=True, timeout=300
    )


def test_without_cuda_it_stops_cleanly(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no CUDA device: stop" in (tmp_path / "summary.txt").read_text()


def test_smoke_mode_runs_the_cpu_stand_ins_of_every_stage(tmp_path):
    """GX_SMOKE=1: the interpreter verify, tiny benchmarks; the 1-step training run is left out
    here (GX_SKIP=train: deepspeed's launch costs half a minute on 2 cores)."""
    proc = _run(tmp_path, GX_SMOKE="1", GX_SKIP="train", GX_BUDGET="200")
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    for stage in ("gpu_tests", "verify", "bench_lora", "bench_attention"):
        assert any(line.startswith("OK") and f" {stage} " in line for line in summary.splitlines()), summary
    assert "SKIP  train (GX_SKIP)" in summary
    record = json.loads((tmp_path / "kernels.json").read_text())
    (machine,) = record["machines"].values()
    assert machine["entries"] and all(e["passed"] for e in machine["entries"].values())
    for name in ("bench_lora.json", "bench_attention.json"):
        rows = json.loads((tmp_path / name).read_text())["rows"]
        assert rows and all("ms" in r or "error" in r for r in rows)
    assert len(list(tmp_path.iterdir())) <= 8  # the device tool returns at most 8 files
