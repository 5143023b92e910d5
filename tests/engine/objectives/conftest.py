"""Shared by the objective tests: tiny timm ViTs with an ExPLoRA-like freeze (last block + norms
train), an optimisation loop, and the CLS output of the token-level forward as a module."""

from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn

from engine.model.tokens import forward_tokens


def make_vit(kind: str = "dino", img_size: int = 42, dim: int = 64, depth: int = 2, recipe: bool = True):
    """kind 'dino': DINOv2-style patch 14 (LayerScale 1.0 so features depend on the input);
    'mae': MAE-style patch 16 (cls token, no LayerScale)."""
    if kind == "dino":
        vit = timm.create_model(
            "vit_small_patch14_dinov2",
            pretrained=False,
            img_size=img_size,
            dynamic_img_size=True,
            embed_dim=dim,
            depth=depth,
            num_heads=4,
            init_values=1.0,
        )
    else:
        vit = timm.create_model(
            "vit_base_patch16_224.mae",
            pretrained=False,
            img_size=img_size,
            dynamic_img_size=True,
            embed_dim=dim,
            depth=depth,
            num_heads=4,
        )
    if recipe:
        last = f"blocks.{depth - 1}."
        for n, p in vit.named_parameters():
            p.requires_grad = n.startswith((last, "norm.")) or ".norm" in n
    return vit


@pytest.fixture
def tiny_vit():
    return make_vit


def train_steps(obj, batch: dict | Callable[[int], dict], steps: int, lr: float) -> list[dict]:
    """AdamW on ``obj.trainable_parameters()`` for ``steps`` steps (forward, backward, step,
    ``on_step_end``); ``batch`` is one batch for every step or ``step -> batch``. Returns each step's logs."""
    opt = torch.optim.AdamW([p for _, p in obj.trainable_parameters()], lr=lr)
    hist = []
    for step in range(steps):
        loss, logs = obj(batch(step) if callable(batch) else batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.on_step_end(step)
        hist.append(logs)
    return hist


class ClsToken(nn.Module):
    """vit -> the CLS token (B, D) of ``forward_tokens``, as a module so ``torch.func.functional_call``
    can run it with EMA parameters substituted (the reference a teacher forward must match)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return forward_tokens(self.vit, x)["cls"]
