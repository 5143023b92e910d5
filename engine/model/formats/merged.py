"""The merged export: the adapter folded into the base, as a plain timm state dict in
``.safetensors`` (no LoRA keys, no mask token) that ``timm.create_model(arch, num_classes=0,
img_size=...)`` loads with ``load_state_dict`` -- for a plain patch embed; a group-channel model's
export loads with ``build_vit`` and the same model config. Metadata: ``format`` =
``geoexplora-merged/1``, the timm architecture, the model config, the base and the recipe.

Read back as ``--model.weights`` it is a timm file (``engine.model.weights`` reports it as
'geoexplora'): timm's names need no filter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from engine.model.architecture import NOT_TIMM
from engine.model.base_identity import base_info, base_meta
from engine.model.lora import is_lora_param, lora_modules
from engine.model.tensor_files import write_safetensors

MERGED_FORMAT = "geoexplora-merged/1"


def merged_state_dict(vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """Plain timm state dict with every LoRA update folded in (the model itself is not changed)."""
    sd = {k: v for k, v in vit.state_dict().items() if not is_lora_param(k) and k not in NOT_TIMM}
    for name, m in lora_modules(vit):
        if not m.merged:
            sd[f"{name}.weight"] = m.merged_weight()
    return sd


def export_merged(vit: VisionTransformer, path: str | Path) -> Path:
    """Write :func:`merged_state_dict` as .safetensors (metadata: format, arch, model config, base)."""
    info = base_info(vit)
    meta = {
        "format": MERGED_FORMAT,
        "arch": info.arch,
        "model": json.dumps(info.model),
        "base": json.dumps(base_meta(info)),
        "recipe": json.dumps(getattr(vit, "geoexplora_recipe", {})),
    }
    return write_safetensors(merged_state_dict(vit), path, meta)
