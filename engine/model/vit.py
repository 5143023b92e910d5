"""ViT builders over timm: DINOv2 ViT-S/B/L/g (patch 14, +/- 4 registers) and MAE ViT-B/L (patch 16),
ViT-H (patch 14, as MAE released it), any image size, any band count, local weights only.

``build_vit(cfg)`` creates the timm ``VisionTransformer`` with ``dynamic_img_size=True`` and no
classifier head, swaps in the group-channel patch embed when asked, loads ``cfg.weights`` (a local
file; timm is never asked to download: ``pretrained=False`` always, so ``HF_HUB_OFFLINE`` has nothing
to block), merges ``cfg.adapter`` when given, routes attention through ``kernels.dispatch`` and sets
per-block gradient checkpointing. ``build_vit(cfg, device="meta")`` builds the architecture without
memory or weights (parameter counting for launchers/params.py; ViT-g in about a second).

Tiny models for tests and demos: ``name`` 'tiny' (DINOv2-style, patch 14), 'tiny_reg4' (+4 registers)
or 'tiny_mae' (MAE-style, patch 16) = width 64, depth 2, 2 heads; ``embed_dim``/``depth``/``num_heads``
override any architecture.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional, Union

import timm
import torch
from timm.layers import DropPath
from torch import nn

from engine.config import ModelConfig, to_dict
from engine.errors import UserError
from engine.model.attention import use_dispatch_attention
from engine.model.patch_embed import use_group_channel_embed
from engine.model.tokens import TokenAssembly
from engine.model.weights import file_sha256, load_weights

log = logging.getLogger(__name__)

DINOV2_ARCHS = tuple(f"vit_{s}_patch14{r}_dinov2" for s in ("small", "base", "large", "giant") for r in ("", "_reg4"))
MAE_ARCHS = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")
TINY_ARCHS = {"tiny": "vit_small_patch14_dinov2", "tiny_reg4": "vit_small_patch14_reg4_dinov2",
              "tiny_mae": "vit_base_patch16_224"}
TINY_SHAPE = {"embed_dim": 64, "depth": 2, "num_heads": 2}


@dataclass
class BaseInfo:
    """Identity of the base a model was built from (recorded in adapter files).

    name: ``cfg.name`` as given; arch: the timm architecture; model: the ModelConfig as a dict;
    weights: the weight file ('' = random init); format: what :func:`load_weights` recognised;
    extra: non-ViT tensors of the file (the MAE decoder: ``decoder_*`` and its ``mask_token``).
    """

    name: str
    arch: str
    model: dict
    weights: str = ""
    format: str = "random"
    extra: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def weights_sha256(self) -> Optional[str]:
        return file_sha256(self.weights) if self.weights else None


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
    raise UserError(f"--model.name: unknown architecture {name!r}; choose one of "
                    f"{', '.join(DINOV2_ARCHS + MAE_ARCHS + tuple(TINY_ARCHS))}")


def create_vit(cfg: ModelConfig, device: Union[str, torch.device, None] = None) -> nn.Module:
    """The architecture of ``cfg`` at random init (no weights, no dispatch swap); on ``device``."""
    arch, shape = resolve_arch(cfg.name)
    for k in ("embed_dim", "depth", "num_heads"):
        if getattr(cfg, k) is not None:
            shape[k] = int(getattr(cfg, k))
    if "embed_dim" in shape and "num_heads" in shape and shape["embed_dim"] % shape["num_heads"]:
        raise UserError(f"--model.embed_dim {shape['embed_dim']} is not divisible by --model.num_heads "
                        f"{shape['num_heads']}")
    group = cfg.patch_embed == "group"
    kwargs = dict(pretrained=False, img_size=cfg.img_size, in_chans=3 if group else cfg.in_chans,
                  dynamic_img_size=True, num_classes=0, **shape)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        vit = timm.create_model(arch, **kwargs)
        if group:
            try:
                use_group_channel_embed(vit, cfg.band_groups, cfg.in_chans, cfg.group_embed)
            except ValueError as e:
                raise UserError(f"--model.band_groups: {e}") from None
    if cfg.img_size % vit.patch_embed.patch_size[0]:
        raise UserError(f"--model.img_size {cfg.img_size} is not a multiple of {arch}'s patch size "
                        f"{vit.patch_embed.patch_size[0]}")
    set_drop_path(vit, cfg.drop_path_rate, cfg.drop_path_uniform)
    vit.token_assembly = TokenAssembly()  # no parameters: the timm state dict is unchanged
    vit.geoexplora_name = arch
    return vit


def set_drop_path(vit: nn.Module, rate: float, uniform: bool = True) -> list[float]:
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


def build_vit(cfg: ModelConfig, device: Union[str, torch.device, None] = None) -> nn.Module:
    """timm VisionTransformer for ``cfg``: local weights loaded, adapter merged, attention through
    ``kernels.dispatch``, per-block gradient checkpointing set from ``cfg.grad_checkpointing``.

    device: where to build (weights are loaded on CPU first, then moved); ``"meta"`` skips weight
    loading entirely. The base identity is ``vit.base_info`` (:class:`BaseInfo`); an MAE
    checkpoint's decoder is in ``vit.base_info.extra`` (see :func:`mae_decoder_state`).
    """
    cfg.validate()
    meta = device is not None and torch.device(device).type == "meta"
    vit = create_vit(cfg, "meta" if meta else None)
    info = BaseInfo(name=cfg.name, arch=vit.geoexplora_name, model=to_dict(cfg))
    if cfg.weights and not meta:
        loaded = load_weights(vit, cfg.weights, adapt=cfg.patch_embed_adapt)
        info = dataclasses.replace(info, weights=cfg.weights, format=loaded.format, extra=loaded.extra)
    if cfg.adapter and not meta:
        from engine.model.adapters import merge_adapter_file  # adapters builds bases with this module

        merge_adapter_file(vit, cfg.adapter, info)
    use_dispatch_attention(vit)
    vit.set_grad_checkpointing(cfg.grad_checkpointing)
    vit.base_info = info
    if device is not None and not meta:
        vit.to(device)
    return vit


def base_info(vit: nn.Module) -> BaseInfo:
    """The :class:`BaseInfo` :func:`build_vit` attached (a bare one for models built elsewhere)."""
    info = getattr(vit, "base_info", None)
    if isinstance(info, BaseInfo):
        return info
    name = getattr(vit, "geoexplora_name", type(vit).__name__)
    return BaseInfo(name=name, arch=name, model={})


def mae_decoder_state(vit: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The official-MAE decoder tensors of the loaded checkpoint (for the MAE objective), or None."""
    extra = base_info(vit).extra
    return dict(extra) if any(k.startswith("decoder_") for k in extra) else None
