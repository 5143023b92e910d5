"""Training-step benchmark: steps/s and images/s of the tiny and a small-image ViT-B DINOv2 config
under ZeRO-0 / 2 / 3 with N ranks, plus ExPLoRA vs full fine-tuning memory for ViT-B/L.

    python -m launchers.bench.train                       # CPU: 2 ranks, DS_ACCELERATOR=cpu
    python -m launchers.bench.train --configs tiny --stages 0,3 --steps 8 --out bench.json
    python -m launchers.bench.train --nproc 8             # on an 8-GPU node
    python -m launchers.bench.train --configs vitl --stages 2 --nproc 1 --steps 20 --warmup 3  # one GPU

Each (config, stage) is one ``deepspeed --num_gpus N`` run of the real Trainer (DeepSpeed engine,
objective, schedules, metrics) on synthetic in-memory batches, so the figures are the training
step alone, without decoding. The first ``--warmup`` steps are excluded. Memory: parameters counted
on the meta device; bytes = fp32 trainable weights, fp32 gradients, AdamW moments (2 x fp32) per
trainable parameter, plus the per-rank share of the moments under ZeRO-1/2/3 with ``--zero-ranks``
ranks. Prints two tables and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from engine.errors import cli_entry
from launchers.bench import harness
from launchers.bench.harness import Column

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "engine" / "presets" / "tiny_cpu.yaml"

# Bench configs as overrides of the tiny preset. 'vitb': ViT-B/14 at a small image size so a CPU
# step takes seconds, with a smaller DINO head so the backbone dominates the step.
CONFIGS = {
    "tiny": [],
    "vitb": [
        "--model.name",
        "vit_base_patch14_dinov2",
        "--model.img_size",
        "56",
        "--data.batch_size",
        "4",
        "--explora.lora_rank",
        "64",
        "--explora.lora_alpha",
        "64",
        "--objective.dino.head_n_prototypes",
        "4096",
        "--objective.dino.head_hidden_dim",
        "1024",
        "--objective.dino.head_bottleneck_dim",
        "256",
    ],
    # The ExPLoRA DINOv2 ViT-L/14 recipe at real size (engine/presets/explora_dinov2_vitl14_fmow_rgb.yaml):
    # batch 32 per GPU, 2 x 224 px global + 8 x 98 px local crops (98 = 7 patches of 14), LoRA r=64
    # on q,v, the 65536-prototype DINO/iBOT head; random init (throughput needs no weights).
    "vitl": [
        "--model.name",
        "vit_large_patch14_dinov2",
        "--model.img_size",
        "224",
        "--data.batch_size",
        "32",
        "--crops.global_size",
        "224",
        "--crops.local_size",
        "98",
        "--crops.num_global",
        "2",
        "--crops.num_local",
        "8",
        "--explora.lora_rank",
        "64",
        "--explora.lora_alpha",
        "64",
        "--objective.dino.head_n_prototypes",
        "65536",
        "--objective.dino.head_hidden_dim",
        "2048",
        "--objective.dino.head_bottleneck_dim",
        "256",
    ],
}


# --------------------------------------------------------------------------------------------
# Worker: one (config, stage) under deepspeed
# --------------------------------------------------------------------------------------------
class SyntheticBatches:
    """Endless DINO batches of uint8 crops + iBOT masks shaped like engine/data's (no decoding)."""

    def __init__(self, cfg, patch: int, seed: int):
        import torch

        self.cfg, self.patch, self.pos = cfg, patch, 0
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        import torch

        c, b = self.cfg.crops, self.cfg.data.batch_size
        grid = (c.global_size // self.patch) ** 2
        while True:
            self.pos += 1
            batch = {
                "global_crops": torch.randint(
                    0, 256, (c.num_global * b, 3, c.global_size, c.global_size), dtype=torch.uint8, generator=self.gen
                ),
                "masks": torch.rand(c.num_global * b, grid, generator=self.gen) < 0.3,
            }
            if c.num_local:
                batch["local_crops"] = torch.randint(
                    0, 256, (c.num_local * b, 3, c.local_size, c.local_size), dtype=torch.uint8, generator=self.gen
                )
            yield batch

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


def _optimizer_state_bytes(engine) -> int:
    """Bytes of AdamW moments held by this rank (ZeRO partitions them; frozen tensors have none)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    total = 0
    for state in inner.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel") and v.dim() > 0)
    return total


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from engine.config import RunConfig, load_config
    from engine.model.explora import apply_explora
    from engine.model.vit import build_vit
    from engine.objectives import build_objective
    from engine.progress import setup_logging
    from engine.trainer.collectives import all_reduce_sum
    from engine.trainer.flops import training_flops_per_sample
    from engine.trainer.loop import Trainer
    from engine.trainer.metrics import read_metrics
    from engine.trainer.process_group import init_distributed, shutdown
    from engine.trainer.rng import seed_all

    env = init_distributed()
    setup_logging(env.rank)
    run_dir = Path(args.run_dir)
    overrides = CONFIGS[args.config] + [
        "--zero.stage",
        str(args.stage),
        "--train.max_steps",
        str(args.warmup + args.steps),
        "--train.output_dir",
        str(run_dir),
        "--train.resume",
        "none",
        "--train.log_every",
        "1",
        "--train.save_every",
        "0",
        "--train.export",
        "false",
        "--train.logger",
        "",
        "--train.precision",
        "bf16" if env.device.type == "cuda" else "fp32",
        "--data.shards",
        "synthetic",
    ]
    cfg = load_config(RunConfig, str(TINY), overrides)
    seed_all(cfg.train.seed)
    vit = build_vit(cfg.model)
    apply_explora(vit, cfg.explora)
    objective = build_objective(cfg, vit, total_steps=cfg.train.max_steps, all_reduce=all_reduce_sum)
    batches = SyntheticBatches(cfg, vit.patch_embed.patch_size[0], seed=env.rank)

    def prepare(b: dict) -> dict:
        out = {k: v.to(env.device, non_blocking=True) for k, v in b.items()}
        for k in ("global_crops", "local_crops"):
            if k in out:
                out[k] = (out[k].float() / 255.0 - 0.45) / 0.25
        return out

    trainer = Trainer(
        cfg, objective, batches, env, prepare=prepare, flops_per_image=training_flops_per_sample(cfg, vit)
    )
    trainer.fit()
    report = trainer.report
    assert report is not None  # fit() built the engine and its optimizer report
    opt_bytes = torch.tensor([float(_optimizer_state_bytes(trainer.engine))], dtype=torch.float64, device=env.device)
    per_rank = [torch.zeros_like(opt_bytes) for _ in range(env.world_size)]
    dist.all_gather(per_rank, opt_bytes)
    if env.is_main:
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > args.warmup]
        step_s = sum(r["step_time_s"] for r in rows) / len(rows)
        result = {
            "config": args.config,
            "stage": args.stage,
            "ranks": env.world_size,
            "device": str(env.device.type),
            "global_batch": trainer.global_batch,
            "timed_steps": len(rows),
            "steps_per_s": 1.0 / step_s,
            "images_per_s": trainer.global_batch / step_s,
            "images_per_s_per_device": trainer.global_batch / step_s / env.world_size,
            "data_wait_frac": sum(r["data_wait_frac"] for r in rows) / len(rows),
            "peak_mem_gb": max(r["peak_mem_gb"] for r in rows),
            "optimizer_state_bytes_per_rank": [int(t.item()) for t in per_rank],
            "trainable_params": report.trainable_numel,
            "frozen_params": report.frozen_numel,
            "mfu": rows[-1].get("mfu"),
        }
        (run_dir / "bench.json").write_text(json.dumps(result))
    shutdown(clean=True)
    return 0


# --------------------------------------------------------------------------------------------
# Memory: ExPLoRA vs full fine-tuning (meta device)
# --------------------------------------------------------------------------------------------
def memory_rows(models: Sequence[str], zero_ranks: int) -> list[dict]:
    """Per model and regime: trainable/frozen params and the training-state bytes they imply."""
    from engine.config import ExploraConfig, ModelConfig
    from engine.model.explora import apply_explora
    from engine.model.vit import build_vit

    logging.getLogger("engine.model").setLevel(logging.WARNING)  # no recipe table per model
    rows = []
    for name in models:
        for regime in ("explora", "full"):
            vit = build_vit(ModelConfig(name=name), device="meta")
            if regime == "explora":
                apply_explora(vit, ExploraConfig())  # the default recipe: block -1, LoRA r=64 on q,v, norms
            else:
                vit.requires_grad_(True)
            trainable = sum(p.numel() for p in vit.parameters() if p.requires_grad)
            total = sum(p.numel() for p in vit.parameters())
            adam = 8 * trainable
            rows.append(
                {
                    "model": name,
                    "regime": regime,
                    "trainable_params": trainable,
                    "frozen_params": total - trainable,
                    "trainable_bytes": 4 * trainable,
                    "grad_bytes": 4 * trainable,
                    "optimizer_state_bytes": adam,
                    "training_state_bytes": 4 * total + 4 * trainable + adam,
                    f"optimizer_state_bytes_per_rank_zero1+_{zero_ranks}": adam // zero_ranks,
                }
            )
    return rows


# --------------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------------
def run_one(config: str, stage: int, args: argparse.Namespace, tmp: Path) -> dict:
    from engine.trainer.process_group import free_port

    run_dir = tmp / f"{config}_z{stage}"
    # the runner as a module: works where deepspeed was installed without its console script beside python
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(args.nproc),
        "--master_port",
        str(free_port()),
        "--module",
        "launchers.bench.train",
        "--worker",
        "--config",
        config,
        "--stage",
        str(stage),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--run-dir",
        str(run_dir),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (run_dir / "bench.json").is_file():
        raise SystemExit(
            f"{config} ZeRO-{stage} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result = json.loads((run_dir / "bench.json").read_text())
    result["launch_wall_s"] = time.perf_counter() - t0
    return result


def _gib(title: str, key: str) -> Column:
    return Column(title, lambda r: r[key] / 2**30, "{:.3f}")


RUN_COLUMNS = [
    Column("config", "config", left=True),
    Column("ZeRO", "stage"),
    Column("gbatch", "global_batch"),
    Column("steps/s", "steps_per_s", "{:.3f}"),
    Column("img/s", "images_per_s", "{:.1f}"),
    Column("img/s/dev", "images_per_s_per_device", "{:.1f}"),
    Column("vs Z0", "ratio_vs_zero0", "{:.2f}"),
    Column("data%", lambda r: 100 * r["data_wait_frac"], "{:.1f}%"),
    Column("optim MiB/rank", lambda r: max(r["optimizer_state_bytes_per_rank"]) / 2**20, "{:.3f}"),
]


def memory_columns(zero_ranks: int) -> list[Column]:
    return [
        Column("model", "model", left=True),
        Column("regime", "regime", left=True),
        Column("trainable", "trainable_params", "{:,}"),
        _gib("trainable", "trainable_bytes"),
        _gib("grads", "grad_bytes"),
        _gib("AdamW", "optimizer_state_bytes"),
        _gib("state/copy", "training_state_bytes"),
        _gib(f"AdamW/rank@{zero_ranks}", f"optimizer_state_bytes_per_rank_zero1+_{zero_ranks}"),
    ]


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = harness.parser(__doc__, "python -m launchers.bench.train", out="bench_train.json")
    p.add_argument("--configs", default="tiny,vitb", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--stages", default="0,2,3", help="ZeRO stages to compare")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (CPU processes or GPUs)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--memory-models", default="vit_base_patch14_dinov2,vit_large_patch14_dinov2")
    p.add_argument("--zero-ranks", type=int, default=8, help="ranks for the per-rank optimizer-state column")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch

    from engine.progress import setup_logging

    setup_logging()
    configs = harness.comma_list(args.configs, "--configs", tuple(CONFIGS))
    stages = harness.comma_list(args.stages, "--stages", ("0", "1", "2", "3"), cast=int)
    models = harness.comma_list(args.memory_models, "--memory-models", allow_empty=True)
    record = harness.start(
        "train",
        {k: v for k, v in vars(args).items() if k not in ("worker", "config", "stage", "run_dir", "local_rank")},
        "cuda" if torch.cuda.is_available() else "cpu",
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for c in configs:
            for s in stages:
                print(f"running {c} ZeRO-{s} on {args.nproc} rank(s) ...", flush=True)
                runs.append(run_one(c, s, args, Path(tmp)))
    base = {r["config"]: r["steps_per_s"] for r in runs if r["stage"] == 0}
    for r in runs:
        r["ratio_vs_zero0"] = r["steps_per_s"] / base[r["config"]] if r["config"] in base else float("nan")
    print(
        f"\nTraining step, {args.nproc} ranks, {record['environment']['device']}; {args.steps} timed steps "
        f"after {args.warmup} warm-up"
    )
    print(harness.format_table(runs, RUN_COLUMNS))
    mem = memory_rows(models, args.zero_ranks)
    print("\nExPLoRA (last block + LoRA r64 q,v + norms + cls token) vs full fine-tuning, backbone only (GiB)")
    print(harness.format_table(mem, memory_columns(args.zero_ranks)))
    for m in dict.fromkeys(r["model"] for r in mem):
        e, f = (next(r for r in mem if r["model"] == m and r["regime"] == g) for g in ("explora", "full"))
        print(
            f"{m}: full fine-tuning needs {f['optimizer_state_bytes'] / e['optimizer_state_bytes']:.1f}x the "
            f"optimizer state of ExPLoRA"
        )
    print()
    harness.save(args.out, record, runs=runs, memory=mem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
