"""Every shipped config (engine/presets/*.yaml) takes one optimizer step at its REAL size on CPU.

Each preset runs through the user's own path, ``launchers/{pretrain,finetune}.py --config X
--preflight=2`` (engine/trainer/preflight.py), in a subprocess bounded by a timeout: the preset's
architecture, image sizes, crop counts, bands, heads and ZeRO stage, from random init, 2 samples,
fp32, the DeepSpeed engine and optimizer groups of the real run. Overrides: no weight file, fp32,
no lr warm-up (so step 0 runs at the peak lr and every update is visible in fp32).

Checked: the loss is finite; the trainable set is exactly the recipe's, derived here from the
config by name rules independent of engine/model; after the step exactly the tensors that should
move moved (all trainable ones except the DINO prototype layer while it is frozen, and LoRA A
while LoRA B is still zero when there is no weight decay) and no frozen tensor changed.
The ViT-L DINOv2 preset (2 x 224 + 8 x 98 crops, 65536 prototypes) dominates the time; figures are
in the README (Testing).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import RunConfig, load_config
from engine.eval.config import FinetuneRunConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (REPO / "engine" / "presets").glob("*.yaml"))
OVERRIDES = ["--model.weights", "", "--train.precision", "fp32", "--optim.warmup_steps", "0"]
TIMEOUT_S = 1200

pytestmark = pytest.mark.realsize


def _is_finetune(name: str) -> bool:
    return name.startswith("finetune_")


def _load(name: str):
    return load_config(
        FinetuneRunConfig if _is_finetune(name) else RunConfig, str(REPO / "engine" / "presets" / name), OVERRIDES
    )


def _run(name: str) -> tuple[dict, float, subprocess.CompletedProcess]:
    launcher = REPO / "launchers" / ("finetune.py" if _is_finetune(name) else "pretrain.py")
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("RANK", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(launcher),
            "--config",
            str(REPO / "engine" / "presets" / name),
            "--preflight=2",
            *OVERRIDES,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"{name}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, proc


def _block(n: str) -> int:
    return int(n.split(".")[2])


def expected_trainable(cfg, names: list[str]) -> set[str]:
    """The recipe's trainable tensors, by name, from the config alone."""
    out = set()
    if isinstance(cfg, FinetuneRunConfig):  # LoRA on every block + the linear head
        ft = cfg.finetune
        for n in names:
            if n.startswith("head.") or (n.endswith((".lora_a", ".lora_b")) and n.startswith("vit.blocks.")):
                out.add(n)
            elif ft.train_norms and re.search(r"(^vit\.norm\.|\.norm[12]\.)", n):
                out.add(n)
        return out
    e = cfg.explora
    depth = 1 + max(_block(n) for n in names if n.startswith("vit.blocks."))
    unfrozen = {b % depth for b in e.unfreeze_blocks}
    for n in names:
        if n.startswith("vit.blocks.") and _block(n) in unfrozen:
            out.add(n)
        elif n.startswith("vit.blocks.") and n.endswith((".lora_a", ".lora_b")):
            out.add(n)
        elif e.train_norms and (re.search(r"^vit\.blocks\.\d+\.norm[12]\.", n) or n.startswith("vit.norm.")):
            out.add(n)
        elif e.train_tokens and n in ("vit.cls_token", "vit.reg_token"):
            out.add(n)
        elif n.startswith("vit.patch_embed.") and cfg.model.patch_embed == "group":  # new embed: trains
            out.add(n)
        elif n.startswith(("dino_head.", "ibot_head.")) or n == "mask_token":
            out.add(n)
        elif n.startswith("decoder."):  # random init: the decoder starts from scratch and trains fully
            out.add(n)
    return out


def expected_changed(cfg, report: dict) -> set[str]:
    """Trainable tensors step 0 moves: all but the lr-0 prototype layer, and LoRA A when there is no
    weight decay (its gradient is zero while B is zero)."""
    out = set(report["trainable"]) - set(report["frozen_until"])
    if cfg.optim.weight_decay == 0:
        out -= {n for n in out if n.endswith(".lora_a")}
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_preset_takes_one_real_size_step(name):
    cfg = _load(name)
    report, wall, proc = _run(name)
    names = report["trainable"] + report["frozen"]
    assert report["finite"] and report["samples_per_rank"] == 2
    assert set(report["trainable"]) == expected_trainable(cfg, names)
    assert report["frozen_changed"] == []
    assert set(report["changed"]) == expected_changed(cfg, report)
    if not _is_finetune(name) and cfg.objective.name == "dino" and cfg.objective.dino.freeze_last_layer_steps:
        assert set(report["frozen_until"]) == {"dino_head.prototypes", "dino_head.prototype_gain"}
    peak = max(report["peak_memory_bytes"]) / 2**30
    print(
        f"\n{name}: wall {wall:.0f} s (build {report['build_s']:.0f} s, step {report['step_s']:.0f} s), "
        f"peak RSS {peak:.2f} GiB, {report['trainable_numel']:,} trainable",
        flush=True,
    )
