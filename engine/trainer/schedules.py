"""Optimizer schedules: linear warm-up + cosine learning rate, cosine weight decay, lr batch scaling.

Every schedule is a pure function of the 0-based optimizer ``step``, so a resumed run computes the
same values as an uninterrupted one and nothing about them needs to be checkpointed. (The EMA
momentum and teacher-temperature ramps live with the objective, ``engine/objectives/schedules.py``,
and follow the same rule.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.config import OptimConfig


def scaled_lr(base_lr: float, global_batch: int, rule: str = "linear") -> float:
    """Peak learning rate for ``global_batch`` images per optimizer step (accumulation included).

    base_lr: the recipe's lr at the rule's reference batch. rule: 'linear' = base_lr * B / 256
    (Goyal et al. 2017; MAE's blr, main_pretrain.py), 'sqrt' = base_lr * sqrt(B / 256),
    'sqrt_wrt_1024' = base_lr * sqrt(B / 1024) (DINOv2, dinov2/utils/config.py; ExPLoRA counts
    accum_iter in B) or 'none' (``base_lr`` as given).
    """
    if global_batch <= 0:
        raise ValueError(f"global_batch must be > 0, got {global_batch}")
    if rule == "linear":
        return base_lr * global_batch / 256.0
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 256.0)
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024.0)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r} (use linear, sqrt, sqrt_wrt_1024 or none)")


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at step ``total``; ``end`` from then on."""
    if total <= 0 or step >= total:
        return float(end)
    t = max(step, 0) / total
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t)))


def warmup_cosine(step: int, total: int, peak: float, final: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine down to ``final`` at ``total``.

    The warm-up gives step s the value peak * (s + 1) / warmup, so the first step already moves
    the weights (DINOv2's schedule starts at exactly 0, which wastes step 0).
    """
    if step < warmup:
        return float(peak * (step + 1) / warmup)
    return cosine(step - warmup, total - warmup, peak, final)


@dataclass(frozen=True)
class OptimSchedule:
    """The lr and weight-decay values of every optimizer step of one run.

    peak_lr: after batch scaling. min_lr: absolute (not scaled), clamped to at most ``peak_lr``.
    total_steps: the run's max_steps (the cosine ends there).
    """

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    weight_decay_end: float

    @classmethod
    def from_config(cls, optim: OptimConfig, global_batch: int, total_steps: int) -> OptimSchedule:
        """global_batch: images per optimizer step over all ranks (micro-batch x accumulation x world)."""
        peak = scaled_lr(optim.lr, global_batch, optim.lr_scaling)
        return cls(
            peak_lr=peak,
            min_lr=min(optim.min_lr, peak),
            warmup_steps=min(optim.warmup_steps, total_steps),
            total_steps=total_steps,
            weight_decay=optim.weight_decay,
            weight_decay_end=optim.weight_decay_end,
        )

    def lr(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)

    def weight_decay_at(self, step: int) -> float:
        """Cosine from weight_decay to weight_decay_end over the whole run (DINO's wd ramp)."""
        return cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def apply(self, param_groups: list[dict], step: int) -> tuple[float, float]:
        """Write step ``step``'s lr and weight decay into optimizer ``param_groups``.

        Each group's ``wd_mult`` (set by ``deepspeed_setup.param_groups``; 0 = no decay) scales
        the weight decay, ``lr_mult`` (default 1) the lr; a group with ``frozen_until`` > step gets
        lr 0 (DINOv2's last_layer_lr schedule: AdamW then leaves it untouched, weight decay
        included, while its moments keep accumulating). Returns (lr, wd) of an unscaled group.
        """
        lr, wd = self.lr(step), self.weight_decay_at(step)
        for g in param_groups:
            g["lr"] = 0.0 if step < g.get("frozen_until", 0) else lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = wd * g.get("wd_mult", 1.0)
        return lr, wd
