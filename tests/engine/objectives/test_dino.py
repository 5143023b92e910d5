"""DinoObjective end to end on a tiny ViT: interface, logs, EMA, optimisation, state."""

import pytest
import torch

from engine.config import DinoConfig
from engine.objectives.dino import DinoObjective
from tests.engine.objectives.conftest import train_steps

B = 4


def _batch(seed: int, local: bool = True, masks: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"global_crops": torch.randn(2 * B, 3, 42, 42, generator=g)}
    if local:
        out["local_crops"] = torch.randn(2 * B, 3, 28, 28, generator=g)
    if masks:
        m = torch.rand(2 * B, 9, generator=g) < 0.4
        m[0, 0] = True
        out["masks"] = m
    return out


def _objective(tiny_vit, seed: int = 0, **over) -> DinoObjective:
    torch.manual_seed(seed)
    kw = dict(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16)
    kw.update(over)
    return DinoObjective(tiny_vit(), DinoConfig(**kw), total_steps=100)


def test_forward_logs_each_term_as_floats(tiny_vit):
    obj = _objective(tiny_vit)
    loss, logs = obj(_batch(0), step=0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    for k in (
        "loss",
        "dino_global",
        "dino_local",
        "ibot",
        "koleo",
        "teacher_temp",
        "momentum",
        "teacher_entropy",
        "teacher_mean_entropy",
        "student_cls_feature_std",
        "teacher_cls_feature_std",
    ):
        assert isinstance(logs[k], float), k
    c = obj.cfg
    total = (
        c.dino_loss_weight * (logs["dino_global"] + logs["dino_local"])
        + c.ibot_loss_weight * logs["ibot"]
        + c.koleo_loss_weight * logs["koleo"]
    )
    assert logs["loss"] == pytest.approx(total, rel=1e-5)
    assert logs["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert 0.0 <= logs["teacher_mean_entropy"] <= 1.0 + 1e-6


def test_gradients_reach_only_trainable_tensors(tiny_vit):
    obj = _objective(tiny_vit)
    loss, _ = obj(_batch(1), step=0)
    loss.backward()
    names = {n for n, _ in obj.trainable_parameters()}
    assert {"mask_token", "dino_head.prototypes", "vit.norm.weight"} <= names
    assert not any(n.startswith("vit.patch_embed") for n in names)
    for n, p in obj.named_parameters():
        if n in names:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n


def test_on_step_end_moves_the_ema_of_trainable_tensors_only(tiny_vit):
    obj = _objective(tiny_vit, momentum_teacher=0.5, final_momentum_teacher=0.5)
    opt = torch.optim.SGD([p for _, p in obj.trainable_parameters()], lr=0.5)
    loss, _ = obj(_batch(2), step=0)  # first teacher pass initialises the EMA = student
    ema0 = [e.clone() for e in obj.teacher.ema]
    loss.backward()
    opt.step()
    obj.on_step_end(0)
    moved = [not torch.equal(a, b) for a, b in zip(ema0, obj.teacher.ema)]
    assert any(moved)
    for a, b, p in zip(ema0, obj.teacher.ema, obj.teacher.params):
        torch.testing.assert_close(b, 0.5 * a + 0.5 * p.detach())
    assert set(obj.teacher.names) == {n for n, _ in obj.trainable_parameters()} - {"mask_token"}


def test_optimisation_reduces_the_loss(tiny_vit):
    obj = _objective(tiny_vit, momentum_teacher=0.9)
    hist = train_steps(obj, _batch(3), steps=6, lr=2e-3)
    assert hist[-1]["loss"] < 0.9 * hist[0]["loss"]
    assert hist[-1]["dino_global"] < hist[0]["dino_global"]
    assert hist[-1]["ibot"] < hist[0]["ibot"]


def test_centering_mode_separate_head_and_minimal_batch(tiny_vit):
    obj = _objective(tiny_vit, centering="centering", ibot_separate_head=True, koleo_loss_weight=0.0)
    assert obj.ibot_head is not None
    loss, logs = obj(_batch(4), step=0)
    loss.backward()
    assert obj.ibot_head.prototypes.grad is not None
    assert obj.dino_loss.center.center.abs().sum() > 0 and obj.ibot_loss.center.center.abs().sum() > 0
    assert "koleo" not in logs
    # two global crops only: no locals, no masks
    loss, logs = obj(_batch(5, local=False, masks=False), step=1)
    assert logs["dino_local"] == 0.0 and "ibot" not in logs and torch.isfinite(loss)
    # masks present but nothing masked on this rank: iBOT contributes 0, still finite
    batch = _batch(5)
    batch["masks"][:] = False
    loss, logs = obj(batch, step=2)
    assert logs["ibot"] == 0.0 and logs["masked_patches"] == 0.0 and torch.isfinite(loss)


def test_teacher_temperature_warmup(tiny_vit):
    obj = _objective(tiny_vit, warmup_teacher_temp_steps=10)
    _, logs = obj(_batch(6), step=0)
    assert logs["teacher_temp"] == pytest.approx(0.04)
    _, logs = obj(_batch(6), step=5)
    assert logs["teacher_temp"] == pytest.approx(0.055)


def test_prototype_layer_frozen_for_n_steps_as_dinov2(tiny_vit):
    """DINOv2's last_layer_lr schedule: the prototype layer (direction and gain) keeps lr 0 for
    freeze_last_layer_steps optimizer steps while its gradient still flows; then it trains."""
    from engine.config import OptimConfig
    from engine.trainer.deepspeed_setup import param_groups
    from engine.trainer.schedules import OptimSchedule

    obj = _objective(tiny_vit, freeze_last_layer_steps=2, ibot_separate_head=True)
    frozen = {n for n, _ in obj.trainable_parameters() if obj.frozen_steps(n)}
    assert frozen == {
        "dino_head.prototypes",
        "dino_head.prototype_gain",
        "ibot_head.prototypes",
        "ibot_head.prototype_gain",
    }
    groups = param_groups(obj.trainable_parameters(), frozen_steps=obj.frozen_steps)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    sched = OptimSchedule.from_config(OptimConfig(lr=1e-2, lr_scaling="none", weight_decay=0.1), 32, 10)
    for step in range(3):
        before = {n: p.detach().clone() for n, p in obj.named_parameters() if p.requires_grad}
        sched.apply(opt.param_groups, step)
        loss, _ = obj(_batch(10 + step), step=step)
        opt.zero_grad()
        loss.backward()
        assert obj.dino_head.prototypes.grad.abs().sum() > 0  # DINOv2 lets the gradient flow
        opt.step()
        moved = {n for n, p in obj.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
        assert "dino_head.mlp.0.weight" in moved
        if step < 2:
            assert not moved & frozen, step
        else:
            assert frozen <= moved


def test_prototype_gain_trains_like_dinov2_weight_g(tiny_vit):
    """weight_g of DINOv2's weight-normed last layer starts at 1 and trains (DINO v1 pinned it)."""
    obj = _objective(tiny_vit)
    head = obj.dino_head
    assert head.prototype_gain.requires_grad and torch.equal(head.prototype_gain, torch.ones(64, 1))
    z = torch.randn(5, 64)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 64, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(head.prototype_gain * 1.7)
        ref.parametrizations.weight.original1.copy_(head.prototypes)
        head.prototype_gain.mul_(1.7)
    bottleneck = torch.nn.functional.normalize(head.mlp(z), dim=-1)
    torch.testing.assert_close(head(z), ref(bottleneck))
    hist_before = head.prototype_gain.detach().clone()
    train_steps(obj, _batch(3), steps=2, lr=1e-2)
    assert not torch.equal(head.prototype_gain, hist_before)


def test_state_dict_carries_the_teacher(tiny_vit):
    obj = _objective(tiny_vit, momentum_teacher=0.0, final_momentum_teacher=0.0)
    opt = torch.optim.SGD([p for _, p in obj.trainable_parameters()], lr=0.5)
    loss, _ = obj(_batch(7), step=0)
    loss.backward()
    opt.step()
    obj.on_step_end(0)
    sd = obj.state_dict()
    assert "_extra_state" in sd and "dino_loss.center.center" in sd
    other = _objective(tiny_vit, seed=1)
    other.load_state_dict(sd)
    x = _batch(8)
    with torch.no_grad():
        _, a = obj(x, step=1)
        _, b = other(x, step=1)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_rejects_batch_not_divisible_by_global_crops(tiny_vit):
    obj = _objective(tiny_vit)
    with pytest.raises(ValueError, match="multiple"):
        obj({"global_crops": torch.randn(3, 3, 42, 42)}, step=0)
