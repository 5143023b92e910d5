"""Self-supervised objectives continued by ExPLoRA: DINOv2 (DINO + iBOT + KoLeo, shared-base EMA
teacher) and MAE. Interface: ``loss, logs = objective(batch, step)``, ``trainable_parameters()``,
``on_step_end(step)``, ``state_dict()``; build with :func:`build_objective`."""

from engine.objectives.build import build_objective
from engine.objectives.dino import DinoObjective
from engine.objectives.mae import MAEObjective

__all__ = ["build_objective", "DinoObjective", "MAEObjective"]
