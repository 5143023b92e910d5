"""Trainable-parameter counts of the real timm architectures (meta device, no weights) against the
closed form of a DINOv2 block and against the paper's ~18M (ViT-L) / ~9M (ViT-B)."""

import json

import pytest
import torch

from engine.config import ModelConfig
from engine.model.explora import apply_explora
from engine.model.vit import build_vit


def _closed_form(dim: int, depth: int, rank: int, n_unfrozen: int = 1, cls_token: bool = True) -> int:
    """DINOv2 block (MLP ratio 4, LayerScale): qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D,
    2 norms 4D, 2 LayerScales 2D; LoRA on q,v: 2 segments x (A r*D + B D*r); norms 4D per block + 2D;
    the cls token D (ExPLoRA trains it)."""
    block = 12 * dim * dim + 15 * dim
    lora_blocks = depth - n_unfrozen
    return n_unfrozen * block + lora_blocks * (4 * rank * dim + 4 * dim) + 2 * dim + (dim if cls_token else 0)


@pytest.mark.parametrize(
    "name, dim, depth, paper",
    [
        ("vit_large_patch14_dinov2", 1024, 24, 18e6),
        ("vit_base_patch14_dinov2", 768, 12, 9e6),
    ],
)
def test_paper_settings(name, dim, depth, paper):
    vit = build_vit(ModelConfig(name=name, img_size=224), device="meta")
    assert vit.pos_embed.is_meta
    report = apply_explora(vit, unfreeze_blocks=[-1], lora_rank=64, lora_alpha=64, lora_targets=["q", "v"])
    assert report.trainable == _closed_form(dim, depth, 64)
    assert abs(report.trainable - paper) / paper < 0.05  # "about 18M" / "about 9M"
    assert report.groups["unfrozen_blocks"].trainable == 12 * dim * dim + 15 * dim
    assert report.groups["tokens"].trainable == dim
    frozen_cls = build_vit(ModelConfig(name=name, img_size=224), device="meta")
    without = apply_explora(
        frozen_cls, unfreeze_blocks=[-1], lora_rank=64, lora_alpha=64, lora_targets=["q", "v"], train_tokens=False
    )
    assert without.trainable == _closed_form(dim, depth, 64, cls_token=False) == report.trainable - dim


def test_params_cli_json_last_line(capsys):
    from launchers.params import main

    rc = main(
        [
            "--model",
            "vit_base_patch14_dinov2",
            "--unfreeze-blocks",
            "-1",
            "--lora-rank",
            "64",
            "--lora-targets",
            "q,v",
            "--img-size",
            "224",
            "--in-chans",
            "3",
            "--json",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    data = json.loads(out[-1])
    assert data["trainable"] == _closed_form(768, 12, 64)
    assert data["trainable_without_tokens"] == _closed_form(768, 12, 64, cls_token=False)
    assert data["total"] > data["trainable"]
    assert set(data["groups"]) >= {"unfrozen_blocks", "lora", "norms"}
    assert sum(g["trainable"] for g in data["groups"].values()) == data["trainable"]
    assert any("unfrozen_blocks" in line for line in out[:-1])


def test_group_channel_counts_on_meta():
    vit = build_vit(
        ModelConfig(name="vit_large_patch16_224", img_size=96, in_chans=10, patch_embed="group"), device="meta"
    )
    report = apply_explora(vit, unfreeze_blocks=[-1], lora_rank=8, lora_targets=["q", "v"])
    # 3 group convs (4, 4, 2 bands) + bias each + a (3, D) group embedding, all new -> trainable
    d, p = 1024, 16
    expect = d * p * p * 10 + 3 * d + 3 * d
    assert report.groups["patch_embed"].trainable == report.groups["patch_embed"].total == expect
    assert not any(t.device != torch.device("meta") for t in vit.parameters())
