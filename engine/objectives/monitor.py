"""Collapse monitor: cheap statistics that reveal representation collapse early.

Two failure modes of self-distillation show in different numbers:
- every image lands on the same prototype -> the entropy of the BATCH-MEAN teacher distribution
  (``teacher_mean_entropy``, in units of log K) drops towards 0;
- the teacher output goes uniform -> the mean PER-SAMPLE entropy (``teacher_entropy``) climbs to 1.
Features that stop depending on the input show as ``*_feature_std`` -> 0: the per-dimension std
over the batch of L2-normalised features, times sqrt(D), which is about 1 for features spread over
the sphere. Values are local to this rank (no collective) and returned as Python floats.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@torch.no_grad()
def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """probs: (..., K) distributions -> entropy / log K, shape (...)."""
    k = probs.shape[-1]
    p = probs.float()
    h = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)
    return h / math.log(k) if k > 1 else h * 0.0


@torch.no_grad()
def feature_std(x: torch.Tensor) -> torch.Tensor:
    """x: (B, D) -> scalar: mean over dims of the batch std of L2-normalised rows, times sqrt(D)."""
    if x.shape[0] < 2:
        return x.new_zeros((), dtype=torch.float32)
    z = F.normalize(x.float(), dim=-1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[-1])


class CollapseMonitor:
    """Computes the monitor values and warns (on every ``warn_every``-th call, so never on the first
    steps: a freshly initialised ViT's cls token is input-independent by construction) when they
    cross the collapse thresholds."""

    def __init__(self, min_mean_entropy: float = 0.1, min_feature_std: float = 0.05, warn_every: int = 100):
        self.min_mean_entropy = min_mean_entropy
        self.min_feature_std = min_feature_std
        self.warn_every = warn_every
        self._calls = 0

    @torch.no_grad()
    def __call__(self, teacher_probs: torch.Tensor | None = None, **features: torch.Tensor) -> dict[str, float]:
        """teacher_probs: (N, K) teacher targets or None; features: name -> (B, D) features.

        Returns {'teacher_entropy', 'teacher_mean_entropy', '<name>_feature_std'...} as floats.
        """
        vals: dict[str, torch.Tensor] = {}
        if teacher_probs is not None and teacher_probs.shape[0] > 0:
            vals["teacher_entropy"] = normalized_entropy(teacher_probs).mean()
            vals["teacher_mean_entropy"] = normalized_entropy(teacher_probs.float().mean(dim=0))
        for name, x in features.items():
            vals[f"{name}_feature_std"] = feature_std(x)
        # one host transfer for all values
        out = dict(zip(vals, torch.stack(list(vals.values())).tolist())) if vals else {}
        self._calls += 1
        if self._calls % self.warn_every == 0:
            self._warn(out)
        return out

    def _warn(self, vals: dict[str, float]) -> None:
        me = vals.get("teacher_mean_entropy")
        if me is not None and me < self.min_mean_entropy:
            log.warning(
                "collapse? teacher batch-mean entropy %.3f (of log K) < %.3f: images share one "
                "prototype; check teacher temperature / centering",
                me,
                self.min_mean_entropy,
            )
        for k, v in vals.items():
            if k.endswith("_feature_std") and v < self.min_feature_std:
                log.warning(
                    "collapse? %s = %.3f < %.3f: features barely vary across the batch", k, v, self.min_feature_std
                )
