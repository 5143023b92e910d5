import math

import pytest

from engine.config import OptimConfig
from engine.trainer.schedules import OptimSchedule, cosine, scaled_lr, warmup_cosine


def test_scaled_lr_rules():
    assert scaled_lr(1e-3, 256) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 1024) == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 1024, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 1024, "none") == pytest.approx(1e-3)
    # DINOv2's sqrt_wrt_1024 (dinov2/utils/config.py): base lr at 1024 images, sqrt in the batch;
    # ExPLoRA's 8/GPU x 32 accumulation x 4 GPUs = 1024 -> exactly the base lr 1e-3
    assert scaled_lr(1e-3, 8 * 32 * 4, "sqrt_wrt_1024") == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 256, "sqrt_wrt_1024") == pytest.approx(5e-4)
    assert scaled_lr(2e-4, 32 * 8 * 8, "sqrt_wrt_1024") == pytest.approx(2e-4 * math.sqrt(2))
    with pytest.raises(ValueError):
        scaled_lr(1e-3, 256, "cubic")


def test_warmup_then_cosine():
    peak, final, warm, total = 1.0, 0.1, 4, 14
    vals = [warmup_cosine(s, total, peak, final, warm) for s in range(total + 2)]
    assert vals[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # step 0 already moves the weights
    assert vals[4] == pytest.approx(peak)
    assert vals[9] == pytest.approx(final + (peak - final) * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert vals[14] == vals[15] == pytest.approx(final)
    assert all(a >= b for a, b in zip(vals[4:], vals[5:]))


def test_cosine_endpoints():
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(10, 10, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine(5, 10, 0.04, 0.4) == pytest.approx(0.22)


def test_optim_schedule_applies_groups():
    optim = OptimConfig(lr=1e-3, min_lr=1e-6, warmup_steps=2, weight_decay=0.04, weight_decay_end=0.4)
    sched = OptimSchedule.from_config(optim, global_batch=512, total_steps=10)
    assert sched.peak_lr == pytest.approx(2e-3)
    groups = [{"wd_mult": 1.0}, {"wd_mult": 0.0}, {"wd_mult": 1.0, "lr_mult": 0.5}]
    lr, wd = sched.apply(groups, 1)
    assert lr == pytest.approx(2e-3) and wd == pytest.approx(cosine(1, 10, 0.04, 0.4))
    assert groups[0]["weight_decay"] == pytest.approx(wd) and groups[1]["weight_decay"] == 0.0
    assert groups[2]["lr"] == pytest.approx(1e-3)
    # min_lr above the scaled peak is clamped, never a rising "decay"
    tiny = OptimSchedule.from_config(OptimConfig(lr=1e-6, min_lr=1e-3, lr_scaling="none"), 256, 10)
    assert tiny.min_lr == tiny.peak_lr


def test_frozen_group_has_lr_zero_until_its_step():
    """DINOv2's last_layer_lr schedule: 0 for the first N steps, the normal lr afterwards."""
    sched = OptimSchedule.from_config(OptimConfig(lr=1e-3, lr_scaling="none", warmup_steps=0), 1024, 10)
    groups = [{"wd_mult": 1.0, "frozen_until": 3}, {"wd_mult": 1.0, "lr_mult": 0.5, "frozen_until": 3}, {}]
    for step in range(5):
        lr, _ = sched.apply(groups, step)
        assert groups[2]["lr"] == pytest.approx(lr)
        assert groups[0]["lr"] == (0.0 if step < 3 else pytest.approx(lr))
        assert groups[1]["lr"] == (0.0 if step < 3 else pytest.approx(0.5 * lr))
