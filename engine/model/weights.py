"""Local pre-trained weights for timm ViTs: read any supported file, recognise its format, convert it
to timm's names, fit it to the model, load strictly. Nothing here touches the network.

Formats (recognised from the keys, never from the file name; one module each in
``engine.model.formats``):

* timm (``.safetensors`` / ``.pth``): keys already match the model.
* official DINOv2 hub ``.pth`` and DINOv2 training checkpoints (``formats.dinov2``).
* official MAE ``.pth``: the decoder is returned in :attr:`LoadedWeights.extra` (``formats.mae``).
* geoexplora: a merged export (plain timm keys, ``formats.merged``), or a trainer checkpoint
  directory whose LoRA tensors are merged into the base (``formats.trainer_checkpoint``).

:func:`load_weights` runs: :func:`read_checkpoint` (wrappers peeled) -> :func:`detect_format` ->
the format's filter -> the fitting steps of ``engine.model.state_fit`` (head, mask token, position
embedding, patch embed) -> strict load (merging LoRA for a trainer checkpoint). Anything that does
not fit raises one :class:`UserError` naming the file, the keys and the architecture the file
seems to hold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from engine.errors import UserError
from engine.model.formats import dinov2, mae, trainer_checkpoint
from engine.model.patch_embed import AdaptMode
from engine.model.state_fit import (
    check_not_partitioned,
    drop_head,
    fit_mask_token,
    fit_patch_embed,
    resample_pos_embed,
    strict_load,
)
from engine.model.tensor_files import StateDict, read_safetensors, torch_load

log = logging.getLogger(__name__)

GEOEXPLORA = "geoexplora"
TIMM = "timm"
# format -> its filter to timm's names (geoexplora and timm files have timm's names already)
FILTERS: dict[str, Callable[[StateDict, VisionTransformer], StateDict]] = {
    mae.FORMAT: mae.filter_state_dict,
    dinov2.FORMAT: dinov2.filter_state_dict,
}


@dataclass
class LoadedWeights:
    """What :func:`load_weights` found. extra: tensors that are not part of the ViT (MAE decoder)."""

    path: str
    format: str
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    adapted_patch_embed: bool = False


def read_checkpoint(path: str | Path, flag: str = "--model.weights") -> tuple[StateDict, dict]:
    """Flat {key: tensor} and metadata from a weight file or a geoexplora checkpoint directory.

    Wrappers are peeled off: ``teacher`` (DINOv2 training) / ``model`` (MAE) / ``state_dict`` /
    ``module`` (DeepSpeed) dicts, DDP's ``module.`` prefix, DINOv2's ``backbone.`` (teacher
    preferred) and our objectives' ``vit.``; DINOv2's chunked blocks are flattened.
    metadata: safetensors metadata, or ``{"geoexplora_meta": meta.json}`` for a checkpoint directory.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} '{path}': file not found")
    meta: dict = {}
    if p.is_dir():
        obj, meta = trainer_checkpoint.read_checkpoint_dir(p, flag)
    elif p.suffix == ".safetensors":
        obj, meta = read_safetensors(p)
    else:
        obj = torch_load(p, flag)
    if not isinstance(obj, dict):
        raise UserError(f"{flag} '{path}': expected a state dict, found {type(obj).__name__}")
    for key in ("teacher", "model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    inner = dinov2.take_backbone(sd)
    if inner is None:
        inner = trainer_checkpoint.take_objective_vit(sd)
    return dinov2.unchunk_blocks(sd if inner is None else inner), meta


def detect_format(sd: StateDict, meta: dict) -> str:
    """The format of a read state dict; the first match wins (an MAE checkpoint of our trainer is
    'mae', a trainer checkpoint carrying a DINOv2 mask token is 'geoexplora')."""
    if mae.matches(sd):
        return mae.FORMAT
    if "geoexplora_meta" in meta or str(meta.get("format", "")).startswith(GEOEXPLORA):
        return GEOEXPLORA  # a trainer checkpoint directory or a merged export
    if dinov2.matches(sd):
        return dinov2.FORMAT
    return TIMM


def load_weights(
    vit: VisionTransformer, path: str, adapt: AdaptMode = "timm", flag: str = "--model.weights"
) -> LoadedWeights:
    """Load a local weight file of any supported format into ``vit`` (in place, strict).

    vit: a timm VisionTransformer built on CPU (plain or group-channel patch embed, no LoRA yet).
    adapt: how RGB patch kernels become ``in_chans``-band kernels. Returns the format and the
    leftover non-ViT tensors (MAE decoder). Raises UserError when the file does not fit.
    """
    sd, meta = read_checkpoint(path, flag)
    if str(meta.get("format", "")).startswith("geoexplora-adapter"):
        raise UserError(
            f"{flag} '{path}' is an ExPLoRA adapter, not base weights: give the base model's file "
            "in --model.weights and this file in --model.adapter"
        )
    fmt = detect_format(sd, meta)
    extra = mae.decoder_tensors(sd) if fmt == mae.FORMAT else {}
    if fmt in FILTERS:
        sd = FILTERS[fmt](sd, vit)
    check_not_partitioned(vit, sd, flag, path)
    sd = fit_mask_token(drop_head(sd, vit, path), vit)
    sd, adapted = fit_patch_embed(resample_pos_embed(sd, vit), vit, adapt, flag, path)
    if trainer_checkpoint.has_lora(sd):
        trainer_checkpoint.load_merging_lora(vit, sd, meta, flag, path)
    else:
        strict_load(vit, sd, flag, path)
    log.info("loaded %s weights from %s%s", fmt, path, f" (+{len(extra)} MAE decoder tensors)" if extra else "")
    return LoadedWeights(path=str(path), format=fmt, extra=extra, adapted_patch_embed=adapted)
