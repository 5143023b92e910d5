"""Linear probing on cached frozen features, with an lr sweep trained in one pass (DINOv2-style).

All heads of the grid see the same mini-batches; each has its own lr. Features are standardised
with the train split's mean/std first, so one lr grid fits backbones of any feature scale.
The lr is picked on the validation split; the test split (if given) is only ever evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.eval.metrics import mean_average_precision, topk_accuracy

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclass
class ProbeResult:
    best_lr: float
    val: dict[str, float]
    """Metrics of the chosen head on the validation split (top1/top5, or mAP for multi-label)."""
    test: dict[str, float] | None = None
    """Same metrics on the held-out test split, when one was given."""
    sweep: dict[float, float] = field(default_factory=dict)
    """lr -> validation score (top1 or mAP) of every head."""
    head: nn.Linear | None = None
    """The chosen head, in the standardised feature space (see ``mean``/``std``)."""
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None


def _score(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> dict[str, float]:
    if multilabel:
        return {"mAP": mean_average_precision(logits, labels)}
    return topk_accuracy(logits, labels)


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    test_feats: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    lrs: tuple[float, ...] = DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    multilabel: bool = False,
    seed: int = 0,
) -> ProbeResult:
    """Train one linear head per lr with SGD(momentum 0.9) + cosine schedule; pick the best on val.

    feats: (N, D) float; labels: (N,) long for multi-class, (N, C) {0,1} for ``multilabel``.
    """
    g = torch.Generator().manual_seed(seed)
    x = train_feats.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    norm = lambda f: (f.float() - mean) / std  # noqa: E731
    x = norm(x)
    y = train_labels
    D = x.shape[1]
    heads = [nn.Linear(D, num_classes) for _ in lrs]
    for h in heads:
        nn.init.normal_(h.weight, std=0.01, generator=g)
        nn.init.zeros_(h.bias)
    opt = torch.optim.SGD(
        [{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, lrs)], momentum=0.9, weight_decay=weight_decay
    )
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            loss = xb.new_zeros(())
            for h in heads:
                out = h(xb)
                loss = loss + (
                    F.binary_cross_entropy_with_logits(out, yb.float()) if multilabel else F.cross_entropy(out, yb)
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    key = "mAP" if multilabel else "top1"
    with torch.no_grad():
        xv = norm(val_feats)
        val_scores = [_score(h(xv), val_labels, multilabel) for h in heads]
    sweep = {lr: s[key] for lr, s in zip(lrs, val_scores)}
    best = max(range(len(lrs)), key=lambda i: (val_scores[i][key], -i))
    result = ProbeResult(best_lr=lrs[best], val=val_scores[best], sweep=sweep, head=heads[best], mean=mean, std=std)
    if test_feats is not None and test_labels is not None:
        with torch.no_grad():
            result.test = _score(heads[best](norm(test_feats)), test_labels, multilabel)
    return result
