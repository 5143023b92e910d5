"""The training sections of the run configuration: optimizer, ZeRO, a DeepSpeed file merged over the
generated config, kernel backends and the run itself (steps, precision, checkpoints, loggers).

Defined here, read through :mod:`engine.config` (``from engine.config import TrainConfig``), which
composes them into ``RunConfig`` and the fine-tuning configs.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from engine.config_io import check_field as _check


def _importable(package: str) -> bool:
    """Whether ``import package`` can work, without importing it (slow for wandb/mlflow)."""
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Base learning rate at lr_scaling's reference batch: per 256 images ('linear', 'sqrt'), per 1024
    ('sqrt_wrt_1024'), or absolute ('none')."""
    min_lr: float = 1e-6
    """Final learning rate of the cosine schedule."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.04
    """Decoupled weight decay at step 0."""
    weight_decay_end: float = 0.04
    """Weight decay at the last step (cosine)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    clip_grad: float = 3.0
    """Gradient-norm clipping (0 disables)."""
    no_decay_lora_b: bool = True
    """Exempt LoRA B from weight decay (norms and biases are always exempt)."""
    lr_scaling: Literal["linear", "sqrt", "sqrt_wrt_1024", "none"] = "linear"
    """Peak lr = lr * global_batch / 256 ('linear', MAE), lr * sqrt(global_batch / 256) ('sqrt'), lr * sqrt(global_batch
    / 1024) ('sqrt_wrt_1024', DINOv2), or lr ('none'); global_batch counts accumulation."""
    layerwise_decay: float = 1.0
    """DINOv2 layer-wise lr decay d: block i of L gets lr * d^(L - i), the embeddings (patch/pos embed,
    cls/register/mask tokens) d^(L + 1), the final norm, heads and decoder 1 (1.0 disables)."""
    patch_embed_lr_mult: float = 1.0
    """Extra lr factor of the patch embedding, on top of layerwise_decay (DINOv2: 0.2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    optimizer: Literal["auto", "fused", "apex", "torch"] = "auto"
    """AdamW implementation: 'auto' = apex or prebuilt DeepSpeed FusedAdam on GPU, else torch AdamW (fused on GPU);
    'fused' = DeepSpeed FusedAdam (JIT-compiled if not prebuilt); 'apex'; 'torch'."""

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.min_lr >= 0, "optim.min_lr", "must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.weight_decay >= 0 and self.weight_decay_end >= 0, "optim.weight_decay", "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", "each beta must be in [0, 1)")
        _check(self.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")
        _check(self.eps > 0, "optim.eps", "must be > 0")
        _check(0.0 < self.layerwise_decay <= 1.0, "optim.layerwise_decay", "must be in (0, 1] (1.0 disables)")
        _check(self.patch_embed_lr_mult >= 0, "optim.patch_embed_lr_mult", "must be >= 0")


@dataclass
class ZeroConfig:
    stage: int = 0
    """DeepSpeed ZeRO stage 0/1/2/3."""
    offload_optimizer: bool = False
    """Offload optimizer state to CPU memory."""
    offload_param: bool = False
    """Offload partitioned parameters to CPU memory (stage 3 only)."""
    bucket_size: int = 200_000_000
    """Elements per gradient-reduce / parameter all-gather bucket."""

    def validate(self) -> None:
        _check(self.stage in (0, 1, 2, 3), "zero.stage", "must be 0, 1, 2 or 3")
        _check(
            not self.offload_param or self.stage == 3, "zero.offload_param", "parameter offload needs --zero.stage 3"
        )
        _check(
            not self.offload_optimizer or self.stage >= 1,
            "zero.offload_optimizer",
            "optimizer offload needs --zero.stage 1, 2 or 3",
        )
        _check(self.bucket_size > 0, "zero.bucket_size", "must be > 0")


@dataclass
class DeepSpeedFileConfig:
    config: str = ""
    """DeepSpeed JSON/YAML file merged over the generated DeepSpeed config (e.g. comms_logger, flops_profiler, extra
    zero_optimization keys); keys that other flags set are refused; '' = none."""

    def validate(self) -> None:
        _check(not self.config or Path(self.config).is_file(), "deepspeed.config", f"file '{self.config}' not found")


@dataclass
class KernelConfig:
    lora: Literal["auto", "torch", "triton", "reference"] = "auto"
    """LoRA linear backend: 'auto' takes the Triton kernel only where this machine's kernel record (python -m
    kernels.verify) says it passed and was faster, else 'torch' (the fast pure-torch path); 'reference' is the unfused
    ground truth."""
    attention: Literal["auto", "triton", "xformers", "sdpa", "reference"] = "auto"
    """Attention backend: 'auto' takes the Triton kernel only where this machine's kernel record says it passed and was
    faster, else 'sdpa'."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to run."""
    output_dir: str = "runs/default"
    """Run directory: resolved config, checkpoints, logs, exports."""
    resume: str = "auto"
    """'auto' (newest complete checkpoint in output_dir), a checkpoint path, or 'none'."""
    seed: int = 0
    """Base seed (each rank/worker derives its own)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision (bf16 recommended on GPU)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    log_every: int = 10
    """Steps between log lines / metric records."""
    save_every: int = 500
    """Steps between checkpoints (0 = only at the end / on preemption)."""
    keep_last: int = 3
    """Checkpoints to keep."""
    max_bad_steps: int = 5
    """Halt after this many consecutive non-finite losses."""
    amp: Literal["autocast", "cast"] = "autocast"
    """bf16 style: 'autocast' keeps fp32 weights (exact EMA teacher) and runs matmuls in bf16; 'cast' stores the model
    in bf16 with fp32 master copies of the trainable tensors only (fp16 always casts, with dynamic loss scaling)."""
    peak_tflops: float = 0.0
    """Per-device peak dense TFLOPS for MFU (0 = look the GPU up by name; no MFU on CPU)."""
    export: bool = True
    """At the end, write the ExPLoRA adapter file and the merged ViT weights to <output_dir>/export."""
    logger: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    """Experiment loggers besides metrics.jsonl (always written), e.g. tensorboard,wandb; '' = none. Offline by default:
    TensorBoard to <output_dir>/tb, W&B in offline mode unless WANDB_MODE is set, MLflow to <output_dir>/mlflow.db
    unless MLFLOW_TRACKING_URI is set."""

    def validate(self) -> None:
        _check(self.max_steps > 0, "train.max_steps", "must be > 0")
        _check(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.save_every >= 0, "train.save_every", "must be >= 0 (0 = only at the end)")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        _check(self.peak_tflops >= 0, "train.peak_tflops", "must be >= 0")
        _check(bool(self.output_dir), "train.output_dir", "must name a directory")
        _check(
            self.resume in ("auto", "none") or Path(self.resume).exists(),
            "train.resume",
            f"'{self.resume}' is neither 'auto', 'none' nor an existing checkpoint",
        )
        _check(len(set(self.logger)) == len(self.logger), "train.logger", f"names a logger twice: {self.logger}")
        for name in self.logger:
            _check(
                _importable(name),
                "train.logger",
                f"{name}: the {name} package is not installed; "
                f"pip install {name} (or geoexplora[{name}]), or leave it out",
            )
