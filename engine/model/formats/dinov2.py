"""DINOv2's released files in timm's names.

* Official hub ``.pth`` (``dinov2_vitl14_pretrain.pth``, ``..._reg4_pretrain.pth``): has a
  ``mask_token``; registers are ``register_tokens`` and the cls position embedding is folded into
  the cls token (timm's register models have no class position); ViT-g's SwiGLU ``mlp.w12``/``w3``
  become ``mlp.fc1``/``fc2`` (:func:`filter_state_dict`).
* Training checkpoints (``{"teacher": {"backbone.*"}}`` or ``student./teacher.backbone.*``,
  possibly with chunked ``blocks.<chunk>.<i>``): the backbone is taken, teacher first
  (:func:`take_backbone`), and the FSDP chunks are flattened (:func:`unchunk_blocks`); the result
  is the hub layout.

The mask token is kept as ``vit.mask_token`` (1, D) for the iBOT objective
(``engine.model.state_fit.fit_mask_token``).
"""

from __future__ import annotations

import re

from timm.models.vision_transformer import VisionTransformer

from engine.model.tensor_files import StateDict

FORMAT = "dinov2_hub"
# DINOv2 training checkpoints: the teacher's backbone first, else the one model's
BACKBONE_PREFIXES = ("teacher.backbone.", "backbone.")


def take_backbone(sd: StateDict) -> StateDict | None:
    """The backbone of a DINOv2 training checkpoint (prefix removed), or None when there is none."""
    for prefix in BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return None


def unchunk_blocks(sd: StateDict) -> StateDict:
    """DINOv2's chunked (FSDP) ``blocks.<chunk>.<i>.`` as ``blocks.<i>.``."""
    if not any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
        return sd
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


def matches(sd: StateDict) -> bool:
    """DINOv2's own layout: a mask token or ``register_tokens`` (timm has neither)."""
    return "mask_token" in sd or "register_tokens" in sd


def filter_state_dict(sd: StateDict, vit: VisionTransformer) -> StateDict:
    """Official DINOv2 names -> timm's: SwiGLU ``w12``/``w3``, ``register_tokens``, and the cls
    position folded into the cls token where the model has no class position embedding."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)
        out[k] = v
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        if getattr(vit, "no_embed_class", False) and "pos_embed" in out and "cls_token" in out:
            pe = out["pos_embed"]
            out["cls_token"] = out["cls_token"] + pe[:, :1]
            out["pos_embed"] = pe[:, 1:]
    return out
