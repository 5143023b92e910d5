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

``--preflight`` (``--preflight=N``: N samples per rank) builds the classifier at real size, runs one
synthetic step per rank and reports parameters, peak memory and FLOPs per image
(engine/trainer/preflight.py); no shards are read. The head is sized from ``--data.classes``, else
from the train split's manifest when ``--data.shards`` is given, else for 1000 classes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engine.errors import UserError, cli_entry
from engine.eval.config import FinetuneRunConfig
from engine.trainer.launch import check_output_dir, exit_fast, run_cli, take_preflight_flag


def check_inputs(cfg: FinetuneRunConfig) -> None:
    from engine.data import resolve_shards
    from engine.eval.finetune import check_splits
    from engine.model.architecture import resolve_arch
    from engine.trainer.ds_user_config import check_user_config

    cfg.model.check_files()
    resolve_arch(cfg.model.name)
    check_splits(cfg)
    for split in (cfg.finetune.train_split, cfg.finetune.val_split):
        resolve_shards(f"{cfg.data.shards}/{split}", "")
    if cfg.train.max_steps <= 0:
        raise UserError("--train.max_steps: must be > 0")
    check_user_config(cfg)  # --deepspeed.config FILE
    check_output_dir(cfg)


def _classes(cfg: FinetuneRunConfig) -> tuple[int, bool, str]:
    """(number of classes, multilabel, where they came from) for the preflight's head."""
    import json
    from pathlib import Path

    if cfg.data.classes:
        return len(cfg.data.classes), False, "--data.classes"
    manifest = Path(cfg.data.shards) / cfg.finetune.train_split / "manifest.json" if cfg.data.shards else None
    if manifest is not None and manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("classes"):
            return len(m["classes"]), bool(m.get("multilabel", False)), str(manifest)
    return 1000, False, "no class list given (--data.classes or --data.shards)"


def preflight(cfg: FinetuneRunConfig, env, samples: int) -> int:
    """One real-size fine-tuning step on a synthetic batch (see engine/trainer/preflight.py)."""
    import logging
    import time

    from engine.eval.classifier import build_classifier
    from engine.trainer.flops import classifier_flops_per_sample
    from engine.trainer.preflight import classifier_batch, finish, run_step
    from engine.trainer.rng import seed_all

    t0 = time.perf_counter()
    n_classes, multilabel, source = _classes(cfg)
    if (cfg.finetune.mixup > 0 or cfg.finetune.cutmix > 0) and samples % 2:
        samples += 1
        logging.getLogger("geoexplora.finetune").info("mixup/cutmix pair samples: preflight uses %d", samples)
    seed_all(cfg.train.seed)
    model, report = build_classifier(cfg, n_classes, multilabel)
    batch = classifier_batch(cfg, n_classes, multilabel, samples, env.device, seed=cfg.train.seed + env.rank)
    step = run_step(
        cfg,
        env,
        model,
        batch,
        classifier_flops_per_sample(model.vit, cfg.model.img_size),
        time.perf_counter() - t0,
        samples,
    )
    title = (
        f"fine-tune {cfg.finetune.mode}: {cfg.model.name} ({cfg.model.weights or 'random init'}), "
        f"{n_classes} classes ({source}), ZeRO-{cfg.zero.stage}, {cfg.train.precision}"
    )
    return finish(step, env.is_main, title, "backbone only:\n" + report.table())


def run(cfg: FinetuneRunConfig, env) -> int:
    from engine.eval.finetune import run_finetune
    from engine.trainer.preemption import stop_exit_code

    return stop_exit_code(run_finetune(cfg, env)["preempted"])


def check_preflight(cfg: FinetuneRunConfig) -> None:
    from engine.model.architecture import resolve_arch

    cfg.model.check_files()
    resolve_arch(cfg.model.name)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    argv, samples = take_preflight_flag(sys.argv[1:] if argv is None else argv)
    if samples:
        return run_cli(FinetuneRunConfig, argv, lambda cfg, env: preflight(cfg, env, samples), check_preflight, __doc__)
    return run_cli(FinetuneRunConfig, argv, run, check_inputs, __doc__)


def console() -> None:
    """``geoexplora-finetune``: :func:`main`, then a fast exit."""
    exit_fast(main())


if __name__ == "__main__":
    console()
