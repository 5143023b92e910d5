"""The kernel record and how ``auto`` uses it: Triton only where a record for this device model,
these versions and this shape class says the kernel passed and was faster (fake records, no GPU)."""

import json
import logging

import pytest
import torch

from kernels import dispatch, record

H200 = {"device": "NVIDIA H200", "capability": [9, 0], "torch": torch.__version__, "triton": "3.8.0"}
QV = record.lora_class(16448, 1024, 3072, 64, 2, torch.bfloat16)
ATTN = record.attention_class(257, 64, torch.bfloat16)


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """dispatch sees a CUDA device that ``record.device_info`` describes as H200; returns a writer
    for the record file."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv(record.RECORD_ENV, str(path))
    for var in ("GEOEXPLORA_KERNELS", "GEOEXPLORA_ATTENTION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dispatch, "_configured", {"lora_linear": "auto", "attention": "auto"})
    monkeypatch.setattr(dispatch, "_records", {})
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setattr(record, "device_info", lambda device: dict(H200))

    def write(entries, info=H200):
        path.write_text(json.dumps(record.merge_entries(record.load_record(path), info, entries, "now")))
        dispatch._records.clear()

    return write


CUDA0 = torch.device("cuda", 0)


def _entry(passed=True, speedup=1.4):
    return {"passed": passed, "speedup": speedup, "kernel_ms": 1.0, "baseline": "torch", "baseline_ms": speedup}


def test_shape_classes():
    assert QV == "lora_linear|bfloat16|K1024|N3072|S2|r<=64|M<32k"
    assert record.lora_class(2056, 1024, 1024, 8, 1, torch.bfloat16).endswith("|S1|r<=8|M<4k")
    assert record.lora_class(65792, 768, 3072, 4, 1, torch.float16).endswith("|r<=8|M>=32k")
    assert record.attention_class(257, 64, torch.bfloat16) == "attention|bfloat16|D64|N<=512"
    assert record.attention_class(50, 64, torch.bfloat16) == "attention|bfloat16|D64|N<=64"


def test_auto_picks_triton_only_where_the_record_says_passed_and_faster(machine):
    machine({QV: _entry(), ATTN: _entry()})
    assert dispatch.resolve("lora_linear", CUDA0, QV) == "triton"
    assert dispatch.resolve("attention", CUDA0, ATTN) == "triton"
    other = record.lora_class(16448, 1024, 4096, 64, 1, torch.bfloat16)  # fc1: no entry
    assert dispatch.resolve("lora_linear", CUDA0, other) == "torch"
    assert dispatch.resolve("lora_linear", torch.device("cpu"), QV) == "torch"  # never on CPU


@pytest.mark.parametrize(
    "entry", [_entry(passed=False), _entry(speedup=1.01), _entry(speedup=0.7), {"speedup": 2.0}, "garbage"]
)
def test_failed_slower_or_malformed_entries_keep_the_default(machine, entry):
    machine({QV: entry, ATTN: entry})
    assert dispatch.resolve("lora_linear", CUDA0, QV) == "torch"
    assert dispatch.resolve("attention", CUDA0, ATTN) == "sdpa"


@pytest.mark.parametrize(
    "field, value",
    [("device", "NVIDIA A100-SXM4-80GB"), ("capability", [8, 0]), ("torch", "2.0.0"), ("triton", "3.0.0")],
)
def test_a_record_for_another_device_or_version_does_not_count(machine, field, value):
    machine({QV: _entry()}, info={**H200, field: value})
    assert dispatch.resolve("lora_linear", CUDA0, QV) == "torch"


def test_forcing_still_wins_over_the_record(machine, monkeypatch):
    machine({QV: _entry(passed=False)})
    dispatch.set_backend("lora_linear", "triton")
    assert dispatch.resolve("lora_linear", CUDA0, QV) == "triton"
    monkeypatch.setenv("GEOEXPLORA_KERNELS", "torch")
    assert dispatch.resolve("lora_linear", CUDA0, QV) == "torch"


def test_unreadable_record_means_no_kernel_and_one_warning(machine, tmp_path, caplog):
    (tmp_path / "kernels.json").write_text("{not json")
    caplog.set_level(logging.WARNING)
    assert dispatch.resolve("lora_linear", CUDA0, QV) == "torch"
    assert dispatch.resolve("lora_linear", CUDA0, QV) == "torch"  # read once per process
    assert sum("cannot read the kernel record" in r.getMessage() for r in caplog.records) == 1


def test_merge_keeps_other_machines_and_older_entries(tmp_path):
    a100 = {**H200, "device": "NVIDIA A100", "capability": [8, 0]}
    data = record.merge_entries({}, a100, {QV: _entry(speedup=1.2)}, "t0")
    data = record.merge_entries(data, H200, {QV: _entry(speedup=1.5)}, "t1")
    data = record.merge_entries(data, H200, {ATTN: _entry(passed=False)}, "t2")
    h200 = data["machines"][record.machine_key(H200)]
    assert h200["entries"][QV]["speedup"] == 1.5 and h200["written"] == "t2" and ATTN in h200["entries"]
    assert data["machines"][record.machine_key(a100)]["entries"][QV]["speedup"] == 1.2


def test_record_path_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv(record.RECORD_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert record.record_path() == tmp_path / "geoexplora" / "kernels.json"
    monkeypatch.setenv(record.RECORD_ENV, str(tmp_path / "mine.json"))
    assert record.record_path() == tmp_path / "mine.json"
