"""kernels.verify: the command that fills the kernel record (its plumbing, on CPU under the interpreter)."""

import json

import pytest
import torch

from kernels import record, verify


def test_interpret_run_checks_parity_and_writes_a_record(tmp_path, capsys):
    path = tmp_path / "kernels.json"
    other = {"device": "NVIDIA H200", "capability": [9, 0], "torch": "x", "triton": "y"}
    path.write_text(json.dumps(record.merge_entries({}, other, {"some|class": {"passed": True, "speedup": 2.0}}, "t")))
    assert verify.main(["--interpret", "--record", str(path)]) == 0
    data = json.loads(path.read_text())
    assert record.machine_key(other) in data["machines"]  # other machines' entries survive
    ((key, machine),) = [(k, m) for k, m in data["machines"].items() if k != record.machine_key(other)]
    assert machine["device"] == "cpu (Triton interpreter)"
    entries = machine["entries"]
    assert sum(c.startswith("lora_linear|float32|") for c in entries) == 4  # qkv(q,v), proj, fc1, fc2
    assert sum(c.startswith("attention|float32|") for c in entries) == 1
    for cls, e in entries.items():
        assert e["passed"] and e["max_rel_err"] < 1e-5 and e["kernel_ms"] > 0 and e["baseline_ms"] > 0, cls
    assert "wrote" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_a_gpu_it_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        verify.main(["--record", str(tmp_path / "k.json")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA device") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "k.json").exists()
