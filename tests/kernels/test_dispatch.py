"""kernels.dispatch logs a backend's first use, but never while torch.compile traces (a graph break)."""

import logging

import pytest
import torch

from kernels import dispatch

LOGGER = "kernels.dispatch"


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """auto backends, nothing logged yet, no environment override."""
    monkeypatch.delenv("GEOEXPLORA_KERNELS", raising=False)
    monkeypatch.delenv("GEOEXPLORA_ATTENTION", raising=False)
    monkeypatch.setattr(dispatch, "_configured", {"lora_linear": "auto", "attention": "auto"})
    monkeypatch.setattr(dispatch, "_logged", set())


def _attention():
    q = torch.randn(1, 2, 5, 8)
    return dispatch.attention(q, q, q)


def _lora_linear():
    x, w, b, a, bb = torch.randn(3, 8), torch.randn(6, 8), torch.randn(6), torch.randn(2, 8), torch.randn(6, 2)
    return dispatch.lora_linear(x, w, b, a, bb, 0.5)


def _records(caplog):
    return [r for r in caplog.records if r.name == LOGGER and "backend" in r.getMessage()]


@pytest.mark.parametrize("call, op", [(_attention, "attention"), (_lora_linear, "lora_linear")])
def test_first_use_log_waits_for_a_call_outside_compilation(fresh_dispatch, monkeypatch, caplog, call, op):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    call()
    call()
    assert _records(caplog) == []
    assert dispatch._logged == set()

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    call()
    call()
    records = _records(caplog)
    assert len(records) == 1
    assert op in records[0].getMessage() and "cpu" in records[0].getMessage()
