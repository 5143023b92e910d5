"""Fit a state dict (already in timm's names, see ``engine.model.formats``) to the model it loads
into, one step per function, each returning the state dict it was given with its step done:

* :func:`drop_head` -- a classifier head the model was built without;
* :func:`fit_mask_token` -- DINOv2's iBOT mask token, reshaped (1, D), and a place on the model;
* :func:`resample_pos_embed` -- the position embedding, bicubic, to the model's grid;
* :func:`fit_patch_embed` -- RGB patch kernels adapted to ``in_chans`` bands or to each band group
  (``engine.model.patch_embed``).

Then :func:`strict_load`. Anything that still does not fit raises one :class:`UserError` naming the
file, the missing / unexpected / mismatched keys and the architecture the file seems to hold
(:func:`describe_state`).
"""

from __future__ import annotations

import logging
import math

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from engine.errors import UserError
from engine.model.patch_embed import AdaptMode, GroupChannelPatchEmbed, adapt_rgb_weight
from engine.model.tensor_files import StateDict

log = logging.getLogger(__name__)


def describe_state(sd: StateDict) -> str:
    """Short description of the ViT a state dict holds, with the timm name it most likely fits."""
    w = sd.get("patch_embed.proj.weight")
    dim = int(w.shape[0]) if w is not None else (int(sd["cls_token"].shape[-1]) if "cls_token" in sd else None)
    patch = int(w.shape[-1]) if w is not None and w.dim() == 4 else None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    regs = sd.get("reg_token", sd.get("register_tokens"))
    n_reg = int(regs.shape[1]) if regs is not None else 0
    dinov2 = any(k.endswith("ls1.gamma") for k in sd)
    names: dict[tuple[int | None, int, int | None], str] = {
        (384, 12, 14): "vit_small_patch14{}_dinov2",
        (768, 12, 14): "vit_base_patch14{}_dinov2",
        (1024, 24, 14): "vit_large_patch14{}_dinov2",
        (1536, 40, 14): "vit_giant_patch14{}_dinov2",
    }
    mae: dict[tuple[int | None, int, int | None], str] = {
        (768, 12, 16): "vit_base_patch16_224",
        (1024, 24, 16): "vit_large_patch16_224",
        (1280, 32, 14): "vit_huge_patch14_224",
    }
    guess = (
        names.get((dim, depth, patch), "").format(f"_reg{n_reg}" if n_reg else "")
        if dinov2
        else mae.get((dim, depth, patch), "")
    )
    text = f"width {dim}, {depth} blocks, patch {patch}, {n_reg} registers"
    return text + (f" (looks like {guess})" if guess else "")


def _short(items: list[str], n: int = 8) -> str:
    return "[" + ", ".join(items[:n]) + (f", ... +{len(items) - n} more" if len(items) > n else "") + "]"


def fit_error(
    flag: str,
    path: str,
    model_name: str,
    sd: StateDict,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> UserError:
    """The one-line error of a file that does not fit ``--model.name``."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys {_short(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {_short(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} mismatched shapes {_short(mismatched)}")
    return UserError(
        f"{flag} '{path}' does not fit --model.name {model_name}: "
        + "; ".join(parts)
        + f". The file holds a ViT of {describe_state(sd)}; pick the matching --model.name "
        "or the right weight file"
    )


def check_not_partitioned(vit: VisionTransformer, sd: StateDict, flag: str, path: str) -> None:
    """Empty tensors where the model has data: a DeepSpeed ZeRO-3 partition, not weights."""
    if any(v.numel() == 0 for v in sd.values()) and any(v.numel() for v in vit.state_dict().values()):
        raise UserError(
            f"{flag} '{path}' holds empty (partitioned) tensors: a DeepSpeed ZeRO-3 checkpoint. "
            "Consolidate it with the zero_to_fp32.py script in the checkpoint directory, or use "
            "the run's export/ files"
        )


def drop_head(sd: StateDict, vit: VisionTransformer, path: str) -> StateDict:
    """Without the classifier head (``head.*``) when the model has none."""
    head = [k for k in sd if k.startswith("head.")]
    if not head or any(k.startswith("head.") for k in vit.state_dict()):
        return sd
    log.info("%s: ignoring the classifier head (%d tensors); the model is built without one", path, len(head))
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def fit_mask_token(sd: StateDict, vit: VisionTransformer) -> StateDict:
    """DINOv2's iBOT mask token as (1, D), with a Parameter for it on ``vit`` (the DINO objective's)."""
    if "mask_token" not in sd:
        return sd
    sd = dict(sd, mask_token=sd["mask_token"].reshape(1, -1))
    if not isinstance(getattr(vit, "mask_token", None), torch.Tensor):
        dtype = vit.cls_token.dtype if vit.cls_token is not None else torch.get_default_dtype()
        vit.mask_token = nn.Parameter(torch.zeros(sd["mask_token"].shape, dtype=dtype))
    return sd


def _resampled(pe: torch.Tensor, vit: VisionTransformer) -> torch.Tensor | None:
    """File pos_embed (1, P + n*n, D) -> the model's grid, or None when it cannot be resampled."""
    own = vit.pos_embed
    if own is None:
        return None
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    n_old = pe.shape[1] - n_prefix
    side = math.isqrt(max(n_old, 0))
    if side * side != n_old or pe.shape[-1] != own.shape[-1] or pe.dim() != 3:
        return None
    return resample_abs_pos_embed(
        pe.float(), new_size=list(vit.patch_embed.grid_size), old_size=[side, side], num_prefix_tokens=n_prefix
    ).to(pe.dtype)


