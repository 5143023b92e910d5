"""DINOv2's released layouts (engine/model/formats/dinov2.py), written by the tests at tiny size with
remapped keys: the hub file with registers, ViT-g's SwiGLU names and a training checkpoint."""

import re

import torch
from timm.layers import resample_abs_pos_embed

from engine.model.tokens import forward_tokens
from engine.model.vit import build_vit
from tests.engine.model.conftest import prenorm, tiny_cfg


def test_dinov2_hub_layout_with_registers(tiny_weights, tmp_path):
    """Official layout: register_tokens, cls position folded out of cls_token, pos_embed on a
    larger grid (like the 37x37 of the released 518px models), a mask token."""
    _, sd = tiny_weights(name="tiny_reg4", img_size=56)  # grid 4x4
    torch.manual_seed(0)
    cls_pos = torch.randn(1, 1, 64)
    off = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    off["register_tokens"] = sd["reg_token"]
    off["cls_token"] = sd["cls_token"] - cls_pos
    off["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    off["mask_token"] = torch.randn(1, 64)
    f = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(off, f)
    vit = build_vit(tiny_cfg(name="tiny_reg4", img_size=28, weights=str(f)))  # grid 2x2
    assert vit.base_info.format == "dinov2_hub"
    torch.testing.assert_close(vit.cls_token, sd["cls_token"])
    torch.testing.assert_close(vit.reg_token, sd["reg_token"])
    torch.testing.assert_close(
        vit.pos_embed, resample_abs_pos_embed(sd["pos_embed"], [2, 2], [4, 4], num_prefix_tokens=0)
    )
    torch.testing.assert_close(vit.mask_token, off["mask_token"])
    torch.testing.assert_close(vit.blocks[1].ls2.gamma, sd["blocks.1.ls2.gamma"])
    assert forward_tokens(vit, torch.randn(1, 3, 56, 42))["reg"].shape == (1, 4, 64)


def test_dinov2_giant_swiglu_and_training_checkpoint_layout(tmp_path, images):
    """ViT-g's mlp.w12/w3 names, and a DINOv2 training checkpoint: {"teacher": backbone.* with
    chunked blocks.<chunk>.<i>}, heads beside it."""
    torch.manual_seed(0)
    ref = build_vit(tiny_cfg(name="vit_giant_patch14_dinov2", embed_dim=48, depth=2, num_heads=2))
    teacher = {}
    for k, v in ref.state_dict().items():
        k = re.sub(r"mlp\.fc1\.", "mlp.w12.", re.sub(r"mlp\.fc2\.", "mlp.w3.", k))
        k = re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", k)
        teacher["backbone." + k] = v
    teacher["backbone.mask_token"] = torch.zeros(1, 48)
    teacher["dino_head.last_layer.weight"] = torch.zeros(8, 4)
    f = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, f)
    vit = build_vit(tiny_cfg(name="vit_giant_patch14_dinov2", embed_dim=48, depth=2, num_heads=2, weights=str(f)))
    assert torch.equal(prenorm(vit, images), prenorm(ref, images))
