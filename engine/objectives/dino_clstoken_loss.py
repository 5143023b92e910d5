"""DINO self-distillation loss on class tokens (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers"; DINOv2's Sinkhorn-Knopp targets, Oquab et al. 2023).

Every student view (global and local crops) is pulled towards the teacher's distribution of every
OTHER global view of the same image: cross-entropy H(teacher_t, student_s) averaged over the batch,
summed over the (s, t) pairs with s != t, divided by the number of pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.objectives.centering import TeacherTargetLoss


class DINOClsLoss(TeacherTargetLoss):
    """Multi-crop cross-entropy of the student's cls scores against the teacher targets
    (:meth:`teacher_targets`: N = global crops of this rank).

    out_dim: K prototypes. centering: 'sinkhorn_knopp' | 'centering'.
    """

    def forward(
        self,
        student_global: torch.Tensor,
        student_local: torch.Tensor | None,
        teacher_probs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-crop cross-entropy, split into its global-view and local-view parts.

        student_global: (n_g, B, K) student scores of the global crops; student_local: (n_l, B, K)
        or None; teacher_probs: (n_g, B, K) targets of the global crops. Returns (global_part,
        local_part), each already divided by the total number of pairs n_g(n_g - 1) + n_l n_g, so
        their sum is the DINO loss. Scores are promoted to fp32.
        """
        n_g = student_global.shape[0]
        n_l = 0 if student_local is None else student_local.shape[0]
        n_pairs = n_g * (n_g - 1) + n_l * n_g
        if n_pairs == 0:
            raise ValueError("the DINO loss needs 2+ global crops or some local crops")
        t = teacher_probs.float()
        lsm_g = F.log_softmax(student_global.float() / self.student_temp, dim=-1)
        # CE summed over every (student view, teacher view) pair, then the same-view pairs removed:
        # one einsum instead of a Python double loop over views
        ce_g = -torch.einsum("tbk,sbk->ts", t, lsm_g) / t.shape[1]  # (n_g teacher, n_g student)
        global_part = (ce_g.sum() - ce_g.diagonal().sum()) / n_pairs
        if student_local is None or n_l == 0:
            return global_part, global_part.new_zeros(())
        lsm_l = F.log_softmax(student_local.float() / self.student_temp, dim=-1)
        local_part = -torch.einsum("tbk,sbk->", t, lsm_l) / t.shape[1] / n_pairs
        return global_part, local_part
