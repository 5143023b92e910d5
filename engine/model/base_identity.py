"""What a model was built from: :class:`BaseInfo`, attached by ``build_vit`` as ``vit.base_info`` and
recorded in adapter files and exports (``base_meta``) so an adapter finds its base again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from engine.model.architecture import arch_of
from engine.model.tensor_files import path_sha256


@dataclass
class BaseInfo:
    """Identity of the base a model was built from (recorded in adapter files).

    name: ``cfg.name`` as given; arch: the timm architecture; model: the ModelConfig as a dict;
    weights: the weight file ('' = random init); format: what ``load_weights`` recognised;
    extra: non-ViT tensors of the file (the MAE decoder: ``decoder_*`` and its ``mask_token``).
    """

    name: str
    arch: str
    model: dict
    weights: str = ""
    format: str = "random"
    extra: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def weights_sha256(self) -> str | None:
        return path_sha256(self.weights) if self.weights else None


def base_info(vit: VisionTransformer) -> BaseInfo:
    """The :class:`BaseInfo` ``build_vit`` attached (a bare one for models built elsewhere)."""
    info = getattr(vit, "base_info", None)
    if isinstance(info, BaseInfo):
        return info
    name = arch_of(vit)
    return BaseInfo(name=name, arch=name, model={})


def base_meta(info: BaseInfo) -> dict:
    """The base as file metadata: name, timm architecture, weight-file name, its sha256, format."""
    return {
        "name": info.name,
        "arch": info.arch,
        "weights": Path(info.weights).name if info.weights else "",
        "weights_sha256": info.weights_sha256(),
        "format": info.format,
    }
