"""Classification metrics: top-k accuracy (multi-class) and mean average precision (multi-label)."""

from __future__ import annotations

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """logits: (N, C) scores, labels: (N,) class indices -> {"top1": %, "top5": %} (k capped at C)."""
    n, c = logits.shape
    kmax = min(max(ks), c)
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hit = top.eq(labels.view(-1, 1))
    return {f"top{k}": 100.0 * hit[:, : min(k, c)].any(dim=1).float().mean().item() for k in ks}


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class AP. scores, targets: (N, C), targets in {0,1} -> (C,) (NaN where a class has no positive)."""
    order = scores.argsort(dim=0, descending=True)
    t = targets.gather(0, order).float()  # (N, C) sorted by score per class
    tp = t.cumsum(0)
    precision = tp / torch.arange(1, t.shape[0] + 1, device=t.device, dtype=t.dtype).view(-1, 1)
    pos = t.sum(0)
    ap = (precision * t).sum(0) / pos.clamp_min(1)
    return torch.where(pos > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP over classes with at least one positive, in % (BigEarthNet-style multi-label)."""
    ap = average_precision(scores, targets)
    return 100.0 * ap[~ap.isnan()].mean().item()
