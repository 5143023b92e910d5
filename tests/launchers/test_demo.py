"""The README's main command, end to end in its reduced size, as a user runs it (a subprocess)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "demo.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names[0].startswith("random") and names[1].startswith("base") and names[2].startswith("ExPLoRA")
    for r in res["rows"]:
        assert 0.0 <= r["linear_probe_top1"] <= 100.0 and 0.0 <= r["knn_top1"] <= 100.0
    for r in res["rows"][1:]:
        assert 0.0 <= r["finetune_top1"] <= 100.0 and r["finetune_trainable_params"] > 0
    # the ExPLoRA recipe trains a fraction of what the full base pre-training trained
    assert 0 < res["rows"][2]["pretrain_trainable_params"] < res["rows"][1]["pretrain_trainable_params"]
    assert (out / "explora" / "export" / "teacher_adapter.safetensors").is_file()
    assert "ExPLoRA - base" in proc.stdout and "LP top-1" in proc.stdout
    assert wall < 120, f"--quick took {wall:.0f} s"
    # a rerun into the same directory starts clean; a foreign non-empty directory is refused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    bad = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "demo.py"), "--quick", "--out", str(foreign)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and "not a previous demo run" in bad.stderr
    assert (foreign / "keep.txt").is_file()
