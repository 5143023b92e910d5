"""What the trainer drives: :class:`Objective`, the base of DinoObjective, MAEObjective and the
fine-tuning Classifier. DeepSpeed wraps the module whole; ``engine.trainer`` calls only what is here
and the optional hooks it looks up by name (``lr_multiplier(name)``, ``frozen_steps(name)``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn


class Objective(nn.Module, ABC):
    """``loss, logs = objective(batch, step)``: a scalar loss to backpropagate and floats to log."""

    @abstractmethod
    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """The loss for ``batch`` at optimizer step ``step`` and the floats to log."""

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything the optimizer updates: every tensor that requires grad."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def zero_config_overrides(self, stage: int) -> dict:
        """zero_optimization entries this objective needs at ZeRO ``stage``; none by default."""
        return {}

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step (the EMA teacher's update); nothing by default."""
