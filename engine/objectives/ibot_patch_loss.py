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

from engine.objectives.centering import TeacherTargetLoss


class IBOTPatchLoss(TeacherTargetLoss):
    """Weighted masked-patch cross-entropy against the teacher targets (:meth:`teacher_targets`:
    N = this rank's masked positions, image-major).

    DINOv2 pads the masked patch tokens to a fixed upper bound for the head call but slices the
    head output back to the n_masked real rows before centering or Sinkhorn-Knopp
    (dinov2/train/ssl_meta_arch.py L170-193), so padding never reaches the targets or the center;
    we do not pad at all. One difference remains with 'centering': DINOv2's iBOT center update
    averages the per-rank means of the masked rows (dinov2/loss/ibot_patch_loss.py L133-151), ours is the mean
    over all masked rows of all ranks.

    out_dim: K prototypes. centering: 'sinkhorn_knopp' | 'centering'.
    """

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
