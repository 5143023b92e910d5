"""End-to-end ExPLoRA demo on CPU: synthetic GeoTIFFs -> shards -> base model -> extended
pre-training -> linear probe / kNN / LoRA fine-tune, one table, ``<out>/results.json``.

    geoexplora-demo [--out runs/demo] [--quick]      # or: python launchers/demo.py ...

What it does, all in one process on the embedded tiny ViT (width 64, depth 2, patch 14, 56 px):

1. writes two synthetic GeoTIFF archives (``shards/scenes.py``): a *source* domain of smooth
   "natural photo" scenes, and a labelled *target* domain of overhead scenes whose 4 classes share
   colour statistics and differ only in fine texture (train and val splits), and converts all of
   them to shards with the converter;
2. pre-trains the *base* model on the source domain with DINOv2 (every parameter trains) -- the
   stand-in for a DINOv2 checkpoint, since no hub weights are downloaded here;
3. measures the frozen base on the target domain (linear probe, kNN) and LoRA-fine-tunes it;
4. runs ExPLoRA extended pre-training on the *unlabelled* target train split (last block
   unfrozen, LoRA r=4 on q,v elsewhere, norms trainable, DINOv2 objective, teacher exported);
5. measures the ExPLoRA backbone the same way and prints both (plus a random-init reference).

``--quick`` shrinks the archives and step counts (under a minute; used by the tests). Every number
printed is measured in this run; with so few steps they are noisy, and whether extended
pre-training helped is read off the table, not assumed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.atomic import atomic_write_text
from engine.config import RunConfig, load_config
from engine.errors import UserError, cli_entry
from engine.eval.config import EvalRunConfig, FinetuneRunConfig
from engine.progress import setup_logging
from engine.trainer.launch import exit_fast

log = logging.getLogger("geoexplora.demo")
MARKER = "demo.json"


@dataclass(frozen=True)
class Sizes:
    source_images: int
    train_per_class: int
    val_per_class: int
    base_steps: int
    explora_steps: int
    finetune_steps: int
    probe_epochs: int


FULL = Sizes(
    source_images=512,
    train_per_class=128,
    val_per_class=96,
    base_steps=300,
    explora_steps=300,
    finetune_steps=150,
    probe_epochs=100,
)
QUICK = Sizes(
    source_images=64,
    train_per_class=16,
    val_per_class=8,
    base_steps=8,
    explora_steps=8,
    finetune_steps=8,
    probe_epochs=20,
)


def prepare_out(out: Path) -> None:
    """Start from a clean ``out``: it must be new, empty, or a previous demo's directory."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"--out '{out}' is not empty and not a previous demo run; choose another directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, json.dumps({"started": time.time()}))


def make_data(out: Path, sizes: Sizes) -> dict[str, Path]:
    """Generate the archives and convert them; returns {'source': shards, 'target': shards root}."""
    from shards.convert import run_convert
    from shards.scenes import OVERHEAD_CLASSES, overhead_pixels, photo_pixels
    from shards.synthetic import generate_archive

    arch, shards = out / "archives", out / "shards"
    k = len(OVERHEAD_CLASSES)
    generate_archive(arch / "source", sizes.source_images, 64, pixel_fn=photo_pixels, seed=1)
    generate_archive(
        arch / "target_train", k * sizes.train_per_class, 64, classes=OVERHEAD_CLASSES, pixel_fn=overhead_pixels, seed=2
    )
    generate_archive(
        arch / "target_val", k * sizes.val_per_class, 64, classes=OVERHEAD_CLASSES, pixel_fn=overhead_pixels, seed=3
    )
    quiet = ["--max-samples-per-shard", "64"]
    run_convert([str(arch / "source"), "-o", str(shards / "source"), *quiet])
    run_convert([str(arch / "target_train"), "-o", str(shards / "target" / "train"), "--labels", "folder", *quiet])
    run_convert([str(arch / "target_val"), "-o", str(shards / "target" / "val"), "--labels", "folder", *quiet])
    return {"source": shards / "source", "target": shards / "target"}


