"""The ViT of a ModelConfig, ready to train or evaluate: create, load, then merge.

``build_vit(cfg)`` creates the architecture at random init (``engine.model.architecture``), loads
``cfg.weights`` (a local file of any supported format: ``engine.model.weights``), merges
``cfg.adapter`` when given (``engine.model.formats.adapter``), routes attention through
``kernels.dispatch`` and sets per-block gradient checkpointing. The base identity is
``vit.base_info`` (``engine.model.base_identity.BaseInfo``); an MAE checkpoint's decoder is in its
``extra`` (``engine.model.formats.mae.mae_decoder_state``). ``build_vit(cfg, device="meta")``
builds the architecture without memory or weights (parameter counting for launchers/params.py;
ViT-g in about a second).

``build_from_adapter(path)`` rebuilds a trained model from its adapter file alone: the recorded
base, the recorded recipe, the file's tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from engine.config import ModelConfig, from_dict, to_dict
from engine.model.architecture import arch_of, create_vit
from engine.model.attention import use_dispatch_attention
from engine.model.base_identity import BaseInfo
from engine.model.formats.adapter import load_adapter, merge_adapter_file, rebuild_config
from engine.model.weights import load_weights


def _load_base(vit: VisionTransformer, cfg: ModelConfig) -> BaseInfo:
    """Load ``cfg.weights`` (if any) into ``vit``, then fold ``cfg.adapter`` (if any) in; the identity."""
    info = BaseInfo(name=cfg.name, arch=arch_of(vit), model=to_dict(cfg))
    if cfg.weights:
        loaded = load_weights(vit, cfg.weights, adapt=cfg.patch_embed_adapt)
        info.weights, info.format, info.extra = cfg.weights, loaded.format, loaded.extra
    if cfg.adapter:
        merge_adapter_file(vit, cfg.adapter, info)
    return info


def build_vit(cfg: ModelConfig, device: str | torch.device | None = None) -> VisionTransformer:
    """timm VisionTransformer for ``cfg``: local weights loaded, adapter merged, attention through
    ``kernels.dispatch``, per-block gradient checkpointing set from ``cfg.grad_checkpointing``.

    device: where to build (weights are loaded on CPU first, then moved); ``"meta"`` skips weight
    loading entirely (and the check that the weight files exist).
    """
    cfg.validate()
    meta = device is not None and torch.device(device).type == "meta"
    if not meta:
        cfg.check_files()
    vit = create_vit(cfg, "meta" if meta else None)
    info = BaseInfo(name=cfg.name, arch=arch_of(vit), model=to_dict(cfg)) if meta else _load_base(vit, cfg)
    use_dispatch_attention(vit)
    vit.set_grad_checkpointing(cfg.grad_checkpointing)
    vit.base_info = info  # type: ignore[assignment]  # metadata: torch's stub wants a tensor or module
    if device is not None and not meta:
        vit.to(device)
    return vit


def build_from_adapter(
    path: str | Path, weights: str | None = None, seed: int | None = None, device: str | torch.device | None = None
) -> VisionTransformer:
    """Rebuild the trained model from an adapter: base from its recorded model config, recipe
    applied, tensors loaded.

    weights: the base weight file (default: the recorded one, found by path). seed: for an adapter
    trained on a random-init base, the seed that base was built under (the run's ``train.seed``,
    recorded in the file); the base is rebuilt under it and must reproduce the recorded fingerprint.
    Such an adapter with neither a seed nor a base file is refused: building a fresh random base
    would silently give another model.
    """
    model = rebuild_config(path, weights, seed)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        if seed is not None:
            torch.manual_seed(seed)
        vit = build_vit(from_dict(ModelConfig, model, prefix="model."))
        load_adapter(vit, path, flag="build_from_adapter")
    return vit.to(device) if device is not None else vit
