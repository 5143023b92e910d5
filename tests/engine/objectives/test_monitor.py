"""The collapse monitor: values, and warnings only on every warn_every-th call."""

import logging

import torch

from engine.objectives.monitor import CollapseMonitor


def test_collapsed_features_warn_on_schedule_not_at_start(caplog):
    mon = CollapseMonitor(warn_every=3)
    same = torch.ones(8, 16)
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        vals = mon(None, student_cls=same)
    assert vals["student_cls_feature_std"] < 1e-6 and not caplog.records
    mon(None, student_cls=same)
    assert any("student_cls_feature_std" in r.getMessage() for r in caplog.records)


def test_varied_features_do_not_warn(caplog):
    mon = CollapseMonitor(warn_every=1)
    caplog.set_level(logging.WARNING)
    vals = mon(torch.softmax(torch.randn(32, 10), -1), student_cls=torch.randn(32, 16))
    assert vals["student_cls_feature_std"] > 0.5 and not caplog.records
