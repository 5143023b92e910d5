"""ExPLoRA adapter files, merged exports and the PEFT layout.

Adapter file (``save_adapter``): one ``.safetensors`` holding only what trains -- LoRA A/B, the
unfrozen blocks, the norms, a new patch embed, whatever the recipe unfroze -- under the model's own
state-dict names, with JSON metadata: ``format`` = ``geoexplora-adapter/1``, ``recipe`` (the
ExploraConfig plus resolved block indices), ``model`` (the ModelConfig) and ``base`` (name, timm
architecture, weight-file name and sha256). ``load_adapter`` applies the recorded recipe to a freshly
built base and loads the tensors: outputs equal the trained model's exactly. A different base file
(sha256) is refused. A random-init base has no file to name, so its identity is a fingerprint of
the frozen tensors (``frozen_sha256``, plus the run's ``seed`` as a hint): a base that does not
reproduce it -- another seed, another torch/timm version -- is refused too, and
``build_from_adapter`` asks for the seed or a base file instead of building a new random base.

Merged export (``export_merged``): the adapter folded into the base, as a plain timm state dict in
``.safetensors`` (no LoRA keys, no mask token) that ``timm.create_model(arch, num_classes=0,
img_size=...)`` loads with ``load_state_dict`` -- for a plain patch embed; a group-channel model's
export loads with ``build_vit`` and the same model config.

PEFT layout (``export_peft``): ``adapter_config.json`` + ``adapter_model.safetensors`` for
``peft.PeftModel.from_pretrained(timm_model, dir)``. Separate q/k/v adapters inside timm's fused
``qkv`` (output segments) map exactly onto one PEFT LoRA on ``qkv`` of rank S*r: ``lora_A`` = the
stacked [A_q; A_v] (S*r, K), ``lora_B`` (3*dim, S*r) block-diagonal (B_q in rows 0:dim, columns
0:r; B_v in rows 2*dim:3*dim, columns r:2r; zeros for k), alpha S*alpha so that alpha/r is kept;
``rank_pattern``/``alpha_pattern`` record this for ``qkv``. Unfrozen blocks, norms, LayerScale and
a trained patch embed go to ``modules_to_save``. Root parameters (pos_embed, cls/register tokens)
and group-channel embeds have no PEFT place: exporting them raises. ``geoexplora_mapping.json``
beside the two files records this mapping and the base identity.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from timm.layers import LayerScale
from torch import nn

from engine.atomic import atomic_write, atomic_write_text
from engine.config import ExploraConfig
from engine.errors import UserError
from engine.model.explora import NORM_TYPES, add_lora, apply_explora
from engine.model.lora import is_lora_param, lora_modules, unwrap_lora
from engine.model.patch_embed import GroupChannelPatchEmbed
from engine.model.vit import BaseInfo, base_info
from engine.model.weights import read_safetensors

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "geoexplora-adapter/1"
MERGED_FORMAT = "geoexplora-merged/1"
_RECIPE_FIELDS = {f for f in ExploraConfig.__dataclass_fields__}
# tensors the objectives own but a plain timm ViT does not have
_NOT_TIMM = ("mask_token",)
# frozen_fingerprint of a model whose every tensor trained: any base of the architecture fits
_NOTHING_FROZEN = hashlib.sha256().hexdigest()


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, meta: dict[str, str]) -> Path:
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata=meta)
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def _base_meta(info: BaseInfo) -> dict:
    return {"name": info.name, "arch": info.arch, "weights": Path(info.weights).name if info.weights else "",
            "weights_sha256": info.weights_sha256(), "format": info.format}


def frozen_fingerprint(vit: nn.Module, trained: set[str]) -> str:
    """sha256 of the base tensors an adapter does not carry: every state-dict entry except the
    ``trained`` names, LoRA tensors and objective-only tensors, as fp32, by sorted name. Equal
    fingerprints mean an adapter loads onto this base exactly as onto the one it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(vit.state_dict().items()):
        if name in trained or is_lora_param(name) or name in _NOT_TIMM:
            continue
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _recipe(vit: nn.Module) -> dict:
    recipe = getattr(vit, "geoexplora_recipe", None)
    if not recipe:
        raise ValueError("the model has no ExPLoRA recipe applied (call apply_explora first)")
    return recipe


