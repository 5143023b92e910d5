"""Tiny ViTs and weight files for the engine/model tests (width 64, depth 2-3, 28-56 px)."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.model.tokens import forward_tokens
from engine.model.vit import build_vit


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(name="tiny", img_size=56)
    base.update(kw)
    return ModelConfig(**base)


def plain_dinov2(embed_dim: int = 64, depth: int = 2, img_size: int = 56, **kw) -> torch.nn.Module:
    """timm's own DINOv2-style ViT (none of our pieces), the reference a tiny model is compared with."""
    return timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=img_size,
        dynamic_img_size=True,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=2,
        **kw,
    )


def prenorm(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tokens before the final norm, in eval mode without autograd (what tests compare)."""
    with torch.no_grad():
        return forward_tokens(vit.eval(), x)["prenorm"]


def perturb_trainable(vit: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Move every trainable tensor away from its init (as training would), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(vit.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def tiny_weights(tmp_path):
    """Factory: (ModelConfig kwargs) -> (path of a timm .safetensors file of that arch, its state dict)."""

    def make(seed: int = 0, **kw):
        torch.manual_seed(seed)
        vit = build_vit(tiny_cfg(**kw))
        sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
        path = tmp_path / f"base_{seed}_{abs(hash(tuple(sorted(kw.items())))) % 10**8}.safetensors"
        save_file(sd, str(path))
        return str(path), sd

    return make


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(2, 3, 56, 56)