def pretrain(env, shards: Path, run_dir: Path, steps: int, weights: str, full: bool) -> dict:
    """A DINOv2 run of the tiny preset; full=True trains every parameter (the base model)."""
    from launchers.pretrain import run

    over = [
        "--data.shards",
        str(shards),
        "--train.output_dir",
        str(run_dir),
        "--train.max_steps",
        str(steps),
        "--train.save_every",
        "0",
        "--train.resume",
        "none",
        "--train.logger",
        "",
        "--optim.warmup_steps",
        str(max(1, steps // 10)),
        "--model.weights",
        weights,
    ]
    if full:  # from scratch, every tensor trains: a lower lr than the preset's (LoRA-sized) one
        over += [
            "--optim.lr",
            "0.003",
            "--explora.unfreeze_blocks",
            "0,1",
            "--explora.lora_targets",
            "",
            "--explora.train_patch_embed",
            "true",
            "--explora.train_pos_embed",
            "true",
            "--explora.train_tokens",
            "true",
        ]
    cfg = load_config(RunConfig, "tiny_cpu", over)
    t0 = time.perf_counter()
    run(cfg, env)
    opt = json.loads((run_dir / "optimizer.json").read_text())
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "trainable_params": opt["trainable_numel"],
        "steps": steps,
        "merged": str(run_dir / "export" / "teacher_vit_merged.safetensors"),
        "adapter": str(run_dir / "export" / "teacher_adapter.safetensors"),
    }


def evaluate(env, target: Path, out_dir: Path, weights: str, adapter: str, epochs: int) -> dict:
    """Frozen linear probe + kNN (cls features) on the target train/val splits."""
    from engine.eval.frozen import evaluate_frozen

    cfg = load_config(
        EvalRunConfig,
        None,
        [
            "--model.name",
            "tiny",
            "--model.img_size",
            "56",
            "--model.weights",
            weights,
            "--model.adapter",
            adapter,
            "--data.shards",
            str(target),
            "--data.num_workers",
            "1",
            "--data.batch_size",
            "64",
            "--eval.output_dir",
            str(out_dir),
            "--eval.pool",
            "cls",
            "--eval.probe_epochs",
            str(epochs),
        ],
    )
    res = evaluate_frozen(cfg, env)["pools"]["cls"]
    return {"linear_probe_top1": res["linear_probe"]["val"]["top1"], "knn_top1": res["knn"]["val"]["top1"]}


def finetune(env, target: Path, run_dir: Path, weights: str, adapter: str, steps: int) -> dict:
    """LoRA-only fine-tune (r=4 on q,v + head) on the target train split, validated on val."""
    from engine.eval.finetune import run_finetune

    cfg = load_config(
        FinetuneRunConfig,
        "finetune_tiny_cpu",
        [
            "--data.shards",
            str(target),
            "--model.weights",
            weights,
            "--model.adapter",
            adapter,
            "--train.output_dir",
            str(run_dir),
            "--train.max_steps",
            str(steps),
            "--train.resume",
            "none",
            "--train.logger",
            "",
            "--optim.warmup_steps",
            str(max(1, steps // 10)),
        ],
    )
    res = run_finetune(cfg, env)
    # the table reports the last validation: the best one is picked on the same val split (kept in JSON)
    return {
        "finetune_top1": res["final"]["top1"],
        "finetune_best_top1": res["best"]["top1"],
        "finetune_trainable_params": res["trainable_params"],
        "finetune_wall_s": res["wall_s"],
    }


def table(rows: list[dict]) -> str:
    """One line per backbone; each column right-aligned to its header (at least 8 wide)."""
    cols = [
        ("pretrain params", "pretrain_trainable_params", ","),
        ("pretrain s", "pretrain_wall_s", ".1f"),
        ("LP top-1", "linear_probe_top1", ".1f"),
        ("kNN top-1", "knn_top1", ".1f"),
        ("FT top-1", "finetune_top1", ".1f"),
        ("FT params", "finetune_trainable_params", ","),
    ]
    head = " ".join([f"{'backbone':<34}"] + [f"{h:>8}" for h, _, _ in cols])
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [f"{r['name']:<34}"]
        for h, key, spec in cols:
            v = r.get(key)
            cells.append(f"{'-' if v is None else format(v, spec):>{max(len(h), 8)}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def run_demo(out: Path, sizes: Sizes, env) -> dict:
    t0 = time.perf_counter()
    prepare_out(out)
    data = make_data(out, sizes)
    t_data = time.perf_counter() - t0
    log.info("demo: data ready in %.1f s; pre-training the base model on the source domain", t_data)
    base = pretrain(env, data["source"], out / "base", sizes.base_steps, "", full=True)
    rows = [
        {
            "name": "random init (reference)",
            **evaluate(env, data["target"], out / "eval_random", "", "", sizes.probe_epochs),
        }
    ]
    rows.append(
        {
            "name": "base (source-domain DINOv2)",
            "pretrain_trainable_params": base["trainable_params"],
            "pretrain_wall_s": base["wall_s"],
            **evaluate(env, data["target"], out / "eval_base", base["merged"], "", sizes.probe_epochs),
            **finetune(env, data["target"], out / "finetune_base", base["merged"], "", sizes.finetune_steps),
        }
    )
    log.info("demo: ExPLoRA extended pre-training on the unlabelled target train split")
    ex = pretrain(env, data["target"] / "train", out / "explora", sizes.explora_steps, base["merged"], full=False)
    rows.append(
        {
            "name": "ExPLoRA (base + target-domain SSL)",
            "pretrain_trainable_params": ex["trainable_params"],
            "pretrain_wall_s": ex["wall_s"],
            **evaluate(env, data["target"], out / "eval_explora", base["merged"], ex["adapter"], sizes.probe_epochs),
            **finetune(
                env, data["target"], out / "finetune_explora", base["merged"], ex["adapter"], sizes.finetune_steps
            ),
        }
    )
    b, e = rows[1], rows[2]
    results = {
        "sizes": sizes.__dict__,
        "classes": 4,
        "chance_top1": 25.0,
        "rows": rows,
        "explora_minus_base": {k: round(e[k] - b[k], 2) for k in ("linear_probe_top1", "knn_top1", "finetune_top1")},
        "data_s": round(t_data, 1),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.txt", table(rows) + "\n")
    return results


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output directory (new, empty, or a previous demo's)")
    p.add_argument("--quick", action="store_true", help="tiny archives and a few steps per stage (< 1 min)")
    args = p.parse_args(argv)
    setup_logging()
    logging.getLogger("rasterio").setLevel(logging.WARNING)
    from engine.trainer.process_group import init_distributed, shutdown

    env = init_distributed()
    try:
        res = run_demo(Path(args.out), QUICK if args.quick else FULL, env)
    finally:
        shutdown()
    print(
        f"\nExPLoRA demo ({'quick' if args.quick else 'full'}), target domain: 4 texture classes "
        f"(chance 25%), val split; {res['total_s']:.0f} s in all\n"
    )
    print(table(res["rows"]))
    d = res["explora_minus_base"]
    print(
        f"\nExPLoRA - base: linear probe {d['linear_probe_top1']:+.1f}, kNN {d['knn_top1']:+.1f}, "
        f"LoRA fine-tune {d['finetune_top1']:+.1f} points.  Results: {Path(args.out) / 'results.json'}"
    )
    return 0


def console() -> None:
    """``geoexplora-demo``: :func:`main`, then a fast exit."""
    exit_fast(main())


if __name__ == "__main__":
    console()