def adapter_state(vit: nn.Module) -> dict[str, torch.Tensor]:
    """{state-dict name: tensor} of every trainable parameter (what an adapter file stores)."""
    return {n: p.detach() for n, p in vit.named_parameters() if p.requires_grad}


def save_adapter(vit: nn.Module, path: str | Path, seed: Optional[int] = None) -> Path:
    """Write the trainable tensors + recipe + model config + base identity to ``path`` (.safetensors).

    seed: for a random-init base, the seed it was built under (``train.seed``; recorded as a hint
    for :func:`build_from_adapter`); the frozen-tensor fingerprint is recorded either way."""
    recipe = _recipe(vit)
    info = base_info(vit)
    state = adapter_state(vit)
    base = _base_meta(info)
    if not info.weights:
        base.update(frozen_sha256=frozen_fingerprint(vit, set(state)), seed=seed)
    meta = {"format": ADAPTER_FORMAT, "recipe": json.dumps(recipe), "model": json.dumps(info.model),
            "base": json.dumps(base)}
    out = _save_safetensors(state, path, meta)
    log.info("adapter saved to %s (%d tensors)", out, len(state))
    return out


def read_adapter(path: str | Path, flag: str = "--model.adapter") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, {"recipe", "model", "base"} parsed) of an adapter file; UserError if it is none."""
    if not Path(path).is_file():
        raise UserError(f"{flag} '{path}': file not found")
    try:
        tensors, meta = read_safetensors(path)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise UserError(f"{flag} '{path}': not a safetensors file ({e.__class__.__name__})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{flag} '{path}': not a geoexplora adapter (format {meta.get('format')!r}, "
                        f"expected {ADAPTER_FORMAT!r})")
    return tensors, {k: json.loads(meta[k]) for k in ("recipe", "model", "base")}


def _check_base(info: BaseInfo, base: dict, path: str | Path, flag: str) -> None:
    if base.get("arch") and base["arch"] != info.arch:
        raise UserError(f"{flag} '{path}' was trained on {base['arch']}, the model is {info.arch}; "
                        f"set --model.name {base['name']}")
    want = base.get("weights_sha256")
    if want is None:
        return
    have = info.weights_sha256()
    if have != want:
        raise UserError(f"{flag} '{path}' was trained on base weights '{base.get('weights')}' (sha256 {want[:12]}...), "
                        f"but the model was built from {repr(info.weights) if info.weights else 'random init'}"
                        f"{f' (sha256 {have[:12]}...)' if have else ''}; give that file in --model.weights")


def _check_frozen(vit: nn.Module, tensors: dict[str, torch.Tensor], base: dict, path: str | Path, flag: str) -> None:
    """An adapter trained on a random-init base: ``vit``'s frozen tensors must be that base's."""
    want = base.get("frozen_sha256")
    if want is None or frozen_fingerprint(vit, set(tensors)) == want:
        return
    seed = base.get("seed")
    todo = ("use the run's export/vit_merged.safetensors as --model.weights instead (it holds the whole model)"
            if flag.startswith("--") else
            f"pass the seed it was built under ({f'seed={seed}, the run' if seed is not None else 'the run'}'s "
            "train.seed; the same torch and timm versions) or weights= a file holding it")
    raise UserError(f"{flag} '{path}' was trained on a random-init base{f' (seed {seed})' if seed is not None else ''}"
                    f" and this model's frozen weights are not that base; {todo}")


def _load_tensors(vit: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path, flag: str,
                  required: Optional[set[str]] = None) -> None:
    own = vit.state_dict()
    unexpected = [k for k in tensors if k not in own]
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in tensors.items() if k in own and v.shape != own[k].shape]
    missing = sorted((required or set()) - set(tensors))
    if unexpected or mismatched or missing:
        parts = [f"{len(x)} {what} {x[:6]}" for what, x in (("missing", missing), ("unexpected", unexpected),
                                                            ("mismatched", mismatched)) if x]
        raise UserError(f"{flag} '{path}' does not fit the model: " + "; ".join(parts)
                        + ". Build the base with the adapter's model settings (--model.*)")
    vit.load_state_dict(tensors, strict=False)


def load_adapter(vit: nn.Module, path: str | Path, check_base: bool = True, flag: str = "--model.adapter") -> dict:
    """Apply the file's recipe to ``vit`` (a base from ``build_vit``, no recipe yet) and load its
    tensors; every trainable tensor must come from the file. Returns the recipe."""
    tensors, meta = read_adapter(path, flag)
    if check_base:
        _check_base(base_info(vit), meta["base"], path, flag)
        _check_frozen(vit, tensors, meta["base"], path, flag)
    recipe = meta["recipe"]
    apply_explora(vit, {k: v for k, v in recipe.items() if k in _RECIPE_FIELDS})
    _load_tensors(vit, tensors, path, flag, required=set(adapter_state(vit)))
    return recipe


def build_from_adapter(path: str | Path, weights: Optional[str] = None, seed: Optional[int] = None,
                       device: Optional[str | torch.device] = None) -> nn.Module:
    """Rebuild the trained model from an adapter: base from its recorded model config, recipe
    applied, tensors loaded.

    weights: the base weight file (default: the recorded one, found by path). seed: for an adapter
    trained on a random-init base, the seed that base was built under (the run's ``train.seed``,
    recorded in the file); the base is rebuilt under it and must reproduce the recorded fingerprint.
    Such an adapter with neither a seed nor a base file is refused: building a fresh random base
    would silently give another model.
    """
    from engine.config import ModelConfig, from_dict
    from engine.model.vit import build_vit

    _, meta = read_adapter(path, "build_from_adapter")
    base = meta["base"]
    model = dict(meta["model"])
    model["adapter"] = ""
    if weights is not None:
        model["weights"] = weights
    if not model.get("weights") and seed is None and base.get("frozen_sha256", "") != _NOTHING_FROZEN:
        hint = f"seed={base['seed']} (the run's train.seed)" if base.get("seed") is not None else "seed=<train.seed>"
        raise UserError(f"build_from_adapter: '{path}' was trained on a random-init base, which the file does not "
                        f"hold; pass {hint} to rebuild that base, or weights= a file holding it")
    if seed is not None and base.get("frozen_sha256") is None:
        log.warning("%s records no base fingerprint: the base rebuilt with seed %d cannot be verified", path, seed)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        if seed is not None:
            torch.manual_seed(seed)
        vit = build_vit(from_dict(ModelConfig, model, prefix="model."))
        load_adapter(vit, path, flag="build_from_adapter")
    return vit.to(device) if device is not None else vit


def merge_adapter_file(vit: nn.Module, path: str | Path, info: BaseInfo, flag: str = "--model.adapter") -> None:
    """Fold an adapter file into ``vit``'s weights (no recipe left afterwards): ``cfg.adapter``."""
    tensors, meta = read_adapter(path, flag)
    _check_base(info, meta["base"], path, flag)
    _check_frozen(vit, tensors, meta["base"], path, flag)
    recipe = meta["recipe"]
    unfrozen = set(recipe.get("unfrozen_block_indices", []))
    if recipe.get("lora_targets"):
        add_lora(vit, [i for i in range(len(vit.blocks)) if i not in unfrozen], recipe["lora_targets"],
                 int(recipe["lora_rank"]), float(recipe["lora_alpha"]))
    if "mask_token" in tensors and not isinstance(getattr(vit, "mask_token", None), torch.Tensor):
        vit.mask_token = nn.Parameter(torch.zeros_like(tensors["mask_token"]))
    _load_tensors(vit, tensors, path, flag)
    unwrap_lora(vit)
    if isinstance(vit.patch_embed, GroupChannelPatchEmbed):
        vit.patch_embed.fresh = False
    log.info("merged adapter %s into the base", path)


