"""Supervised fine-tuning run: train/val loaders -> :class:`Classifier` -> the DeepSpeed Trainer with
validation every epoch (top-1/top-5, or mAP for multi-label) and the best checkpoint kept.

Run directory (``train.output_dir``): the trainer's files (config.yaml, metrics.jsonl with
``"split": "val"`` rows, checkpoints/ for resume) plus

- ``best/classifier.safetensors``: the trainable tensors (LoRA, head, and whatever else trained)
  of the best validation so far, metadata = step, metric, classes, base model identity; together
  with the base weights (+ ExPLoRA adapter) it rebuilds the fine-tuned classifier
  (:func:`load_best`). Under ZeRO-3 the tensors are gathered before saving.
- ``best/meta.json`` and ``results.json`` (every validation, the best, parameter counts, wall time).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from engine.atomic import atomic_write, atomic_write_text
from engine.config import save_config
from engine.errors import UserError
from engine.eval.classifier import Classifier, build_classifier
from engine.eval.config import FinetuneRunConfig
from engine.eval.features import run_over
from engine.eval.metrics import mean_average_precision, topk_accuracy

log = logging.getLogger(__name__)


def validate(
    model: Classifier, loader, device: torch.device, multilabel: bool, input_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Top-1/top-5 (%) or mAP (%) of ``model`` over the whole val split, and the number of samples
    scored (every rank gets the same)."""
    out, labels = run_over(
        loader,
        device,
        lambda x: {"logits": model.logits(x)},
        loader.normalizer,
        desc="validate",
        total=len(loader) if hasattr(loader, "__len__") else None,
        input_dtype=input_dtype,
    )
    scores = (
        {"mAP": mean_average_precision(out["logits"], labels)} if multilabel else topk_accuracy(out["logits"], labels)
    )
    return {**scores, "samples": int(labels.shape[0])}


def _gathered_trainable(model: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """Trainable tensors as fp32 CPU copies on the main rank (all ranks call it: ZeRO-3 gathers)."""
    from engine.trainer.export import gathered_params

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered_params([p for _, p in named]):
        if not is_main:
            return None
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}


class BestKeeper:
    """Keeps the best validation's trainable tensors in ``<run>/best``; survives resume."""

    def __init__(self, run_dir: Path, metric: str, is_main: bool, meta: dict):
        self.dir, self.metric, self.is_main, self.meta = run_dir / "best", metric, is_main, meta
        self.best: dict | None = None
        prev = self.dir / "meta.json"
        if prev.is_file():
            self.best = json.loads(prev.read_text())

    def update(self, model: nn.Module, step: int, record: dict) -> bool:
        """Save when ``record[metric]`` beats the best so far; every rank must call it."""
        score = float(record[self.metric])
        if self.best is not None and score <= float(self.best[self.metric]):
            return False
        tensors = _gathered_trainable(model, self.is_main)
        self.best = {"step": step, **record}
        if tensors is not None:  # the main rank
            from engine.model.tensor_files import safetensors_bytes

            self.dir.mkdir(parents=True, exist_ok=True)
            meta = {k: json.dumps(v) for k, v in {**self.meta, **self.best}.items()}
            with atomic_write(self.dir / "classifier.safetensors") as fh:
                fh.write(safetensors_bytes(tensors, meta))
            atomic_write_text(self.dir / "meta.json", json.dumps(self.best, indent=1))
        return True


def load_best(cfg: FinetuneRunConfig, path: str | Path) -> Classifier:
    """Rebuild the fine-tuned classifier of ``cfg`` (the run's config.yaml) from its best file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model, _ = build_classifier(cfg, len(meta["classes"]), bool(meta.get("multilabel", False)))
    missing = set(tensors) - set(dict(model.named_parameters()))
    if missing:
        raise UserError(f"'{path}': tensors {sorted(missing)[:3]} do not fit the model of this config")
    model.load_state_dict(tensors, strict=False)
    return model


def check_splits(cfg: FinetuneRunConfig) -> None:
    if not cfg.data.shards:
        raise UserError("--data.shards: not set; give the directory holding the train/ and val/ shard splits")
    for which, split in (("train", cfg.finetune.train_split), ("val", cfg.finetune.val_split)):
        if not (Path(cfg.data.shards) / split).is_dir():
            raise UserError(
                f"--data.shards '{cfg.data.shards}': no '{split}' sub-directory; convert that split "
                f"into {Path(cfg.data.shards) / split} (or set --finetune.{which}_split)"
            )


def run_finetune(cfg: FinetuneRunConfig, env) -> dict:
    """Fine-tune per ``cfg`` on the process group ``env``; returns the results dict (also written)."""
    from engine.data import build_eval_loader, build_finetune_loader, to_device
    from engine.trainer.loop import Trainer
    from engine.trainer.provenance import write_run_json
    from engine.trainer.rng import seed_all

    check_splits(cfg)
    t0 = time.perf_counter()
    out = Path(cfg.train.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        write_run_json(out, env.world_size)
    ft = cfg.finetune
    train = build_finetune_loader(
        cfg.data,
        cfg.crops,
        cfg.model.img_size,
        split=ft.train_split,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.train.seed,
    )
    val = build_eval_loader(cfg.data, cfg.model.img_size, split=ft.val_split, rank=env.rank, world_size=env.world_size)
    multilabel = bool(getattr(train, "multilabel", False))
    classes = train.class_names
    if (ft.mixup > 0 or ft.cutmix > 0) and cfg.data.batch_size % 2:
        raise UserError(f"--data.batch_size {cfg.data.batch_size}: mixup/cutmix pair samples; use an even size")
    seed_all(cfg.train.seed)
    model, report = build_classifier(cfg, len(classes), multilabel)
    metric = "mAP" if multilabel else "top1"
    keeper = BestKeeper(
        out,
        metric,
        env.is_main,
        {"classes": classes, "multilabel": multilabel, "model": cfg.model.name, "mode": ft.mode},
    )
    steps_per_epoch = max(1, len(train) // cfg.train.grad_accum_steps)

    def evaluate(step: int, module: Classifier) -> dict:
        dtype = module.head.weight.dtype  # bf16/fp16 when the engine stores the model in 16 bits
        record = validate(module, val, env.device, multilabel, input_dtype=dtype if dtype != torch.float32 else None)
        record["epoch"] = step / steps_per_epoch
        improved = keeper.update(module, step, record)
        if env.is_main:
            log.info(
                "step %d (epoch %.2f): val %s%s",
                step,
                record["epoch"],
                ", ".join(f"{k} {v:.2f}" for k, v in record.items() if k not in ("epoch", "samples")),
                " (best so far, saved)" if improved else "",
            )
        return record

    trainer = Trainer(
        cfg,
        model,
        train,
        env,
        prepare=lambda b: to_device(b, env.device, train.normalizer),
        evaluate=evaluate,
        eval_every=ft.eval_every or steps_per_epoch,
    )
    fit = trainer.fit()
    head = sum(p.numel() for p in model.head.parameters())
    results = {
        "mode": ft.mode,
        "classes": classes,
        "multilabel": multilabel,
        "metric": metric,
        "steps": fit.step,
        "steps_per_epoch": steps_per_epoch,
        "preempted": fit.preempted,
        "validations": fit.evals,
        "best": keeper.best,
        "final": fit.evals[-1] if fit.evals else None,
        "trainable_params": report.trainable + head,
        "total_params": report.total + head,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if env.is_main:
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    return results