def resample_pos_embed(sd: StateDict, vit: VisionTransformer) -> StateDict:
    """The file's square position-embedding grid resampled to the model's (left as is when it
    cannot be: :func:`strict_load` then reports the mismatch)."""
    if "pos_embed" not in sd or vit.pos_embed is None or sd["pos_embed"].shape == vit.pos_embed.shape:
        return sd
    pe = _resampled(sd["pos_embed"], vit)
    return sd if pe is None else dict(sd, pos_embed=pe)


def fit_patch_embed(
    sd: StateDict, vit: VisionTransformer, adapt: AdaptMode, flag: str, path: str
) -> tuple[StateDict, bool]:
    """(state dict, whether RGB kernels were adapted) for ``vit``'s patch embed.

    Group-channel model + RGB file: the group convs are initialised from the RGB kernels and their
    tensors replace the file's. Group-channel model + a file with group convs: trained embeds, not
    fresh. Plain model with another band count than the file: kernels adapted, the embed is fresh.
    """
    pe_mod = vit.patch_embed
    rgb_w = sd.get("patch_embed.proj.weight")
    if isinstance(pe_mod, GroupChannelPatchEmbed) and rgb_w is not None:
        if rgb_w.dim() != 4 or rgb_w.shape[0] != pe_mod.embed_dim or rgb_w.shape[-1] != pe_mod.patch_size[0]:
            raise fit_error(
                flag,
                path,
                getattr(vit, "geoexplora_name", "?"),
                sd,
                [],
                [],
                [
                    f"patch_embed.proj.weight: file {tuple(rgb_w.shape)} vs group convs "
                    f"({pe_mod.embed_dim}, c_g, {pe_mod.patch_size[0]}, {pe_mod.patch_size[1]})"
                ],
            )
        sd = dict(sd)
        pe_mod.init_from_rgb(sd.pop("patch_embed.proj.weight"), sd.pop("patch_embed.proj.bias", None), adapt)
        for k, v in pe_mod.state_dict().items():
            sd["patch_embed." + k] = v
        return sd, True
    if isinstance(pe_mod, GroupChannelPatchEmbed):
        pe_mod.fresh = False  # the file carries trained group embeds (a geoexplora export)
        return sd, False
    if rgb_w is not None and rgb_w.dim() == 4:
        c_model = pe_mod.proj.weight.shape[1]
        if (
            rgb_w.shape[1] != c_model
            and rgb_w.shape[0] == pe_mod.proj.weight.shape[0]
            and rgb_w.shape[2:] == pe_mod.proj.weight.shape[2:]
        ):
            sd = dict(sd, **{"patch_embed.proj.weight": adapt_rgb_weight(rgb_w, c_model, adapt)})
            pe_mod.fresh = True
            log.info("%s: patch embedding adapted from %d to %d bands (%s)", path, rgb_w.shape[1], c_model, adapt)
            return sd, True
    return sd, False


def state_diff(own: StateDict, sd: StateDict, target: str = "model") -> tuple[list[str], list[str], list[str]]:
    """What keeps ``sd`` (a file's tensors) from loading strictly into a module whose state is ``own``:
    (missing keys, unexpected keys, "key: file (shape) vs <target> (shape)" for shape mismatches)."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs {target} {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    return missing, unexpected, mismatched


def strict_load(vit: VisionTransformer, sd: StateDict, flag: str, path: str) -> None:
    """``vit.load_state_dict(sd, strict=True)``, or one UserError listing what does not fit."""
    own = vit.state_dict()
    missing, unexpected, mismatched = state_diff(own, sd)
    if missing or unexpected or mismatched:
        raise fit_error(
            flag, path, getattr(vit, "geoexplora_name", type(vit).__name__), sd, missing, unexpected, mismatched
        )
    vit.load_state_dict(sd, strict=True)
