"""Local pre-trained weights for timm ViTs: read, recognise the format, remap keys, load strictly.

Formats (recognised from the keys, never from the file name):

* timm (``.safetensors`` / ``.pth``): keys already match the model.
* official DINOv2 hub ``.pth`` (``dinov2_vitl14_pretrain.pth``, ``..._reg4_pretrain.pth``): has a
  ``mask_token``; registers are ``register_tokens`` and the cls position embedding is folded into
  the cls token (timm's register models have no class position); ViT-g's SwiGLU ``mlp.w12``/``w3``
  become ``mlp.fc1``/``fc2``. DINOv2 training checkpoints (``{"teacher": {"backbone.*"}}`` or
  ``student./teacher.backbone.*``, possibly with chunked ``blocks.<chunk>.<i>``) are accepted too.
  The mask token is kept as ``vit.mask_token`` (1, D) for the iBOT objective.
* official MAE ``.pth`` (``{"model": ...}``): encoder keys are timm's; the decoder (``decoder_*``
  and the decoder's ``mask_token``) is returned in :attr:`LoadedWeights.extra` for the MAE objective.
* geoexplora: a merged export (plain timm keys), or a trainer checkpoint directory
  (``step_XXXXXXXX/`` with ``meta.json`` + DeepSpeed's ``mp_rank_00_model_states.pt``), whose LoRA
  tensors are merged into the base with the recipe recorded in ``meta.json``.

Position embeddings are resampled (bicubic) to the model's grid; RGB patch-embed kernels are adapted
to ``in_chans`` bands or to each band group (``engine.model.patch_embed``). Anything that still does
not fit raises one :class:`UserError` naming the file, the missing / unexpected / mismatched keys and
the architecture the file seems to hold. Nothing here touches the network.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from engine.errors import UserError
from engine.model.patch_embed import AdaptMode, GroupChannelPatchEmbed, adapt_rgb_weight

log = logging.getLogger(__name__)

DS_MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class LoadedWeights:
    """What :func:`load_weights` found. extra: tensors that are not part of the ViT (MAE decoder)."""

    path: str
    format: str
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    adapted_patch_embed: bool = False


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (cached per path, size and mtime: hashing ViT-g takes seconds)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _torch_load(path: Path, flag: str, trusted: bool = False) -> Any:
    try:
        # MAE's training checkpoints pickle their argparse.Namespace next to the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported to the user below
        if trusted:
            # our own trainer's DeepSpeed checkpoint (written by this program in the run directory)
            return torch.load(path, map_location="cpu", weights_only=False)
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(f"{flag} '{path}': cannot be read as a weights-only torch checkpoint ({first}); "
                        "re-save its state dict with torch.save(model.state_dict(), ...) or as .safetensors") from None


def read_checkpoint(path: str | Path, flag: str = "--model.weights") -> tuple[dict[str, torch.Tensor], dict]:
    """Flat {key: tensor} and metadata from a weight file or a geoexplora checkpoint directory.

    Wrappers are peeled off: ``model`` / ``state_dict`` / ``module`` / ``teacher`` dicts, DDP's
    ``module.`` prefix, DINOv2's ``backbone.`` (teacher preferred) and our objectives' ``vit.``.
    metadata: safetensors metadata, or ``{"geoexplora_meta": meta.json}`` for a checkpoint directory.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} '{path}': file not found")
    meta: dict = {}
    if p.is_dir():
        meta_file, states = p / "meta.json", p / DS_MODEL_STATES
        if meta_file.is_file() and not states.is_file() and any(p.glob("zero_pp_rank_*_model_states.pt")):
            raise UserError(f"{flag} '{path}' is a DeepSpeed ZeRO-3 checkpoint (the weights are split over the "
                            f"ranks). Consolidate it with {p.parent / 'zero_to_fp32.py'}, or use the run's export/ files")
        if not meta_file.is_file() or not states.is_file():
            raise UserError(f"{flag} '{path}' is a directory but not a geoexplora checkpoint "
                            f"(needs meta.json and {DS_MODEL_STATES})")
        meta = {"geoexplora_meta": json.loads(meta_file.read_text())}
        obj = _torch_load(states, flag, trusted=True)
    elif p.suffix == ".safetensors":
        obj, meta = read_safetensors(p)
    else:
        obj = _torch_load(p, flag)
    if not isinstance(obj, dict):
        raise UserError(f"{flag} '{path}': expected a state dict, found {type(obj).__name__}")
    for key in ("teacher", "model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    for prefix in ("teacher.backbone.", "backbone.", "vit."):
        if any(k.startswith(prefix) for k in sd):
            inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if prefix == "vit.":  # our MAE objective keeps its decoder (official MAE names) beside the encoder
                # ``decoder.mask_token`` becomes the MAE layout's ``mask_token`` (overriding an encoder's
                # DINOv2 mask token, which the MAE objective does not use)
                inner.update({k[len("decoder."):]: v for k, v in sd.items()
                              if k.startswith("decoder.decoder_") or k == "decoder.mask_token"})
            sd = inner
            break
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):  # DINOv2 chunked (FSDP) blocks
        sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    return sd, meta


