"""Every preset in engine/presets/ loads, names the fields the issue fixes, and builds (meta device) into a
ViT + recipe + objective whose FLOPs and trainable set make sense."""

from pathlib import Path

import pytest
import torch

from engine.config import RunConfig, load_config
from engine.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "engine" / "presets"
# pre-training presets (finetune_*.yaml are FinetuneRunConfig presets, tested in tests/engine/eval)
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("finetune_"))


def _load(name, *extra):
    return load_config(RunConfig, str(CONFIGS / name), ["--model.weights", "", *extra])


def test_expected_presets_exist():
    assert {
        "explora_dinov2_vitl14_fmow_rgb.yaml",
        "explora_dinov2_vitb14_fmow_rgb.yaml",
        "explora_mae_vitl16_fmow_rgb.yaml",
        "explora_mae_vitl16_sentinel.yaml",
        "tiny_cpu.yaml",
    } <= set(PRESETS)


def test_paper_recipe():
    """The authors' DINOv2 launch script (scripts/pretrain_dino.sh) on top of ssl_default_config +
    fmow_vitl14.yaml, at an effective batch of 1024 on 8 GPUs."""
    from engine.trainer.schedules import OptimSchedule

    cfg = _load("explora_dinov2_vitl14_fmow_rgb.yaml")
    assert cfg.model.name == "vit_large_patch14_dinov2" and cfg.objective.name == "dino"
    e = cfg.explora
    assert e.unfreeze_blocks == [-1] and e.lora_rank == 64 and e.lora_targets == ["q", "v"] and e.train_norms
    assert e.train_tokens and e.lora_alpha == 1.0
    c = cfg.crops
    assert (c.num_global, c.global_size, c.num_local, c.local_size) == (2, 224, 8, 98)
    d, o = cfg.objective.dino, cfg.optim
    assert d.freeze_last_layer_steps == 3 * 1250 and d.centering == "centering" and cfg.model.drop_path_rate == 0.0
    assert (o.lr, o.lr_scaling, o.layerwise_decay, o.patch_embed_lr_mult) == (1e-3, "sqrt_wrt_1024", 0.9, 0.2)
    global_batch = cfg.data.batch_size * cfg.train.grad_accum_steps * 8
    assert global_batch == 1024
    assert OptimSchedule.from_config(o, global_batch, cfg.train.max_steps).peak_lr == pytest.approx(1e-3)


def test_mae_recipe():
    """The authors' MAE launch script (scripts/pretrain_mae.sh) and mae/pretrain.py defaults."""
    from engine.trainer.schedules import OptimSchedule

    cfg = _load("explora_mae_vitl16_fmow_rgb.yaml")
    m, o = cfg.objective.mae, cfg.optim
    assert (cfg.crops.global_size, cfg.model.img_size, cfg.model.in_chans) == (224, 224, 3)
    assert m.decoder_lora_rank == 8 and m.norm_pix_loss and m.mask_ratio == 0.75
    assert (o.weight_decay, o.weight_decay_end, o.clip_grad, tuple(o.betas)) == (0.0, 0.0, 0.0, (0.9, 0.95))
    assert cfg.data.batch_size * cfg.train.grad_accum_steps * 8 == 1024
    assert OptimSchedule.from_config(o, 1024, cfg.train.max_steps).peak_lr == pytest.approx(4.5e-4 * 4)
    s2 = _load("explora_mae_vitl16_sentinel.yaml")
    assert s2.objective.mae.norm_pix_scope == "all_bands" and s2.model.group_embed == "sincos"
    assert cfg.model.weights == ""  # our override; the preset itself names the DINOv2 file:
    named = load_config(
        RunConfig,
        str(CONFIGS / "explora_dinov2_vitl14_fmow_rgb.yaml"),
        ["--model.weights", "/no/such/dinov2_vitl14_pretrain.pth"],
    )
    with pytest.raises(UserError, match="--model.weights"):
        named.model.check_files()


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
