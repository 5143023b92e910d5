"""The README's main command, end to end in its reduced size, as a user runs it (a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.model.tokens import forward_tokens
from engine.model.vit import build_from_adapter, build_vit

ROOT = Path(__file__).resolve().parents[2]


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "demo.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = {r["name"].split()[0]: r for r in res["rows"]}
    assert list(rows) == ["random", "base", "ExPLoRA"]
    # every stage reported: pre-training (base, ExPLoRA), frozen evaluation (all), LoRA fine-tune (base, ExPLoRA)
    assert {"linear_probe_top1", "knn_top1"} <= set(rows["random"])
    stages = {
        "pretrain_trainable_params",
        "linear_probe_top1",
        "knn_top1",
        "finetune_top1",
        "finetune_trainable_params",
    }
    for name in ("base", "ExPLoRA"):
        assert stages <= set(rows[name]), (name, sorted(rows[name]))
        assert rows[name]["finetune_trainable_params"] > 0
    metrics = ("linear_probe_top1", "knn_top1", "finetune_top1")
    assert res["explora_minus_base"] == {k: round(rows["ExPLoRA"][k] - rows["base"][k], 2) for k in metrics}
    # the ExPLoRA recipe trains a fraction of what the full base pre-training trained
    assert 0 < rows["ExPLoRA"]["pretrain_trainable_params"] < rows["base"]["pretrain_trainable_params"]
    assert "ExPLoRA - base" in proc.stdout and "LP top-1" in proc.stdout
    # the adapter the demo evaluated loads onto the base and gives the model the run exported merged
    export = out / "explora" / "export"
    with_adapter = build_from_adapter(
        export / "teacher_adapter.safetensors", weights=str(out / "base" / "export" / "teacher_vit_merged.safetensors")
    )
    merged = build_vit(ModelConfig(name="tiny", img_size=56, weights=str(export / "teacher_vit_merged.safetensors")))
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = forward_tokens(with_adapter.eval(), images)["prenorm"]
        want = forward_tokens(merged.eval(), images)["prenorm"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
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