def merged_state_dict(vit: nn.Module) -> dict[str, torch.Tensor]:
    """Plain timm state dict with every LoRA update folded in (the model itself is not changed)."""
    sd = {k: v for k, v in vit.state_dict().items() if not is_lora_param(k) and k not in _NOT_TIMM}
    for name, m in lora_modules(vit):
        if not m.merged:
            sd[f"{name}.weight"] = (m.weight.detach().float() + m.delta_weight()).to(m.weight.dtype)
    return sd


def export_merged(vit: nn.Module, path: str | Path) -> Path:
    """Write :func:`merged_state_dict` as .safetensors (metadata: format, arch, model config, base)."""
    info = base_info(vit)
    meta = {"format": MERGED_FORMAT, "arch": info.arch, "model": json.dumps(info.model),
            "base": json.dumps(_base_meta(info)), "recipe": json.dumps(getattr(vit, "geoexplora_recipe", {}))}
    return _save_safetensors(merged_state_dict(vit), path, meta)


def _peft_tensors(vit: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], list[str], dict, dict]:
    """(tensors, target modules, modules_to_save, rank_pattern, alpha_pattern) in PEFT's layout."""
    recipe = _recipe(vit)
    if isinstance(vit.patch_embed, GroupChannelPatchEmbed):
        raise UserError("PEFT export: a group-channel patch embed is not a timm module; "
                        "use the adapter file or the merged export")
    root = [n for n, p in vit.named_parameters(recurse=False) if p.requires_grad and n not in _NOT_TIMM]
    if root:
        raise UserError(f"PEFT export: trained root parameters {root} have no PEFT place (modules_to_save takes "
                        "modules); use the adapter file or the merged export")
    pre = "base_model.model."
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
                big_b[off:off + n, s * r:(s + 1) * r] = b[s * n:(s + 1) * n]
            if S > 1:
                leaf = name.rsplit(".", 1)[-1]
                rank_pattern[leaf], alpha_pattern[leaf] = S * r, S * m.alpha
        tensors[f"{pre}{name}.lora_A.weight"] = a
        tensors[f"{pre}{name}.lora_B.weight"] = big_b
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
            tensors[f"{pre}{mname}.{pname}"] = p.detach()
    covered = set(k[len(pre):] for k in tensors)
    lost = [n for n, p in vit.named_parameters() if p.requires_grad and n not in _NOT_TIMM
            and not is_lora_param(n) and n not in covered]
    if lost:
        raise UserError(f"PEFT export: trained tensors {lost[:6]} are not in a PEFT-mappable module")
    return tensors, targets, to_save, rank_pattern, alpha_pattern


