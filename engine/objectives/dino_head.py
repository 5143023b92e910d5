"""DINO projection head: MLP -> L2-normalised bottleneck -> cosine scores against K prototypes.

Layout as in DINO/DINOv2 (``in -> hidden -> ... -> bottleneck``, GELU between layers, truncated
normal init std 0.02, zero biases). The prototype layer is weight-normalised with the norm FIXED to
1 (DINO's ``norm_last_layer=True``): scores are cosines in [-1, 1], which keeps Sinkhorn-Knopp's
exp(score / temp) finite in fp32 and is the stable choice for heads trained from scratch.
DINOv2 hub checkpoints carry no heads, so the heads always start from this init.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Sequential:
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """x: (N, in_dim) -> scores (N, out_dim), each in [-1, 1].

    ``prototypes`` (out_dim, bottleneck_dim) is the direction of each prototype; only its
    direction matters, so weight decay on it changes nothing in the output.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ):
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, max(nlayers, 1))
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        # nn.Linear's default init, as DINO's weight-normed layer starts from one
        nn.init.kaiming_uniform_(self.prototypes, a=5 ** 0.5)

    def forward(self, x: torch.Tensor, freeze_prototypes: bool = False) -> torch.Tensor:
        """freeze_prototypes: stop the gradient into ``prototypes`` (DINOv2's first-epoch freeze)."""
        z = self.mlp(x)
        eps = 1e-6 if z.dtype == torch.float16 else 1e-12
        z = F.normalize(z, dim=-1, p=2, eps=eps)
        w = self.prototypes.detach() if freeze_prototypes else self.prototypes
        w = F.normalize(w, dim=-1, p=2, eps=eps)
        return F.linear(z, w)
