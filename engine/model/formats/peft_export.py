"""The PEFT layout (:func:`export_peft`): ``adapter_config.json`` + ``adapter_model.safetensors`` for
``peft.PeftModel.from_pretrained(timm_model, dir)``.

Separate q/k/v adapters inside timm's fused ``qkv`` (output segments) map exactly onto one PEFT LoRA
on ``qkv`` of rank S*r: ``lora_A`` = the stacked [A_q; A_v] (S*r, K), ``lora_B`` (3*dim, S*r)
block-diagonal (B_q in rows 0:dim, columns 0:r; B_v in rows 2*dim:3*dim, columns r:2r; zeros for
k), alpha S*alpha so that alpha/r is kept; ``rank_pattern``/``alpha_pattern`` record this for
``qkv``. Unfrozen blocks, norms, LayerScale and a trained patch embed go to ``modules_to_save``.
Root parameters (pos_embed, cls/register tokens) and group-channel embeds have no PEFT place:
exporting them raises. ``geoexplora_mapping.json`` beside the two files records this mapping and
the base identity.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer

from engine.atomic import atomic_write_text
from engine.errors import UserError
from engine.model.architecture import NOT_TIMM
from engine.model.base_identity import base_info, base_meta
from engine.model.explora import NORM_TYPES, applied_recipe
from engine.model.lora import is_lora_param, lora_modules
from engine.model.patch_embed import GroupChannelPatchEmbed
from engine.model.tensor_files import write_safetensors

PREFIX = "base_model.model."


def _peft_tensors(vit: VisionTransformer) -> tuple[dict[str, torch.Tensor], list[str], list[str], dict, dict]:
    """(tensors, target modules, modules_to_save, rank_pattern, alpha_pattern) in PEFT's layout."""
    recipe = applied_recipe(vit)
    if isinstance(vit.patch_embed, GroupChannelPatchEmbed):
        raise UserError(
            "PEFT export: a group-channel patch embed is not a timm module; use the adapter file or the merged export"
        )
    root = [n for n, p in vit.named_parameters(recurse=False) if p.requires_grad and n not in NOT_TIMM]
    if root:
        raise UserError(
            f"PEFT export: trained root parameters {root} have no PEFT place (modules_to_save takes "
            "modules); use the adapter file or the merged export"
        )
    tensors: dict[str, torch.Tensor] = {}
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for name, m in lora_modules(vit):
        r, S = m.rank, m.num_segments
        a, b = m.lora_a.detach(), m.lora_b.detach()
        if m.segments is None:
            big_b = b
        else:
            big_b = torch.zeros(m.out_features, S * r, dtype=b.dtype)
            n = m.segment_width
            for s, off in enumerate(m.segments):
                big_b[off : off + n, s * r : (s + 1) * r] = b[s * n : (s + 1) * n]
            if S > 1:
                leaf = name.rsplit(".", 1)[-1]
                rank_pattern[leaf], alpha_pattern[leaf] = S * r, S * m.alpha
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = big_b
        targets.append(name)
    unfrozen = recipe.get("unfrozen_block_indices", [])
    to_save = [f"blocks.{i}" for i in unfrozen]
    for mname, mod in vit.named_modules():
        if not mname or any(mname == b or mname.startswith(b + ".") for b in to_save):
            continue
        own = list(mod.parameters(recurse=False))
        whole = mname == "patch_embed" and all(p.requires_grad for p in mod.parameters())
        if whole or (own and isinstance(mod, NORM_TYPES + (LayerScale,)) and all(p.requires_grad for p in own)):
            to_save.append(mname)
    for mname in to_save:
        for pname, p in vit.get_submodule(mname).named_parameters():
            tensors[f"{PREFIX}{mname}.{pname}"] = p.detach()
    covered = {k[len(PREFIX) :] for k in tensors}
    lost = [
        n
        for n, p in vit.named_parameters()
        if p.requires_grad and n not in NOT_TIMM and not is_lora_param(n) and n not in covered
    ]
    if lost:
        raise UserError(f"PEFT export: trained tensors {lost[:6]} are not in a PEFT-mappable module")
    return tensors, targets, to_save, rank_pattern, alpha_pattern


def export_peft(vit: VisionTransformer, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``geoexplora_mapping.json``)."""
    recipe = applied_recipe(vit)
    info = base_info(vit)
    tensors, targets, to_save, rank_pattern, alpha_pattern = _peft_tensors(vit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": f"timm/{info.arch}",
        "r": int(recipe["lora_rank"]),
        "lora_alpha": float(recipe["lora_alpha"]),
        "lora_dropout": float(recipe["lora_dropout"]),
        "target_modules": targets,
        "modules_to_save": to_save,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }
    write_safetensors(tensors, out / "adapter_model.safetensors", {"format": "pt"})
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2))
    mapping = {
        "base": base_meta(info),
        "model": info.model,
        "recipe": recipe,
        "qkv": "q/k/v adapters inside timm's fused attn.qkv are one PEFT LoRA of rank S*r on qkv: lora_A = "
        "[A_q; A_k; A_v] (targets only), lora_B block-diagonal over the (q, k, v) row blocks, "
        "alpha S*alpha (rank_pattern / alpha_pattern), so alpha/r is unchanged",
        "not_exported": [n for n in NOT_TIMM if isinstance(getattr(vit, n, None), torch.Tensor)],
    }
    atomic_write_text(out / "geoexplora_mapping.json", json.dumps(mapping, indent=2))
    return out
