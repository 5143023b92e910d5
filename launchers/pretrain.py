"""ExPLoRA extended pre-training: config -> ViT + recipe -> objective -> data -> Trainer.fit -> export.

    deepspeed --num_gpus 8 $(which geoexplora-pretrain) --config explora_dinov2_vitl14_fmow_rgb \\
        --data.shards /data/fmow/shards --train.output_dir runs/vitl_fmow
    deepspeed --num_gpus 8 --module launchers.pretrain --config ...   # the same, by module name
    torchrun --nproc_per_node 8 -m launchers.pretrain --config ...
    geoexplora-pretrain --config tiny_cpu --data.shards /tmp/synthetic   # one process: CPU or one GPU
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/pretrain.py --config tiny_cpu ...   # in a checkout

Any config field is an override (``--help`` lists them all): ``--train.max_steps 100``,
``--zero.stage 3``, ``--train.resume auto|none|PATH``; ``--print-config`` shows the resolved config.
The run directory ``train.output_dir`` receives config.yaml, run.json, metrics.jsonl, tb/, checkpoints/
and export/. Exit codes: 0 done, 143 (SIGTERM) / 130 (SIGINT) stopped after saving a checkpoint (rerun
the same command to resume), 1 halted on NaN/inf, 2 bad config/path or a run directory that cannot be
written.

``--preflight`` (``--preflight=N``: N samples per rank) builds everything at real size, runs one
synthetic forward + backward + optimizer step per rank, prints the trainable/frozen split, peak
memory per rank and FLOPs per image, and exits (0 ok, 1 non-finite loss or a frozen tensor moved);
no shards are read (engine/trainer/preflight.py).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.config import RunConfig, save_config
from engine.errors import UserError, cli_entry
from engine.trainer.launch import check_output_dir, exit_fast, run_cli, take_preflight_flag

log = logging.getLogger("geoexplora.pretrain")


def check_inputs(cfg: RunConfig) -> None:
    """Fail fast, before any process group: missing weight/adapter file, unknown model, missing
    shards, unwritable run dir."""
    from engine.data import resolve_shards
    from engine.model.architecture import resolve_arch
    from engine.trainer.ds_user_config import check_user_config

    cfg.model.check_files()
    resolve_arch(cfg.model.name)
    if not cfg.data.shards:
        raise UserError("--data.shards: not set; give the shard directory written by geoexplora-convert")
    resolve_shards(cfg.data.shards, cfg.data.manifest)
    check_user_config(cfg)  # --deepspeed.config FILE
    check_output_dir(cfg)


def check_preflight(cfg: RunConfig) -> None:
    """A preflight needs the model's files and a known model; shards are optional (no data is read)."""
    from engine.model.architecture import resolve_arch

    cfg.model.check_files()
    resolve_arch(cfg.model.name)


def build(cfg: RunConfig):
    """(vit, objective) of ``cfg`` on CPU: weights, recipe, objective (with the MAE decoder of the
    weight file), identical initial weights on every rank."""
    from engine.model.explora import apply_explora
    from engine.model.formats.mae import mae_decoder_state
    from engine.model.vit import build_vit
    from engine.objectives import build_objective
    from engine.trainer.collectives import all_reduce_sum
    from engine.trainer.rng import seed_all

    seed_all(cfg.train.seed)
    vit = build_vit(cfg.model)
    apply_explora(vit, cfg.explora)
    decoder = mae_decoder_state(vit) if cfg.objective.name == "mae" else None
    objective = build_objective(
        cfg, vit, total_steps=cfg.train.max_steps, all_reduce=all_reduce_sum, decoder_state=decoder
    )
    return vit, objective


def preflight(cfg: RunConfig, env, samples: int) -> int:
    """One real-size step of ``cfg`` on synthetic batches (see engine/trainer/preflight.py)."""
    import time

    from engine.model.explora import param_report
    from engine.model.tokens import num_groups
    from engine.trainer.flops import training_flops_per_sample
    from engine.trainer.preflight import finish, pretrain_batch, run_step

    t0 = time.perf_counter()
    vit, objective = build(cfg)
    batch = pretrain_batch(
        cfg,
        cfg.objective.name,
        vit.patch_embed.patch_size[0],
        num_groups(vit),
        samples,
        env.device,
        seed=cfg.train.seed + env.rank,
    )
    report = run_step(
        cfg, env, objective, batch, training_flops_per_sample(cfg, vit), time.perf_counter() - t0, samples
    )
    title = (
        f"{cfg.model.name} ({cfg.model.weights or 'random init'}), objective {cfg.objective.name}, "
        f"ZeRO-{cfg.zero.stage}, {cfg.train.precision}"
    )
    return finish(report, env.is_main, title, "ViT only:\n" + param_report(vit).table())


def run(cfg: RunConfig, env) -> int:
    from engine.data import build_pretrain_loader, to_device
    from engine.model.tokens import num_groups
    from engine.trainer.export import export_run
    from engine.trainer.flops import training_flops_per_sample
    from engine.trainer.loop import Trainer
    from engine.trainer.provenance import write_run_json

    out = Path(cfg.train.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        write_run_json(out, env.world_size)
    vit, objective = build(cfg)
    loader = build_pretrain_loader(
        cfg.data,
        cfg.crops,
        cfg.objective.name,
        patch_size=vit.patch_embed.patch_size[0],
        num_groups=num_groups(vit),
        mask_cfg=cfg.objective.dino,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.train.seed,
    )
    trainer = Trainer(
        cfg,
        objective,
        loader,
        env,
        prepare=lambda b: to_device(b, env.device, loader.normalizer, loader.photometric),
        flops_per_image=training_flops_per_sample(cfg, vit),
    )
    result = trainer.fit()
    if result.preempted is None and cfg.train.export:
        export_run(vit, objective, cfg, env.is_main)
    return result.exit_code


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    argv, samples = take_preflight_flag(sys.argv[1:] if argv is None else argv)
    if samples:
        return run_cli(RunConfig, argv, lambda cfg, env: preflight(cfg, env, samples), check_preflight, __doc__)
    return run_cli(RunConfig, argv, run, check_inputs, __doc__)


def console() -> None:
    """``geoexplora-pretrain``: :func:`main`, then a fast exit."""
    exit_fast(main())


if __name__ == "__main__":
    console()
