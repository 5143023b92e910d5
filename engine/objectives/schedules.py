"""Per-step schedules of the self-supervised objectives: EMA momentum and teacher temperature.

The trainer passes the run's total number of optimizer steps; each schedule is a pure function of
``step`` (0-based optimizer step), so nothing needs saving in checkpoints and a resumed run picks
up the same values.
"""

from __future__ import annotations

# The half-cosine ramp is the same math as the trainer's lr / weight-decay cosine; that module is
# pure (no torch.distributed / deepspeed), so the objective may share it.
from engine.trainer.schedules import cosine


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps``); ``end`` afterwards.

    This is DINO's momentum ramp: m(s) = end - (end - start) * (cos(pi s / T) + 1) / 2.
    """
    return cosine(step, total_steps, start, end)


def linear_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Straight line from ``start`` (step 0) to ``end`` (step ``total_steps``); ``end`` afterwards."""
    if total_steps <= 0 or step >= total_steps:
        return float(end)
    t = max(step, 0) / total_steps
    return float(start + (end - start) * t)


def teacher_temperature(step: int, warmup_steps: int, warmup_temp: float, temp: float) -> float:
    """DINO's teacher temperature: linear warm-up ``warmup_temp -> temp`` over ``warmup_steps``.

    A low starting temperature gives sharp targets while the freshly initialised heads are still
    near-uniform (DINO warm-up 0.04 -> 0.07); after the warm-up it stays at ``temp``.
    """
    return linear_schedule(step, warmup_steps, warmup_temp, temp)


def momentum_schedule(kind: str, step: int, total_steps: int, start: float, end: float) -> float:
    """EMA momentum at ``step``: ``kind`` is 'cosine' (DINO/DINOv2) or 'linear'."""
    if kind == "cosine":
        return cosine_schedule(step, total_steps, start, end)
    if kind == "linear":
        return linear_schedule(step, total_steps, start, end)
    raise ValueError(f"unknown momentum schedule {kind!r} (use 'cosine' or 'linear')")
