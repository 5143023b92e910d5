"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"), as used
by DINOv2 on the student's class tokens: the Kozachenko-Leonenko differential-entropy estimator,
-mean_i log(min_{j != i} ||x_i - x_j||) on L2-normalised features, which pushes each feature away
from its nearest neighbour so the batch spreads over the sphere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x: (B, D) features of ONE view (never mix views of the same image) -> scalar.

    Computed in fp32. With B < 2 there is no neighbour: returns 0 (still attached to ``x``'s
    graph so every rank's backward touches the same parameters).
    """
    if x.shape[0] < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        # nearest neighbour by cosine similarity (= smallest distance on the sphere), self excluded
        sim = x @ x.t()
        sim.fill_diagonal_(-2.0)
        nn_idx = sim.argmax(dim=1)
    dist = (x - x[nn_idx] + eps).norm(dim=-1)
    return -torch.log(dist + eps).mean()
