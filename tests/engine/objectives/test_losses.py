"""Each loss / target rule against a plain loop-by-loop reference on fixed small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from engine.objectives.centering import RunningCenter, sinkhorn_knopp
from engine.objectives.dino_clstoken_loss import DINOClsLoss
from engine.objectives.dino_head import DINOHead
from engine.objectives.ibot_patch_loss import IBOTPatchLoss
from engine.objectives.koleo_loss import koleo_loss
from engine.objectives.schedules import cosine_schedule, linear_schedule, momentum_schedule, teacher_temperature


def ref_sinkhorn(logits, temp, iters):
    """Textbook Sinkhorn: prototype marginals 1/K, sample marginals 1/N, rows rescaled to sum 1."""
    P = torch.exp(logits.double() / temp)
    P = P / P.sum()
    N, K = P.shape
    for _ in range(iters):
        for k in range(K):
            P[:, k] = P[:, k] / P[:, k].sum() / K
        for n in range(N):
            P[n] = P[n] / P[n].sum() / N
    return (P * N).float()


def ref_ce(t, s, temp):
    """-sum_k t_k log softmax(s / temp)_k for one sample, computed with explicit exp/log."""
    z = s.double() / temp
    logp = z - math.log(sum(math.exp(v) for v in z.tolist()))
    return -float((t.double() * logp).sum())


@pytest.mark.parametrize("iters", [1, 3])
def test_sinkhorn_matches_reference(iters):
    g = torch.Generator().manual_seed(0)
    logits = torch.rand(6, 5, generator=g) * 2 - 1
    out = sinkhorn_knopp(logits, 0.1, n_iterations=iters)
    torch.testing.assert_close(out, ref_sinkhorn(logits, 0.1, iters), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(6))
    # run to convergence: every prototype gets the same total mass N / K
    conv = sinkhorn_knopp(logits, 0.3, n_iterations=200)
    torch.testing.assert_close(conv.sum(dim=0), torch.full((5,), 6 / 5), rtol=1e-3, atol=1e-3)


def test_sinkhorn_empty_rank_is_safe():
    out = sinkhorn_knopp(torch.zeros(0, 4), 0.1)
    assert out.shape == (0, 4)


def test_running_center_matches_reference():
    g = torch.Generator().manual_seed(1)
    c = RunningCenter(4, momentum=0.8)
    c.center.copy_(torch.tensor([[0.1, -0.2, 0.3, 0.0]]))
    x = torch.randn(5, 4, generator=g)
    probs = c.targets(x, 0.5)
    ref = torch.softmax((x - torch.tensor([[0.1, -0.2, 0.3, 0.0]])) / 0.5, dim=-1)
    torch.testing.assert_close(probs, ref)
    c.update(x)
    torch.testing.assert_close(c.center, 0.8 * torch.tensor([[0.1, -0.2, 0.3, 0.0]]) + 0.2 * x.mean(0, keepdim=True))


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_dino_cross_entropy_matches_pairwise_reference(centering):
    g = torch.Generator().manual_seed(2)
    n_g, n_l, B, K, st = 2, 3, 4, 7, 0.1
    loss = DINOClsLoss(K, student_temp=st, centering=centering)
    teacher_logits = torch.rand(n_g * B, K, generator=g) * 2 - 1
    t = loss.teacher_targets(teacher_logits, 0.05).view(n_g, B, K)
    if centering == "sinkhorn_knopp":
        torch.testing.assert_close(t.reshape(-1, K), ref_sinkhorn(teacher_logits, 0.05, 3), rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(t.reshape(-1, K), torch.softmax(teacher_logits / 0.05, -1))
        torch.testing.assert_close(loss.center.center, 0.1 * teacher_logits.mean(0, keepdim=True))
    s_g = torch.randn(n_g, B, K, generator=g)
    s_l = torch.randn(n_l, B, K, generator=g)
    glob, loc = loss(s_g, s_l, t)

    pairs_g, pairs_l = [], []
    for si in range(n_g):
        for ti in range(n_g):
            if si != ti:  # a view is never its own target
                pairs_g.append(sum(ref_ce(t[ti, b], s_g[si, b], st) for b in range(B)) / B)
    for si in range(n_l):
        for ti in range(n_g):
            pairs_l.append(sum(ref_ce(t[ti, b], s_l[si, b], st) for b in range(B)) / B)
    n_pairs = len(pairs_g) + len(pairs_l)
    assert glob.item() == pytest.approx(sum(pairs_g) / n_pairs, rel=1e-5)
    assert loc.item() == pytest.approx(sum(pairs_l) / n_pairs, rel=1e-5)


def test_dino_cross_entropy_without_local_crops():
    g = torch.Generator().manual_seed(3)
    loss = DINOClsLoss(5)
    t = torch.softmax(torch.randn(3, 2, 5, generator=g), -1)
    s = torch.randn(3, 2, 5, generator=g)
    glob, loc = loss(s, None, t)
    ref = [sum(ref_ce(t[ti, b], s[si, b], 0.1) for b in range(2)) / 2 for si in range(3) for ti in range(3) if si != ti]
    assert glob.item() == pytest.approx(sum(ref) / 6, rel=1e-5)
    assert loc.item() == 0.0


def test_ibot_loss_weights_each_image_equally():
    g = torch.Generator().manual_seed(4)
    N, L, K, st = 4, 6, 5, 0.1
    masks = torch.zeros(N, L, dtype=torch.bool)
    masks[0, [0, 2, 5]] = True
    masks[1, [1]] = True
    masks[3, [0, 1, 2, 3, 4, 5]] = True  # image 2 unmasked: counts in N, contributes nothing
    M = int(masks.sum())
    s = torch.randn(M, K, generator=g)
    t = torch.softmax(torch.randn(M, K, generator=g), -1)
    out = IBOTPatchLoss(K, student_temp=st)(s, t, masks)

    total, j = 0.0, 0
    for i in range(N):
        m_i = int(masks[i].sum())
        for _ in range(m_i):
            total += ref_ce(t[j], s[j], st) / m_i
            j += 1
    assert out.item() == pytest.approx(total / N, rel=1e-5)


def test_ibot_teacher_targets_sinkhorn_over_masked_patches():
    g = torch.Generator().manual_seed(5)
    logits = torch.rand(9, 4, generator=g) * 2 - 1
    out = IBOTPatchLoss(4).teacher_targets(logits, 0.07)
    torch.testing.assert_close(out, ref_sinkhorn(logits, 0.07, 3), rtol=1e-5, atol=1e-6)


def test_koleo_matches_brute_force_reference():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 5, generator=g)
    z = x.double() / x.double().norm(dim=1, keepdim=True)
    ref = 0.0
    for i in range(7):
        d = min(float((z[i] - z[j]).norm()) for j in range(7) if j != i)
        ref += -math.log(d)
    assert koleo_loss(x).item() == pytest.approx(ref / 7, rel=1e-4)
    # spreading the batch lowers the loss
    assert koleo_loss(torch.eye(5)).item() < koleo_loss(torch.eye(5) + 0.9).item()


def test_koleo_single_sample_is_zero_and_differentiable():
    x = torch.randn(1, 4, requires_grad=True)
    out = koleo_loss(x)
    out.backward()
    assert out.item() == 0.0 and x.grad is not None


def test_dino_head_scores_are_gain_times_cosine():
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=11, hidden_dim=16, bottleneck_dim=4, nlayers=3)
    x = torch.randn(5, 8)
    y = head(x)
    assert y.shape == (5, 11) and y.abs().max() <= 1.0 + 1e-6  # gain starts at 1: cosines
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(y, z @ F.normalize(head.prototypes, dim=-1).t())
    with torch.no_grad():
        head.prototype_gain.copy_(torch.linspace(0.5, 2.0, 11)[:, None])
    torch.testing.assert_close(head(x), z @ F.normalize(head.prototypes, dim=-1).t() * torch.linspace(0.5, 2.0, 11))
    head(x).sum().backward()
    assert head.prototypes.grad is not None and head.prototype_gain.grad is not None


def test_schedules():
    assert cosine_schedule(0, 100, 0.992, 1.0) == pytest.approx(0.992)
    assert cosine_schedule(50, 100, 0.992, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(100, 100, 0.992, 1.0) == 1.0 and cosine_schedule(500, 100, 0.992, 1.0) == 1.0
    assert linear_schedule(25, 100, 0.0, 1.0) == pytest.approx(0.25)
    vals = [momentum_schedule("cosine", s, 100, 0.99, 1.0) for s in range(101)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == teacher_temperature(99, 0, 0.04, 0.07) == 0.07
    with pytest.raises(ValueError):
        momentum_schedule("step", 0, 10, 0.9, 1.0)
