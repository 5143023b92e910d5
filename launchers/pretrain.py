"""ExPLoRA extended pre-training: config -> ViT + recipe -> objective -> data -> Trainer.fit -> export.

    deepspeed launchers/pretrain.py --num_gpus 8 --config configs/explora_dinov2_vitl14_fmow_rgb.yaml \\
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

import gc
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from engine.atomic import atomic_write_text
from engine.config import RunConfig, load_config, save_config
from engine.errors import UserError, cli_entry
from engine.progress import setup_logging

log = logging.getLogger("geoexplora.pretrain")


def split_config_arg(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """``[--config PATH] [--a.b v ...]`` -> (PATH, overrides)."""
    rest, path = [], None
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config: needs a YAML preset path (see configs/)")
            path = argv[i + 1]
            next(it)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        else:
            rest.append(a)
    return path, rest


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
    trainer = Trainer(cfg, objective, loader, env, prepare=lambda b: to_device(b, env.device, loader.normalizer),
                      flops_per_image=training_flops_per_sample(cfg, vit))
    result = trainer.fit()
    if result.preempted is None and cfg.train.export:
        export_run(vit, objective, cfg, env.is_main)
    return 0


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    from engine.trainer.loop import NonFiniteLoss
    from engine.trainer.process_group import init_distributed, launcher_rank, shutdown, strip_launcher_args

    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    rank = launcher_rank()
    setup_logging(rank)
    try:
        path, overrides = split_config_arg(argv)
        cfg = load_config(RunConfig, path, overrides)
        check_inputs(cfg)
    except UserError:
        if rank != 0:  # every rank found the same problem; rank 0 prints it
            sys.exit(2)
        raise
    env = init_distributed()
    setup_logging(env.rank)
    try:
        return run(cfg, env)
    except NonFiniteLoss as e:
        log.error("%s", e)
        return 1
    finally:
        shutdown()


if __name__ == "__main__":
    code = main()
    # Everything is written and closed. Interpreter shutdown would now run full garbage-collection
    # passes over the millions of objects torch/deepspeed (inductor, sympy) import: 4-7 s per rank,
    # measured. Frozen objects are skipped by those passes; refcounted cleanup still happens.
    gc.freeze()
    sys.exit(code)
