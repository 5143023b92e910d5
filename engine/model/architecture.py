"""ViT architectures over timm: DINOv2 ViT-S/B/L/g (patch 14, +/- 4 registers) and MAE ViT-B/L
(patch 16), ViT-H (patch 14, as MAE released it), any image size, any band count, at random init.

``create_vit(cfg)`` makes the timm ``VisionTransformer`` with ``dynamic_img_size=True`` and no
classifier head (``pretrained=False`` always: timm is never asked to download, so
``HF_HUB_OFFLINE`` has nothing to block), swaps in the group-channel patch embed when asked, sets
drop path and attaches the parameter-free token assembly. Weights, adapters, the attention dispatch
and gradient checkpointing come on top in ``engine.model.vit.build_vit``.

Tiny models for tests and demos: ``name`` 'tiny' (DINOv2-style, patch 14), 'tiny_reg4' (+4 registers)
or 'tiny_mae' (MAE-style, patch 16) = width 64, depth 2, 2 heads; ``embed_dim``/``depth``/``num_heads``
override any architecture.
"""

from __future__ import annotations

import contextlib
import logging
from typing import cast

import timm
import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from engine.config import ModelConfig
from engine.errors import UserError
from engine.model.patch_embed import use_group_channel_embed
from engine.model.tokens import TokenAssembly
from engine.model_names import TINY_ARCHS

log = logging.getLogger(__name__)

DINOV2_ARCHS = tuple(f"vit_{s}_patch14{r}_dinov2" for s in ("small", "base", "large", "giant") for r in ("", "_reg4"))
MAE_ARCHS = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")
TINY_SHAPE = {"embed_dim": 64, "depth": 2, "num_heads": 2}
# Tensors the objectives keep on the ViT that a plain timm ViT does not have: DINOv2's iBOT mask
# token, loaded with a DINOv2 checkpoint. Merged and PEFT exports leave them out.
NOT_TIMM = ("mask_token",)


def resolve_arch(name: str) -> tuple[str, dict]:
    """``cfg.name`` -> (timm architecture, default shape overrides). A pretrained tag (``.mae``,
    ``.lvd142m``) is dropped: weights always come from a local file."""
    base = name.split(".", 1)[0]
    if base in TINY_ARCHS:
        return TINY_ARCHS[base], dict(TINY_SHAPE)
    if base in DINOV2_ARCHS or base in MAE_ARCHS:
        return base, {}
    if timm.is_model(base) and base.startswith(("vit_", "deit")):
        log.warning("model %s is not one of the tested DINOv2/MAE architectures; building it anyway", base)
        return base, {}
    raise UserError(
        f"--model.name: unknown architecture {name!r}; choose one of "
        f"{', '.join(DINOV2_ARCHS + MAE_ARCHS + tuple(TINY_ARCHS))}"
    )


def create_vit(cfg: ModelConfig, device: str | torch.device | None = None) -> VisionTransformer:
    """The architecture of ``cfg`` at random init (no weights, no dispatch swap); on ``device``."""
    arch, shape = resolve_arch(cfg.name)
    for k in ("embed_dim", "depth", "num_heads"):
        if getattr(cfg, k) is not None:
            shape[k] = int(getattr(cfg, k))
    if "embed_dim" in shape and "num_heads" in shape and shape["embed_dim"] % shape["num_heads"]:
        raise UserError(
            f"--model.embed_dim {shape['embed_dim']} is not divisible by --model.num_heads {shape['num_heads']}"
        )
    group = cfg.patch_embed == "group"
    kwargs = dict(
        pretrained=False,
        img_size=cfg.img_size,
        in_chans=3 if group else cfg.in_chans,
        dynamic_img_size=True,
        num_classes=0,
        **shape,
    )
    with torch.device(device) if device is not None else contextlib.nullcontext():
        # resolve_arch admits ViT architectures only; timm types every model as nn.Module
        vit = cast(VisionTransformer, timm.create_model(arch, **kwargs))
        if group:
            try:
                use_group_channel_embed(vit, cfg.band_groups, cfg.in_chans, cfg.group_embed)
            except ValueError as e:
                raise UserError(f"--model.band_groups: {e}") from None
    if cfg.img_size % vit.patch_embed.patch_size[0]:
        raise UserError(
            f"--model.img_size {cfg.img_size} is not a multiple of {arch}'s patch size {vit.patch_embed.patch_size[0]}"
        )
    set_drop_path(vit, cfg.drop_path_rate, cfg.drop_path_uniform)
    vit.token_assembly = TokenAssembly()  # no parameters: the timm state dict is unchanged
    vit.geoexplora_name = arch  # type: ignore[assignment]  # metadata: torch's stub wants a tensor or module
    return vit


def arch_of(vit: nn.Module) -> str:
    """The timm architecture :func:`create_vit` built ``vit`` as (the class name for a ViT built elsewhere)."""
    return str(getattr(vit, "geoexplora_name", type(vit).__name__))


def set_drop_path(vit: VisionTransformer, rate: float, uniform: bool = True) -> list[float]:
    """Stochastic depth on every block's two residual branches: ``rate`` everywhere (DINOv2's
    ``drop_path_uniform``) or timm's linear ramp 0 -> ``rate``. Returns the per-block rates.

    DropPath is active in train mode only, so the EMA teacher (run in eval mode) never drops.
    """
    depth = len(vit.blocks)
    rates = [float(rate)] * depth if uniform else torch.linspace(0, float(rate), depth, dtype=torch.float64).tolist()
    for blk, r in zip(vit.blocks, rates):
        for attr in ("drop_path1", "drop_path2"):
            if hasattr(blk, attr):
                setattr(blk, attr, DropPath(r) if r > 0 else nn.Identity())
    return rates
