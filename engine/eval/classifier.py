"""Supervised fine-tuning model: a ViT (base weights, optionally with an ExPLoRA adapter merged in)
+ a linear classification head, trained LoRA-only (the paper's fine-tune) or fully.

:class:`Classifier` follows the trainer's objective contract (``forward(batch, step) -> (loss,
logs)``, ``trainable_parameters()``, ``on_step_end(step)``) so fine-tuning runs on the same
DeepSpeed loop, checkpoints and launch story as extended pre-training, plus ``lr_multiplier(name)``
for layer-wise lr decay.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from engine.eval.config import FinetuneConfig, FinetuneRunConfig
from engine.model.explora import ParamReport, apply_explora, param_report
from engine.model.layer_decay import vit_layer_id
from engine.model.tokens import forward_tokens, pool_tokens
from engine.model.vit import build_vit
from engine.objectives.objective import Objective

log = logging.getLogger(__name__)


class Classifier(Objective):
    """vit + head on the pooled tokens. Batches: {images (B, C, H, W) float, labels (B,) long, or
    (B, C) float multi-hot when ``multilabel``}."""

    def __init__(self, vit: VisionTransformer, num_classes: int, cfg: FinetuneConfig, multilabel: bool = False):
        super().__init__()
        self.vit = vit
        self.pool = cfg.pool
        self.multilabel = bool(multilabel)
        self.label_smoothing = cfg.label_smoothing
        self.layer_decay = cfg.layer_decay
        width = vit.embed_dim * (2 if cfg.pool == "cls_avgpool" else 1)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.mixup = None
        if (cfg.mixup > 0 or cfg.cutmix > 0) and not multilabel:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                label_smoothing=cfg.label_smoothing,
                num_classes=num_classes,
            )

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) class scores."""
        return self.head(pool_tokens(forward_tokens(self.vit, images), self.pool))

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch["images"], batch["labels"]
        if self.multilabel:
            logits = self.logits(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y.float())
            return loss, {"bce": loss.item()}
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            logits = self.logits(x)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = self.logits(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == y).float().mean().item() * 100.0  # on mixed images under mixup
        return loss, {"ce": loss.item(), "train_top1": acc}

    def layer_id(self, name: str) -> int:
        """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
        depth = len(self.vit.blocks)
        return vit_layer_id(name[len("vit.") :], depth) if name.startswith("vit.") else depth + 1

    def lr_multiplier(self, name: str) -> float:
        """Layer-wise lr decay (BEiT/MAE fine-tuning): layer_decay ** (depth + 1 - layer_id)."""
        if self.layer_decay >= 1.0:
            return 1.0
        return float(self.layer_decay ** (len(self.vit.blocks) + 1 - self.layer_id(name)))


def build_classifier(
    cfg: FinetuneRunConfig, num_classes: int, multilabel: bool = False, device: torch.device | None = None
) -> tuple[Classifier, ParamReport]:
    """ViT from ``cfg.model`` (weights + merged adapter) with the fine-tuning recipe applied, plus head.

    'lora': every block keeps its weights frozen and gets LoRA on ``finetune.lora_targets``; norms
    train only with ``finetune.train_norms``. 'full': every backbone parameter trains.
    """
    ft = cfg.finetune
    vit = build_vit(cfg.model)
    if ft.mode == "lora":
        report = apply_explora(
            vit,
            unfreeze_blocks=[],
            lora_rank=ft.lora_rank,
            lora_alpha=ft.lora_alpha,
            lora_targets=list(ft.lora_targets),
            lora_dropout=ft.lora_dropout,
            train_norms=ft.train_norms,
            train_tokens=False,
            train_mask_token=False,
        )
    else:
        vit.requires_grad_(True)
        if isinstance(getattr(vit, "mask_token", None), nn.Parameter):
            vit.mask_token.requires_grad_(False)  # iBOT's token; classification never masks
        report = param_report(vit, range(len(vit.blocks)))
    model = Classifier(vit, num_classes, ft, multilabel)
    if device is not None:
        model.to(device)
    head = sum(p.numel() for p in model.head.parameters())
    log.info(
        "fine-tune (%s): %s backbone + %s head parameters train, %s frozen",
        ft.mode,
        f"{report.trainable:,}",
        f"{head:,}",
        f"{report.frozen:,}",
    )
    return model, report