def describe_state(sd: dict[str, torch.Tensor]) -> str:
    """Short description of the ViT a state dict holds, with the timm name it most likely fits."""
    w = sd.get("patch_embed.proj.weight")
    dim = int(w.shape[0]) if w is not None else (int(sd["cls_token"].shape[-1]) if "cls_token" in sd else None)
    patch = int(w.shape[-1]) if w is not None and w.dim() == 4 else None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    regs = sd.get("reg_token", sd.get("register_tokens"))
    n_reg = int(regs.shape[1]) if regs is not None else 0
    dinov2 = any(k.endswith("ls1.gamma") for k in sd)
    names = {(384, 12, 14): "vit_small_patch14{}_dinov2", (768, 12, 14): "vit_base_patch14{}_dinov2",
             (1024, 24, 14): "vit_large_patch14{}_dinov2", (1536, 40, 14): "vit_giant_patch14{}_dinov2"}
    mae = {(768, 12, 16): "vit_base_patch16_224", (1024, 24, 16): "vit_large_patch16_224",
           (1280, 32, 14): "vit_huge_patch14_224"}
    guess = (names.get((dim, depth, patch), "").format(f"_reg{n_reg}" if n_reg else "") if dinov2
             else mae.get((dim, depth, patch), ""))
    text = f"width {dim}, {depth} blocks, patch {patch}, {n_reg} registers"
    return text + (f" (looks like {guess})" if guess else "")


def _short(items: list[str], n: int = 8) -> str:
    return "[" + ", ".join(items[:n]) + (f", ... +{len(items) - n} more" if len(items) > n else "") + "]"


