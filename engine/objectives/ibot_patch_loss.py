"""iBOT masked-patch self-distillation loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with
Online Tokenizer"), with DINOv2's per-image weighting and Sinkhorn-Knopp targets.

The student sees a global crop with some patch embeddings replaced by a mask token; at each masked
position it must predict the teacher's prototype distribution for the UNMASKED crop. Each image
counts equally whatever its number of masked patches: a masked patch of image i has weight
1 / m_i, and the sum is divided by the number of images (masked or not) on this rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.objectives.centering import AllReduce, RunningCenter, identity_all_reduce, sinkhorn_knopp


class IBOTPatchLoss(nn.Module):
    """Teacher targets for masked patches and the weighted masked-patch cross-entropy.

    out_dim: K prototypes. centering: 'sinkhorn_knopp' | 'centering'.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        centering: str = "sinkhorn_knopp",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        if centering not in ("sinkhorn_knopp", "centering"):
            raise ValueError(f"centering must be 'sinkhorn_knopp' or 'centering', got {centering!r}")
        self.student_temp = student_temp
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.center = RunningCenter(out_dim, center_momentum)

    @torch.no_grad()
    def teacher_targets(
        self, teacher_logits: torch.Tensor, teacher_temp: float, all_reduce: AllReduce = identity_all_reduce
    ) -> torch.Tensor:
        """teacher_logits: (M, K) teacher scores at this rank's M masked positions -> (M, K) fp32.

        Sinkhorn-Knopp equipartitions over the masked patches of ALL ranks (M may be 0 here).
        With 'centering' the patch center is the running mean of the masked teacher scores
        (DINOv2 also averages its zero padding rows in; we do not pad).
        """
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, all_reduce, self.sinkhorn_iterations)
        probs = self.center.targets(teacher_logits, teacher_temp)
        self.center.update(teacher_logits, all_reduce)
        return probs

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Weighted masked-patch cross-entropy.

        student_logits: (M, K) student scores at the masked positions, in ``masks[masks]`` order
        (image-major); teacher_probs: (M, K); masks: (N, L) bool, N images of this rank. Returns a
        scalar: -(1/N) sum_i (1/m_i) sum_{masked j of i} sum_k t_jk log softmax(s_j / T)_k.
        """
        lsm = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        ce = -(teacher_probs.float() * lsm).sum(dim=-1)  # (M,)
        per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()  # (N, 1)
        weights = (1.0 / per_image).expand_as(masks)[masks]  # (M,)
        return (ce * weights).sum() / max(masks.shape[0], 1)
