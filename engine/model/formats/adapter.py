"""ExPLoRA adapter files (geoexplora ``.safetensors``): what trained, the recipe, and the base.

An adapter file (:func:`save_adapter`) holds only what trains -- LoRA A/B, the unfrozen blocks, the
norms, a new patch embed, whatever the recipe unfroze -- under the model's own state-dict names,
with JSON metadata: ``format`` = ``geoexplora-adapter/1``, ``recipe`` (the ExploraConfig plus
resolved block indices), ``model`` (the ModelConfig) and ``base`` (name, timm architecture,
weight-file name and sha256).

:func:`load_adapter` applies the recorded recipe to a freshly built base and loads the tensors:
outputs equal the trained model's exactly. :func:`merge_adapter_file` folds the file into the base
instead (``--model.adapter``). A different base file (sha256) is refused. A random-init base has no
file to name, so its identity is a fingerprint of the frozen tensors (``frozen_sha256``, plus the
run's ``seed`` as a hint): a base that does not reproduce it -- another seed, another torch/timm
version -- is refused too, and :func:`rebuild_config` (for ``engine.model.vit.build_from_adapter``)
asks for the seed or a base file instead of building a new random base.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from engine.config import ExploraConfig
from engine.errors import UserError
from engine.model.architecture import NOT_TIMM
from engine.model.base_identity import BaseInfo, base_info, base_meta
from engine.model.explora import add_lora, applied_recipe, apply_explora
from engine.model.lora import is_lora_param, unwrap_lora
from engine.model.patch_embed import GroupChannelPatchEmbed
from engine.model.tensor_files import read_safetensors, write_safetensors

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "geoexplora-adapter/1"
_RECIPE_FIELDS = set(ExploraConfig.__dataclass_fields__)
# frozen_fingerprint of a model whose every tensor trained: any base of the architecture fits
_NOTHING_FROZEN = hashlib.sha256().hexdigest()


def frozen_fingerprint(vit: VisionTransformer, trained: set[str]) -> str:
    """sha256 of the base tensors an adapter does not carry: every state-dict entry except the
    ``trained`` names, LoRA tensors and objective-only tensors, as fp32, by sorted name. Equal
    fingerprints mean an adapter loads onto this base exactly as onto the one it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(vit.state_dict().items()):
        if name in trained or is_lora_param(name) or name in NOT_TIMM:
            continue
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapter_state(vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """{state-dict name: tensor} of every trainable parameter (what an adapter file stores)."""
    return {n: p.detach() for n, p in vit.named_parameters() if p.requires_grad}


def save_adapter(vit: VisionTransformer, path: str | Path, seed: int | None = None) -> Path:
    """Write the trainable tensors + recipe + model config + base identity to ``path`` (.safetensors).

    seed: for a random-init base, the seed it was built under (``train.seed``; recorded as a hint
    for ``build_from_adapter``); the frozen-tensor fingerprint is recorded either way."""
    recipe = applied_recipe(vit)
    info = base_info(vit)
    state = adapter_state(vit)
    base = base_meta(info)
    if not info.weights:
        base.update(frozen_sha256=frozen_fingerprint(vit, set(state)), seed=seed)
    meta = {
        "format": ADAPTER_FORMAT,
        "recipe": json.dumps(recipe),
        "model": json.dumps(info.model),
        "base": json.dumps(base),
    }
    out = write_safetensors(state, path, meta)
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
        raise UserError(
            f"{flag} '{path}': not a geoexplora adapter (format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r})"
        )
    return tensors, {k: json.loads(meta[k]) for k in ("recipe", "model", "base")}


def _check_base(info: BaseInfo, base: dict, path: str | Path, flag: str) -> None:
    if base.get("arch") and base["arch"] != info.arch:
        raise UserError(
            f"{flag} '{path}' was trained on {base['arch']}, the model is {info.arch}; set --model.name {base['name']}"
        )
    want = base.get("weights_sha256")
    if want is None:
        return
    have = info.weights_sha256()
    if have != want:
        raise UserError(
            f"{flag} '{path}' was trained on base weights '{base.get('weights')}' (sha256 {want[:12]}...), "
            f"but the model was built from {repr(info.weights) if info.weights else 'random init'}"
            f"{f' (sha256 {have[:12]}...)' if have else ''}; give that file in --model.weights"
        )


def _check_frozen(
    vit: VisionTransformer, tensors: dict[str, torch.Tensor], base: dict, path: str | Path, flag: str
) -> None:
    """An adapter trained on a random-init base: ``vit``'s frozen tensors must be that base's."""
    want = base.get("frozen_sha256")
    if want is None or frozen_fingerprint(vit, set(tensors)) == want:
        return
    seed = base.get("seed")
    todo = (
        "use the run's export/vit_merged.safetensors as --model.weights instead (it holds the whole model)"
        if flag.startswith("--")
        else f"pass the seed it was built under ({f'seed={seed}, the run' if seed is not None else 'the run'}'s "
        "train.seed; the same torch and timm versions) or weights= a file holding it"
    )
    raise UserError(
        f"{flag} '{path}' was trained on a random-init base{f' (seed {seed})' if seed is not None else ''}"
        f" and this model's frozen weights are not that base; {todo}"
    )


def _load_tensors(
    vit: VisionTransformer,
    tensors: dict[str, torch.Tensor],
    path: str | Path,
    flag: str,
    required: set[str] | None = None,
) -> None:
    own = vit.state_dict()
    unexpected = [k for k in tensors if k not in own]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted((required or set()) - set(tensors))
    if unexpected or mismatched or missing:
        parts = [
            f"{len(x)} {what} {x[:6]}"
            for what, x in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
            if x
        ]
        raise UserError(
            f"{flag} '{path}' does not fit the model: "
            + "; ".join(parts)
            + ". Build the base with the adapter's model settings (--model.*)"
        )
    vit.load_state_dict(tensors, strict=False)


def load_adapter(
    vit: VisionTransformer, path: str | Path, check_base: bool = True, flag: str = "--model.adapter"
) -> dict:
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


def rebuild_config(path: str | Path, weights: str | None = None, seed: int | None = None) -> dict:
    """The recorded model config (as a dict) to rebuild an adapter's base under: no adapter,
    ``weights`` when given. An adapter trained on a random-init base with neither a seed nor a base
    file is refused: building a fresh random base would silently give another model."""
    _, meta = read_adapter(path, "build_from_adapter")
    base = meta["base"]
    model = dict(meta["model"])
    model["adapter"] = ""
    if weights is not None:
        model["weights"] = weights
    if not model.get("weights") and seed is None and base.get("frozen_sha256", "") != _NOTHING_FROZEN:
        hint = f"seed={base['seed']} (the run's train.seed)" if base.get("seed") is not None else "seed=<train.seed>"
        raise UserError(
            f"build_from_adapter: '{path}' was trained on a random-init base, which the file does not "
            f"hold; pass {hint} to rebuild that base, or weights= a file holding it"
        )
    if seed is not None and base.get("frozen_sha256") is None:
        log.warning("%s records no base fingerprint: the base rebuilt with seed %d cannot be verified", path, seed)
    return model


def merge_adapter_file(vit: VisionTransformer, path: str | Path, info: BaseInfo, flag: str = "--model.adapter") -> None:
    """Fold an adapter file into ``vit``'s weights (no recipe left afterwards): ``cfg.adapter``."""
    tensors, meta = read_adapter(path, flag)
    _check_base(info, meta["base"], path, flag)
    _check_frozen(vit, tensors, meta["base"], path, flag)
    recipe = meta["recipe"]
    unfrozen = set(recipe.get("unfrozen_block_indices", []))
    if recipe.get("lora_targets"):
        add_lora(
            vit,
            [i for i in range(len(vit.blocks)) if i not in unfrozen],
            recipe["lora_targets"],
            int(recipe["lora_rank"]),
            float(recipe["lora_alpha"]),
        )
    if "mask_token" in tensors and not isinstance(getattr(vit, "mask_token", None), torch.Tensor):
        vit.mask_token = nn.Parameter(torch.zeros_like(tensors["mask_token"]))
    _load_tensors(vit, tensors, path, flag)
    unwrap_lora(vit)
    if isinstance(vit.patch_embed, GroupChannelPatchEmbed):
        vit.patch_embed.fresh = False
    log.info("merged adapter %s into the base", path)
