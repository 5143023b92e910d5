"""Every preset in engine/presets/ loads, names the fields the issue fixes, and builds (meta device) into a
ViT + recipe + objective whose FLOPs and trainable set make sense."""
from pathlib import Path

import pytest
import torch

from engine.config import RunConfig, load_config
from engine.errors import UserError

CONFIGS = Path(__file__).resolve().parents[3] / "engine" / "presets"
# pre-training presets (finetune_*.yaml are FinetuneRunConfig presets, tested in tests/engine/eval)
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("finetune_"))


def _load(name, *extra):
    return load_config(RunConfig, str(CONFIGS / name), ["--model.weights", "", *extra])


def test_expected_presets_exist():
    assert {"explora_dinov2_vitl14_fmow_rgb.yaml", "explora_dinov2_vitb14_fmow_rgb.yaml",
            "explora_mae_vitl16_sentinel.yaml", "tiny_cpu.yaml"} <= set(PRESETS)


def test_paper_recipe():
    cfg = _load("explora_dinov2_vitl14_fmow_rgb.yaml")
    assert cfg.model.name == "vit_large_patch14_dinov2" and cfg.objective.name == "dino"
    e = cfg.explora
    assert e.unfreeze_blocks == [-1] and e.lora_rank == 64 and e.lora_targets == ["q", "v"] and e.train_norms
    c = cfg.crops
    assert (c.num_global, c.global_size, c.num_local, c.local_size) == (2, 224, 8, 96)
    assert cfg.model.weights == ""  # our override; the preset itself names the DINOv2 file:
    with pytest.raises(UserError, match="--model.weights"):
        load_config(RunConfig, str(CONFIGS / "explora_dinov2_vitl14_fmow_rgb.yaml"),
                    ["--model.weights", "/no/such/dinov2_vitl14_pretrain.pth"])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_on_meta(name):
    from engine.model.explora import apply_explora
    from engine.model.vit import build_vit
    from engine.objectives import build_objective
    from engine.trainer.flops import training_flops_per_sample

    cfg = _load(name)
    vit = build_vit(cfg.model, device="meta")
    report = apply_explora(vit, cfg.explora)
    assert 0 < report.trainable < report.total
    with torch.device("meta"):
        obj = build_objective(cfg, vit, total_steps=cfg.train.max_steps)
    named = dict(obj.trainable_parameters())
    assert named and all(p.requires_grad for p in named.values())
    assert training_flops_per_sample(cfg, vit) > 0
    if cfg.model.patch_embed == "group":
        assert getattr(vit.patch_embed, "num_groups", 1) == 3
