"""Build the configured self-supervised objective around an (ExPLoRA-prepared) ViT."""

from __future__ import annotations

import logging

from timm.models.vision_transformer import VisionTransformer

from engine.config import ObjectiveConfig, RunConfig
from engine.errors import UserError
from engine.model.layer_decay import LayerDecay
from engine.objectives.centering import AllReduce
from engine.objectives.dino import DinoObjective
from engine.objectives.mae import MAEObjective
from engine.objectives.objective import Objective

log = logging.getLogger(__name__)


def build_objective(
    cfg: RunConfig | ObjectiveConfig,
    vit: VisionTransformer,
    total_steps: int,
    all_reduce: AllReduce | None = None,
    decoder_state: dict | None = None,
) -> Objective:
    """DinoObjective or MAEObjective per ``objective.name``.

    cfg: the run config (then crops.num_global sets the global crops per image, model.band_groups
    the MAE band groups when the patch embed has none, optim.layerwise_decay/patch_embed_lr_mult the
    encoder's lr multipliers and explora.train_norms the LoRA'd MAE decoder's norms) or its
    objective section (2 global crops, no layer decay). vit: the model with the ExPLoRA recipe
    applied. total_steps: optimizer steps of the run (EMA momentum schedule). all_reduce: in-place
    sum over ranks, from ``engine.trainer.collectives.all_reduce_sum`` (identity when None).
    decoder_state: the MAE checkpoint's state dict, whose decoder is loaded when present.
    """
    run = cfg if isinstance(cfg, RunConfig) else None
    obj = cfg.objective if isinstance(cfg, RunConfig) else cfg
    decay = LayerDecay(run.optim.layerwise_decay, run.optim.patch_embed_lr_mult) if run is not None else LayerDecay()
    if total_steps <= 0:
        raise UserError(f"--train.max_steps: must be > 0 to schedule the objective, got {total_steps}")
    if obj.name == "dino":
        n_global = run.crops.num_global if run is not None else 2
        if n_global < 2 and (run is None or run.crops.num_local == 0):
            raise UserError("--crops.num_global: DINO needs 2+ global crops or some local crops (--crops.num_local)")
        if decoder_state is not None:
            log.info("objective 'dino' ignores the MAE decoder state")
        return DinoObjective(
            vit, obj.dino, total_steps, n_global_crops=n_global, all_reduce=all_reduce, layer_decay=decay
        )
    if obj.name == "mae":
        groups = None
        if run is not None and getattr(vit.patch_embed, "band_groups", None) is None:
            groups = run.model.band_groups
        return MAEObjective(
            vit,
            obj.mae,
            decoder_state=decoder_state,
            band_groups=groups,
            train_norms=run.explora.train_norms if run is not None else True,
            layer_decay=decay,
        )
    raise UserError(f"--objective.name: unknown objective {obj.name!r}; use 'dino' or 'mae'")