def export_peft(vit: nn.Module, out_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``geoexplora_mapping.json``)."""
    recipe = _recipe(vit)
    info = base_info(vit)
    tensors, targets, to_save, rank_pattern, alpha_pattern = _peft_tensors(vit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": f"timm/{info.arch}",
        "r": int(recipe["lora_rank"]), "lora_alpha": float(recipe["lora_alpha"]),
        "lora_dropout": float(recipe["lora_dropout"]), "target_modules": targets, "modules_to_save": to_save,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_rslora": False,
        "use_dora": False, "revision": None,
    }
    _save_safetensors(tensors, out / "adapter_model.safetensors", {"format": "pt"})
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2))
    mapping = {
        "base": _base_meta(info), "model": info.model, "recipe": recipe,
        "qkv": "q/k/v adapters inside timm's fused attn.qkv are one PEFT LoRA of rank S*r on qkv: lora_A = "
               "[A_q; A_k; A_v] (targets only), lora_B block-diagonal over the (q, k, v) row blocks, "
               "alpha S*alpha (rank_pattern / alpha_pattern), so alpha/r is unchanged",
        "not_exported": [n for n in _NOT_TIMM if isinstance(getattr(vit, n, None), torch.Tensor)],
    }
    atomic_write_text(out / "geoexplora_mapping.json", json.dumps(mapping, indent=2))
    return out
