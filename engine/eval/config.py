"""Typed configs of the downstream runs: supervised fine-tuning (``launchers/finetune.py``) and
frozen-feature evaluation (``launchers/evaluate.py``). They reuse the pre-training sections
(data, crops, model, optim, zero, deepspeed, kernels, train) and add their own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine.config import (
    DEFAULT_LORA_TARGETS,
    CropConfig,
    DataConfig,
    DeepSpeedFileConfig,
    KernelConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    ZeroConfig,
    check_lora_targets,
)
from engine.config_io import check_field as _check
from engine.model_names import check_image_sizes


@dataclass
class FinetuneConfig:
    mode: Literal["lora", "full"] = "lora"
    """'lora': LoRA on the frozen backbone + a trainable head (the paper's fine-tune); 'full': every
    parameter trains."""
    lora_rank: int = 8
    """LoRA rank of the fine-tuning adapter (a new one, on top of any merged ExPLoRA adapter)."""
    lora_alpha: float = 8.0
    """LoRA alpha (update scaled by alpha / r)."""
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Linear layers that get LoRA in every block: any of q, k, v, proj, fc1, fc2."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input."""
    train_norms: bool = False
    """Also train every LayerNorm in 'lora' mode."""
    pool: Literal["cls", "cls_avgpool"] = "cls"
    """Head input: the cls token, or cls concatenated with the mean patch token (DINOv2's linear eval)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy (ignored under mixup/cutmix, whose targets are already soft)."""
    mixup: float = 0.0
    """Mixup Beta(alpha, alpha) parameter (0 disables)."""
    cutmix: float = 0.0
    """CutMix Beta(alpha, alpha) parameter (0 disables)."""
    mixup_prob: float = 1.0
    """Probability of applying mixup or cutmix to a batch."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix instead of mixup when both are enabled."""
    layer_decay: float = 1.0
    """Layer-wise lr decay: block i gets lr * layer_decay ** (depth - i), the embeddings the lowest (1.0 disables)."""
    eval_every: int = 0
    """Optimizer steps between validations (0 = once per epoch of the train split); the last step is
    always validated."""
    train_split: str = "train"
    """Sub-directory of --data.shards with the training shards."""
    val_split: str = "val"
    """Sub-directory of --data.shards with the validation shards."""

    def validate(self) -> None:
        _check(self.lora_rank > 0, "finetune.lora_rank", "must be > 0")
        check_lora_targets(self.lora_targets, "finetune.lora_targets")
        _check(
            self.mode == "full" or bool(self.lora_targets),
            "finetune.lora_targets",
            "is empty; LoRA fine-tuning needs at least one target (or --finetune.mode full)",
        )
        _check(0.0 <= self.label_smoothing < 1.0, "finetune.label_smoothing", "must be in [0, 1)")
        _check(self.mixup >= 0 and self.cutmix >= 0, "finetune.mixup", "mixup/cutmix alphas must be >= 0")
        _check(0.0 <= self.mixup_prob <= 1.0, "finetune.mixup_prob", "must be in [0, 1]")
        _check(0.0 < self.layer_decay <= 1.0, "finetune.layer_decay", "must be in (0, 1]")
        _check(self.eval_every >= 0, "finetune.eval_every", "must be >= 0 (0 = once per epoch)")


@dataclass
class FinetuneRunConfig:
    """Everything one supervised fine-tuning run needs (launchers/finetune.py)."""

    data: DataConfig = field(default_factory=DataConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    deepspeed: DeepSpeedFileConfig = field(default_factory=DeepSpeedFileConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Training and validation views are model.img_size: a multiple of the patch size."""
        check_image_sizes(self.model.name, [("model.img_size", self.model.img_size)])
        _check(
            self.optim.layerwise_decay == 1.0,
            "optim.layerwise_decay",
            "is the pre-training (DINOv2) setting; fine-tuning uses --finetune.layer_decay",
        )


@dataclass
class EvalConfig:
    output_dir: str = "runs/eval"
    """Where results.json, the results table and the cached features go."""
    pool: Literal["cls", "cls_avgpool", "both"] = "both"
    """Linear-probe features: cls token, cls + mean patch token (DINOv2), or report both."""
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    """Sub-directories of --data.shards: train split, validation split (picks the probe lr), optional test split."""
    probe_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0])
    """Linear-probe learning-rate grid (one head per lr, trained together, picked on val)."""
    probe_epochs: int = 100
    """Linear-probe epochs over the cached train features."""
    probe_batch_size: int = 256
    """Linear-probe mini-batch size."""
    probe_weight_decay: float = 0.0
    """Linear-probe weight decay."""
    knn_k: int = 20
    """Neighbours of the weighted kNN classifier."""
    knn_temperature: float = 0.07
    """Temperature of the kNN vote weights exp(cos / T)."""
    multilabel: bool | None = None
    """Multi-label targets scored by mAP (None = the manifest's 'multilabel' flag)."""
    reuse_features: bool = True
    """Reuse cached features in output_dir/features when they were extracted with the same model and data."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Feature-extraction precision on GPU (autocast); CPU always runs fp32."""
    seed: int = 0
    """Seed of the linear probe's initialisation and mini-batch order."""

    def validate(self) -> None:
        _check(len(self.splits) in (2, 3), "eval.splits", "give train,val or train,val,test split names")
        _check(len(self.probe_lrs) > 0 and min(self.probe_lrs) > 0, "eval.probe_lrs", "needs positive values")
        _check(
            self.probe_epochs > 0 and self.probe_batch_size > 0,
            "eval.probe_epochs",
            "epochs and batch size must be > 0",
        )
        _check(self.knn_k > 0 and self.knn_temperature > 0, "eval.knn_k", "k and temperature must be > 0")
        _check(bool(self.output_dir), "eval.output_dir", "must name a directory")


@dataclass
class EvalRunConfig:
    """Frozen-feature evaluation (launchers/evaluate.py): linear probe and kNN."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Features are extracted at model.img_size: a multiple of the patch size."""
        check_image_sizes(self.model.name, [("model.img_size", self.model.img_size)])
