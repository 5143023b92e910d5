"""Layer-wise learning-rate decay over a ViT's parameter names (BEiT / MAE / DINOv2).

Layer ids: 0 for the embeddings (patch embed, position embedding, cls/register/mask tokens),
i + 1 for block i, depth + 1 for everything after the blocks (final norm, heads). A tensor of layer
l gets ``decay ** (depth + 1 - l)`` times the scheduled lr: the last block ``decay``, the
embeddings ``decay ** (depth + 1)``, the final norm 1. This is DINOv2's
``get_vit_lr_decay_rate`` (dinov2/utils/param_groups.py) and MAE's ``param_groups_lrd``
(util/lr_decay.py); DINOv2 multiplies the patch embedding by ``patch_embed_lr_mult`` on top.

Names are relative to the ViT (``blocks.3.attn.qkv.lora_a``, ``cls_token``); LoRA tensors of a
block belong to that block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMBEDDINGS = ("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def vit_layer_id(name: str, depth: int) -> int:
    """0 (embeddings), i + 1 (block i) or depth + 1 (after the blocks) for a ViT parameter name."""
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    if name.split(".", 1)[0] in EMBEDDINGS:
        return 0
    return depth + 1


@dataclass(frozen=True)
class LayerDecay:
    """lr multipliers of one ViT: ``decay`` per layer (1.0 = off) and ``patch_embed_mult`` extra on
    the patch embedding (DINOv2's ``layerwise_decay`` and ``patch_embed_lr_mult``)."""

    decay: float = 1.0
    patch_embed_mult: float = 1.0

    def __call__(self, name: str, depth: int) -> float:
        """Multiplier of ViT parameter ``name`` in a ``depth``-block ViT."""
        mult = self.decay ** (depth + 1 - vit_layer_id(name, depth)) if self.decay != 1.0 else 1.0
        if name.startswith("patch_embed."):
            mult *= self.patch_embed_mult
        return float(mult)

    def for_objective(self, name: str, depth: int) -> float:
        """Multiplier of an objective's parameter: ``vit.*`` as above, an objective-level
        ``mask_token`` as an embedding (DINOv2 keeps it in the backbone), anything else 1."""
        if name.startswith("vit."):
            return self(name[len("vit.") :], depth)
        if name == "mask_token":
            return self(name, depth)
        return 1.0
