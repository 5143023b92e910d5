"""ExPLoRA extended pre-training: config -> ViT + recipe -> objective -> data -> Trainer.fit -> export.

    deepspeed --num_gpus 8 launchers/pretrain.py --config configs/explora_dinov2_vitl14_fmow_rgb.yaml \\
        --data.shards /data/fmow/shards --train.output_dir runs/vitl_fmow
    torchrun --nproc_per_node 8 launchers/pretrain.py --config ...
    python launchers/pretrain.py --config configs/tiny_cpu.yaml --data.shards /tmp/synthetic
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/pretrain.py --config configs/tiny_cpu.yaml ...

Any config field is an override: ``--train.max_steps 100``, ``--zero.stage 3``,
``--train.resume auto|none|PATH``. The run directory ``train.output_dir`` receives config.yaml,
run.json, metrics.jsonl, tb/, checkpoints/ and export/. Exit codes: 0 done, 0 preempted (a
checkpoint was saved; rerun the same command to resume), 1 halted on NaN/inf, 2 bad config/path.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from engine.atomic import atomic_write_text
from engine.config import RunConfig, save_config
from engine.errors import UserError, cli_entry
from engine.trainer.launch import exit_fast, run_cli

log = logging.getLogger("geoexplora.pretrain")


def check_inputs(cfg: RunConfig) -> None:
    """Fail fast, before any process group: unknown model, missing shards, unwritable run dir."""
    from engine.data import resolve_shards
    from engine.model.vit import resolve_arch

    resolve_arch(cfg.model.name)
    if not cfg.data.shards:
        raise UserError("--data.shards: not set; give the shard directory written by geoexplora-convert")
    resolve_shards(cfg.data.shards, cfg.data.manifest)
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--train.output_dir '{out}' exists and is not a directory")


def run(cfg: RunConfig, env) -> int:
    from engine.data import build_pretrain_loader, to_device
    from engine.model.explora import apply_explora
    from engine.model.tokens import num_groups
    from engine.model.vit import build_vit, mae_decoder_state
    from engine.objectives import build_objective
    from engine.trainer.collectives import all_reduce_sum
    from engine.trainer.export import export_run
    from engine.trainer.flops import training_flops_per_sample
    from engine.trainer.loop import Trainer
    from engine.trainer.provenance import run_info
    from engine.trainer.rng import seed_all

    out = Path(cfg.train.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        atomic_write_text(out / "run.json", json.dumps(run_info(env.world_size), indent=1))
    seed_all(cfg.train.seed)  # identical initial weights on every rank
    vit = build_vit(cfg.model)
    apply_explora(vit, cfg.explora)
    decoder = mae_decoder_state(vit) if cfg.objective.name == "mae" else None
    objective = build_objective(cfg, vit, total_steps=cfg.train.max_steps, all_reduce=all_reduce_sum,
                                decoder_state=decoder)
    loader = build_pretrain_loader(cfg.data, cfg.crops, cfg.objective.name, patch_size=vit.patch_embed.patch_size[0],
                                   num_groups=num_groups(vit), mask_cfg=cfg.objective.dino, rank=env.rank,
                                   world_size=env.world_size, seed=cfg.train.seed)
    trainer = Trainer(cfg, objective, loader, env,
                      prepare=lambda b: to_device(b, env.device, loader.normalizer, loader.photometric),
                      flops_per_image=training_flops_per_sample(cfg, vit))
    result = trainer.fit()
    if result.preempted is None and cfg.train.export:
        export_run(vit, objective, cfg, env.is_main)
    return 0


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(RunConfig, argv, run, check_inputs, __doc__)


if __name__ == "__main__":
    exit_fast(main())