def _fit_error(flag: str, path: str, model_name: str, sd: dict, missing: list[str], unexpected: list[str],
               mismatched: list[str]) -> UserError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys {_short(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {_short(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} mismatched shapes {_short(mismatched)}")
    return UserError(f"{flag} '{path}' does not fit --model.name {model_name}: " + "; ".join(parts)
                     + f". The file holds a ViT of {describe_state(sd)}; pick the matching --model.name "
                       "or the right weight file")


def _convert_dinov2_official(sd: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
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


def _resample_pos_embed(pe: torch.Tensor, vit: nn.Module) -> Optional[torch.Tensor]:
    """File pos_embed (1, P + n*n, D) -> the model's grid, or None when it cannot be resampled."""
    own = vit.pos_embed
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    n_old = pe.shape[1] - n_prefix
    side = math.isqrt(max(n_old, 0))
    if side * side != n_old or pe.shape[-1] != own.shape[-1] or pe.dim() != 3:
        return None
    return resample_abs_pos_embed(pe.float(), new_size=list(vit.patch_embed.grid_size), old_size=[side, side],
                                  num_prefix_tokens=n_prefix).to(pe.dtype)


def _merge_checkpoint_lora(sd: dict[str, torch.Tensor], vit: nn.Module, meta: dict, flag: str, path: str) -> None:
    """A trainer checkpoint still holds LoRA A/B: wrap the same layers, load, merge, unwrap."""
    from engine.model.explora import add_lora
    from engine.model.lora import unwrap_lora

    rec = ((meta.get("geoexplora_meta") or {}).get("config") or {}).get("explora")
    if not isinstance(rec, dict):
        raise UserError(f"{flag} '{path}': holds LoRA tensors but no recipe (meta.json config.explora); "
                        "use the run's export/ files instead")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.endswith(".lora_a")})
    add_lora(vit, blocks, rec.get("lora_targets", ["q", "v"]), int(rec.get("lora_rank", 64)),
             float(rec.get("lora_alpha", rec.get("lora_rank", 64))))
    _strict_load(vit, sd, flag, path)
    unwrap_lora(vit)


def _strict_load(vit: nn.Module, sd: dict[str, torch.Tensor], flag: str, path: str) -> None:
    own = vit.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if any(v.numel() == 0 for v in sd.values()) and any(v.numel() for v in own.values()):
        raise UserError(f"{flag} '{path}' holds empty (partitioned) tensors: a DeepSpeed ZeRO-3 checkpoint. "
                        "Consolidate it with the zero_to_fp32.py script in the checkpoint directory, or use "
                        "the run's export/ files")
    if missing or unexpected or mismatched:
        raise _fit_error(flag, path, getattr(vit, "geoexplora_name", type(vit).__name__), sd, missing,
                         unexpected, mismatched)
    vit.load_state_dict(sd, strict=True)


def load_weights(vit: nn.Module, path: str, adapt: AdaptMode = "timm", flag: str = "--model.weights") -> LoadedWeights:
    """Load a local weight file of any supported format into ``vit`` (in place, strict).

    vit: a timm VisionTransformer built on CPU (plain or group-channel patch embed, no LoRA yet).
    adapt: how RGB patch kernels become ``in_chans``-band kernels. Returns the format and the
    leftover non-ViT tensors (MAE decoder). Raises UserError when the file does not fit.
    """
    sd, meta = read_checkpoint(path, flag)
    fmt_tag = str(meta.get("format", ""))
    if fmt_tag.startswith("geoexplora-adapter"):
        raise UserError(f"{flag} '{path}' is an ExPLoRA adapter, not base weights: give the base model's file "
                        "in --model.weights and this file in --model.adapter")
    decoder_present = any(k.startswith("decoder_") for k in sd)
    extra: dict[str, torch.Tensor] = {}
    if decoder_present:
        fmt = "mae"
        extra = {k: sd.pop(k) for k in list(sd) if k.startswith("decoder_") or k == "mask_token"}
    elif "geoexplora_meta" in meta or fmt_tag.startswith("geoexplora"):
        fmt = "geoexplora"
    elif "mask_token" in sd or "register_tokens" in sd:
        fmt = "dinov2_hub"
        sd = _convert_dinov2_official(sd, vit)
    else:
        fmt = "timm"
    head = [k for k in sd if k.startswith("head.")]
    if head and not any(k.startswith("head.") for k in vit.state_dict()):
        log.info("%s: ignoring the classifier head (%d tensors); the model is built without one", path, len(head))
        for k in head:
            sd.pop(k)
    if "mask_token" in sd:
        # DINOv2's iBOT mask token (1, D): kept on the model for the DINO objective
        sd["mask_token"] = sd["mask_token"].reshape(1, -1)
        if not isinstance(getattr(vit, "mask_token", None), torch.Tensor):
            vit.mask_token = nn.Parameter(torch.zeros(sd["mask_token"].shape, dtype=vit.cls_token.dtype))

    if "pos_embed" in sd and vit.pos_embed is not None and sd["pos_embed"].shape != vit.pos_embed.shape:
        pe = _resample_pos_embed(sd["pos_embed"], vit)
        if pe is not None:
            sd["pos_embed"] = pe

    adapted = False
    pe_mod = vit.patch_embed
    rgb_w = sd.get("patch_embed.proj.weight")
    if isinstance(pe_mod, GroupChannelPatchEmbed) and rgb_w is not None:
        if rgb_w.dim() != 4 or rgb_w.shape[0] != pe_mod.embed_dim or rgb_w.shape[-1] != pe_mod.patch_size[0]:
            raise _fit_error(flag, path, getattr(vit, "geoexplora_name", "?"), sd, [], [],
                             [f"patch_embed.proj.weight: file {tuple(rgb_w.shape)} vs group convs "
                              f"({pe_mod.embed_dim}, c_g, {pe_mod.patch_size[0]}, {pe_mod.patch_size[1]})"])
        pe_mod.init_from_rgb(sd.pop("patch_embed.proj.weight"), sd.pop("patch_embed.proj.bias", None), adapt)
        for k, v in pe_mod.state_dict().items():
            sd["patch_embed." + k] = v
        adapted = True
    elif isinstance(pe_mod, GroupChannelPatchEmbed):
        pe_mod.fresh = False  # the file carries trained group embeds (a geoexplora export)
    elif rgb_w is not None and rgb_w.dim() == 4:
        c_model = pe_mod.proj.weight.shape[1]
        if rgb_w.shape[1] != c_model and rgb_w.shape[0] == pe_mod.proj.weight.shape[0] \
                and rgb_w.shape[2:] == pe_mod.proj.weight.shape[2:]:
            sd["patch_embed.proj.weight"] = adapt_rgb_weight(rgb_w, c_model, adapt)
            adapted = True
            pe_mod.fresh = True
            log.info("%s: patch embedding adapted from %d to %d bands (%s)", path, rgb_w.shape[1], c_model, adapt)

    if any(k.endswith(".lora_a") for k in sd):
        _merge_checkpoint_lora(sd, vit, meta, flag, path)
    else:
        _strict_load(vit, sd, flag, path)
    log.info("loaded %s weights from %s%s", fmt, path, f" (+{len(extra)} MAE decoder tensors)" if extra else "")
    return LoadedWeights(path=str(path), format=fmt, extra=extra, adapted_patch_embed=adapted)
