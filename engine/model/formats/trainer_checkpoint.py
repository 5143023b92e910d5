"""geoexplora trainer checkpoint directories as base weights: ``step_XXXXXXXX/`` with ``meta.json`` +
DeepSpeed's ``mp_rank_00_model_states.pt`` (``{"module": {"vit.*", "decoder.*", heads}}``).

The ViT is taken from our objectives' ``vit.`` prefix (the MAE objective's decoder, official MAE
names under ``decoder.``, comes along: :func:`take_objective_vit`). Its LoRA tensors are merged into
the base with the recipe recorded in ``meta.json`` (:func:`load_merging_lora`). A ZeRO-3
checkpoint (weights split over the ranks) is refused with the way out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer

from engine.config import ExploraConfig
from engine.errors import UserError
from engine.model.explora import add_lora
from engine.model.lora import unwrap_lora
from engine.model.state_fit import strict_load
from engine.model.tensor_files import StateDict, torch_load

DS_MODEL_STATES = "mp_rank_00_model_states.pt"
OBJECTIVE_PREFIX = "vit."


def read_checkpoint_dir(p: Path, flag: str) -> tuple[Any, dict]:
    """(DeepSpeed model states, ``{"geoexplora_meta": meta.json}``) of a checkpoint directory."""
    meta_file, states = p / "meta.json", p / DS_MODEL_STATES
    if meta_file.is_file() and not states.is_file() and any(p.glob("zero_pp_rank_*_model_states.pt")):
        raise UserError(
            f"{flag} '{p}' is a DeepSpeed ZeRO-3 checkpoint (the weights are split over the "
            f"ranks). Consolidate it with {p.parent / 'zero_to_fp32.py'}, or use the run's export/ files"
        )
    if not meta_file.is_file() or not states.is_file():
        raise UserError(
            f"{flag} '{p}' is a directory but not a geoexplora checkpoint (needs meta.json and {DS_MODEL_STATES})"
        )
    return torch_load(states, flag, trusted=True), {"geoexplora_meta": json.loads(meta_file.read_text())}


def take_objective_vit(sd: StateDict) -> StateDict | None:
    """The ViT inside our objectives' state (``vit.*``), or None when there is none.

    The MAE objective keeps its decoder (official MAE names) beside the encoder: ``decoder.decoder_*``
    become ``decoder_*`` and ``decoder.mask_token`` the MAE layout's ``mask_token`` (overriding an
    encoder's DINOv2 mask token, which the MAE objective does not use).
    """
    if not any(k.startswith(OBJECTIVE_PREFIX) for k in sd):
        return None
    inner = {k[len(OBJECTIVE_PREFIX) :]: v for k, v in sd.items() if k.startswith(OBJECTIVE_PREFIX)}
    inner.update(
        {
            k[len("decoder.") :]: v
            for k, v in sd.items()
            if k.startswith("decoder.decoder_") or k == "decoder.mask_token"
        }
    )
    return inner


def has_lora(sd: StateDict) -> bool:
    """The state still holds LoRA A/B (a trainer checkpoint, not an export)."""
    return any(k.endswith(".lora_a") for k in sd)


def load_merging_lora(vit: VisionTransformer, sd: StateDict, meta: dict, flag: str, path: str) -> None:
    """Wrap the layers the checkpoint's LoRA tensors belong to (recipe from ``meta.json``), load
    strictly, merge, unwrap: ``vit`` ends with timm's modules holding the merged weights."""
    rec = ((meta.get("geoexplora_meta") or {}).get("config") or {}).get("explora")
    if not isinstance(rec, dict):
        raise UserError(
            f"{flag} '{path}': holds LoRA tensors but no recipe (meta.json config.explora); "
            "use the run's export/ files instead"
        )
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.endswith(".lora_a")})
    defaults = ExploraConfig()  # a recipe written before a field existed has that field's default
    rank = int(rec.get("lora_rank", defaults.lora_rank))
    add_lora(vit, blocks, rec.get("lora_targets", defaults.lora_targets), rank, float(rec.get("lora_alpha", rank)))
    strict_load(vit, sd, flag, path)
    unwrap_lora(vit)
