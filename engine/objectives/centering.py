"""Teacher target normalisation against collapse: Sinkhorn-Knopp (DINOv2) and the running center (DINO).

Both turn teacher prototype scores into target distributions and both need statistics over the
GLOBAL batch, so every cross-rank sum goes through an injected ``all_reduce`` (sum over ranks,
identity by default; the trainer passes ``engine.trainer.collectives.all_reduce_sum``). Every rank
must call these functions in the same order, also a rank that holds zero rows this step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def identity_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Single-process stand-in for a sum over ranks."""
    return t


@torch.no_grad()
def sinkhorn_knopp(
    logits: torch.Tensor,
    temp: float,
    all_reduce: AllReduce = identity_all_reduce,
    n_iterations: int = 3,
) -> torch.Tensor:
    """Equipartitioned soft assignments of N samples (over all ranks) to K prototypes.

    logits: (N_local, K) teacher scores. Returns (N_local, K) float32, each row a distribution.
    Starts from Q = exp(logits / temp) like DINOv2 (scores are gain * cosine, the prototype gain
    starting at 1, so fp32 cannot overflow while |gain| / temp < 88) and alternates, as DINOv2
    does, a prototype step (every prototype gets total mass 1/K, summed over all ranks) and a
    sample step (every sample gets 1/N_total). The column sums are local, so only K + 2 numbers
    cross ranks per iteration.
    """
    q = torch.exp(logits.float() / temp).t()  # K x N
    k = q.shape[0]
    n_total = all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n_total
    q *= n_total
    return q.t()


class RunningCenter(nn.Module):
    """DINO's centering: subtract an EMA of the mean teacher score before the softmax.

    ``center`` (1, K) is a buffer (saved with the objective, identical on every rank because its
    update is all-reduced). The center used at step t covers teacher outputs of steps < t, like
    DINO/DINOv2 (which apply the asynchronous update at the next call).
    """

    center: torch.Tensor  # (1, K) buffer

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def targets(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        """logits: (N, K) -> softmax((logits - center) / temp) as float32 (N, K)."""
        return torch.softmax((logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, all_reduce: AllReduce = identity_all_reduce) -> None:
        """Fold the mean of ``logits`` (N_local, K) over all ranks into the center."""
        total = all_reduce(logits.float().sum(dim=0, keepdim=True))
        count = all_reduce(torch.tensor(float(logits.shape[0]), device=logits.device))
        # no .item(): a host sync per step costs more than this arithmetic; an empty global
        # batch leaves the center unchanged (keep = 1)
        keep = torch.where(count > 0, self.momentum, 1.0)
        new = self.center.float() * keep + (1.0 - keep) * total / count.clamp(min=1.0)
        self.center.copy_(new)


class TeacherTargetLoss(nn.Module):
    """Base of the DINO and iBOT losses: the student temperature and the teacher targets,
    Sinkhorn-Knopp (DINOv2) or softmax around a running-mean center (DINO).

    out_dim: K prototypes. centering: 'sinkhorn_knopp' | 'centering'. The running center exists in
    both modes so checkpoints have one layout (state key ``center.center``).
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
        """teacher_logits: (N, K) teacher scores of this rank -> target distributions (N, K) fp32.

        Sinkhorn-Knopp equipartitions over the rows of ALL ranks (N may be 0 on a rank). With
        'centering' the center is updated with this batch AFTER computing the targets.
        """
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, all_reduce, self.sinkhorn_iterations)
        probs = self.center.targets(teacher_logits, teacher_temp)
        self.center.update(teacher_logits, all_reduce)
        return probs
