"""DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototype layer.

Layout as DINOv2's ``DINOHead`` (dinov2/layers/dino_head.py): ``in -> hidden -> ... -> bottleneck``,
GELU between layers, truncated normal init std 0.02, zero biases; then the prototype ("last") layer
``weight_norm(Linear(bottleneck, K, bias=False))`` whose gain ``weight_g`` starts at 1 and TRAINS
(DINOv2 L27-28; DINO v1's ``norm_last_layer=True`` is the variant that pins it to 1). Here the
weight-norm is written out: ``prototypes`` is DINOv2's ``weight_v`` (K, bottleneck) and
``prototype_gain`` its ``weight_g`` (K, 1), so score k = g_k * cos(z, v_k). Both get weight decay and
both are the "last layer" that ``objective.dino.freeze_last_layer_steps`` holds at lr 0.
DINOv2 hub checkpoints carry no heads, so the heads always start from this init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

LAST_LAYER = ("prototypes", "prototype_gain")


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Sequential:
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """x: (N, in_dim) -> scores (N, out_dim) = gain_k * cos(bottleneck(x), prototype_k). Sizes: DinoConfig.head_*."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        nlayers: int,
    ):
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, max(nlayers, 1))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        # nn.Linear's default init, as DINOv2's weight-normed layer starts from one
        nn.init.kaiming_uniform_(self.prototypes, a=5**0.5)
        self.prototype_gain = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mlp(x)
        eps = 1e-6 if z.dtype == torch.float16 else 1e-12
        z = F.normalize(z, dim=-1, p=2, eps=eps)
        w = F.normalize(self.prototypes, dim=-1, p=2, eps=eps) * self.prototype_gain
        return F.linear(z, w)
