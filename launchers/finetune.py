"""Supervised fine-tuning: base ViT (+ optional ExPLoRA adapter, merged at build) -> LoRA (or full)
fine-tune with a linear head; top-1/top-5 on the val split every epoch; the best one kept.

    deepspeed --num_gpus 8 $(which geoexplora-finetune) --config finetune_vitl14_fmow_rgb \\
        --model.weights dinov2_vitl14.pth --model.adapter runs/vitl_fmow/export/teacher_adapter.safetensors \\
        --data.shards /data/fmow/shards --train.output_dir runs/vitl_fmow_ft
    deepspeed --num_gpus 8 --module launchers.finetune --config ...   # the same, by module name
    torchrun --nproc_per_node 8 -m launchers.finetune --config ...
    geoexplora-finetune --config finetune_tiny_cpu --data.shards runs/demo/shards/target

``--data.shards`` holds one sub-directory per split (``train/``, ``val/``; names in
``--finetune.train_split`` / ``--finetune.val_split``). Any config field is an override (``--help``
lists them all): ``--finetune.mode full``, ``--finetune.mixup 0.8 --finetune.cutmix 1.0``,
``--finetune.layer_decay 0.65``, ``--zero.stage 2``, ``--train.resume auto``. The run directory
receives the trainer's files (config.yaml, run.json, metrics.jsonl, checkpoints/) plus
``best/classifier.safetensors`` (trainable tensors of the best validation) and ``results.json``.
Exit codes: 0 done, 143 (SIGTERM) / 130 (SIGINT) stopped after saving a checkpoint (rerun to resume),
1 halted on NaN/inf, 2 bad config/path or a run directory that cannot be written.
"""
from __future__ import annotations

from typing import Optional, Sequence

from engine.eval.config import FinetuneRunConfig
from engine.errors import UserError, cli_entry
from engine.trainer.launch import exit_fast, run_cli


def check_inputs(cfg: FinetuneRunConfig) -> None:
    from engine.data import resolve_shards
    from engine.eval.finetune import check_splits
    from engine.model.vit import resolve_arch
    from engine.trainer.ds_user_config import check_user_config

    resolve_arch(cfg.model.name)
    check_splits(cfg)
    for split in (cfg.finetune.train_split, cfg.finetune.val_split):
        resolve_shards(f"{cfg.data.shards}/{split}", "")
    if cfg.train.max_steps <= 0:
        raise UserError("--train.max_steps: must be > 0")
    check_user_config(cfg)  # --deepspeed.config FILE


def run(cfg: FinetuneRunConfig, env) -> int:
    from engine.eval.finetune import run_finetune
    from engine.trainer.preemption import stop_exit_code

    return stop_exit_code(run_finetune(cfg, env)["preempted"])


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(FinetuneRunConfig, argv, run, check_inputs, __doc__)


def console() -> None:
    """``geoexplora-finetune``: :func:`main`, then a fast exit."""
    exit_fast(main())


if __name__ == "__main__":
    console()
