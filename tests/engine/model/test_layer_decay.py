"""Layer-wise lr decay and patch_embed_lr_mult with DINOv2's semantics, through the optimizer groups
the trainer builds from an objective."""

import pytest
import torch

from engine.config import DinoConfig, ModelConfig
from engine.model.explora import apply_explora
from engine.model.layer_decay import LayerDecay, vit_layer_id
from engine.model.vit import build_vit
from engine.objectives.dino import DinoObjective
from engine.trainer.deepspeed_setup import param_groups


def dinov2_rate(name: str, decay: float, num_layers: int, patch_embed_mult: float) -> float:
    """DINOv2's get_vit_lr_decay_rate (dinov2/utils/param_groups.py L13-48) for a backbone with
    force_is_backbone=True and unchunked blocks, times patch_embed_lr_mult (L83-84); written from
    its rules: embeddings layer 0, block i layer i + 1, everything else num_layers + 1."""
    layer_id = num_layers + 1
    if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
        layer_id = 0
    elif "blocks." in name:
        layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    rate = decay ** (num_layers + 1 - layer_id)
    return rate * patch_embed_mult if "patch_embed" in name else rate


def test_layer_ids():
    assert vit_layer_id("blocks.0.attn.qkv.lora_a", 12) == 1
    assert vit_layer_id("blocks.11.norm1.weight", 12) == 12
    assert [vit_layer_id(n, 12) for n in ("cls_token", "pos_embed", "patch_embed.proj.weight", "reg_token")] == [0] * 4
    assert vit_layer_id("norm.weight", 12) == 13


def test_multipliers_match_dinov2():
    decay = LayerDecay(0.9, 0.2)
    vit = build_vit(ModelConfig(name="vit_small_patch14_dinov2", img_size=56), device="meta")
    for name, _ in vit.named_parameters():
        assert decay(name, 12) == pytest.approx(dinov2_rate(name, 0.9, 12, 0.2)), name
    assert decay("cls_token", 12) == pytest.approx(0.9**13)
    assert decay("patch_embed.proj.weight", 12) == pytest.approx(0.9**13 * 0.2)
    assert decay("blocks.11.mlp.fc1.weight", 12) == pytest.approx(0.9)
    assert decay.for_objective("dino_head.mlp.0.weight", 12) == 1.0  # heads: DINOv2 treats them as non-backbone
    assert decay.for_objective("mask_token", 12) == pytest.approx(0.9**13)
    assert LayerDecay()("blocks.0.attn.qkv.weight", 12) == 1.0


def test_objective_groups_carry_the_multipliers():
    torch.manual_seed(0)
    vit = build_vit(ModelConfig(name="tiny", img_size=56, depth=3))
    apply_explora(vit, lora_rank=2, train_patch_embed=True)
    obj = DinoObjective(
        vit,
        DinoConfig(head_n_prototypes=16, head_hidden_dim=8, head_bottleneck_dim=4),
        10,
        layer_decay=LayerDecay(0.5, 0.2),
    )
    groups = param_groups(obj.trainable_parameters(), lr_mult=obj.lr_multiplier, frozen_steps=obj.frozen_steps)
    mult = {n: g["lr_mult"] for g in groups for n in g["names"]}
    assert mult["vit.blocks.2.mlp.fc1.weight"] == pytest.approx(0.5)
    assert mult["vit.blocks.0.attn.qkv.lora_a"] == pytest.approx(0.5**3)
    assert mult["vit.cls_token"] == pytest.approx(0.5**4)
    assert mult["vit.patch_embed.proj.weight"] == pytest.approx(0.5**4 * 0.2)
    assert mult["vit.norm.weight"] == mult["dino_head.prototypes"] == 1.0
    # every group is homogeneous in (decay, multiplier, frozen steps)
    assert len({(g["wd_mult"], g["lr_mult"], g["frozen_until"]) for g in groups}) == len(groups)
