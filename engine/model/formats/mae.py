"""Official MAE ``.pth`` (``{"model": ...}``, also our MAE objective's checkpoints): the encoder keys
are timm's; the decoder (``decoder_*`` and the decoder's ``mask_token``) is not part of the ViT and
is kept for the MAE objective (``BaseInfo.extra``, read back with :func:`mae_decoder_state`).
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from engine.model.base_identity import base_info
from engine.model.tensor_files import StateDict

FORMAT = "mae"


def _is_decoder(key: str) -> bool:
    return key.startswith("decoder_") or key == "mask_token"


def matches(sd: StateDict) -> bool:
    """An MAE checkpoint: it carries the decoder."""
    return any(k.startswith("decoder_") for k in sd)


def decoder_tensors(sd: StateDict) -> StateDict:
    """The decoder's tensors of an MAE state dict, in official MAE names."""
    return {k: v for k, v in sd.items() if _is_decoder(k)}


def filter_state_dict(sd: StateDict, vit: VisionTransformer) -> StateDict:
    """The encoder: everything but the decoder (whose mask token is the decoder's, not iBOT's)."""
    return {k: v for k, v in sd.items() if not _is_decoder(k)}


def mae_decoder_state(vit: VisionTransformer) -> StateDict | None:
    """The official-MAE decoder tensors of the loaded checkpoint (for the MAE objective), or None."""
    extra = base_info(vit).extra
    return dict(extra) if any(k.startswith("decoder_") for k in extra) else None
