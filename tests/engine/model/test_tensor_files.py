"""Tensor files: a safetensors file written twice from the same tensors and metadata is the same
bytes, in another process too (the library's header order follows a hash map), and reads back."""

import subprocess
import sys

import torch

from engine.model.tensor_files import read_safetensors, safetensors_bytes, write_safetensors

_SCRIPT = """
import hashlib, sys, torch
from engine.model.tensor_files import safetensors_bytes
t = {f"w{i}": torch.arange(i + 3, dtype=torch.float32) for i in range(5)}
meta = {f"key_{i}": str(i) for i in range(12)}
sys.stdout.write(hashlib.sha256(safetensors_bytes(t, meta)).hexdigest())
"""


def test_same_tensors_same_bytes_across_processes():
    digests = {
        subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True).stdout
        for _ in range(4)
    }
    assert len(digests) == 1


def test_canonical_file_reads_back(tmp_path):
    t = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.ones(1, dtype=torch.bfloat16)}
    meta = {"z": "last", "a": '{"x": 1}', "m": "middle"}
    data = safetensors_bytes(t, meta)
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0 and data[8 : 8 + n].decode().rstrip(" ").startswith('{"__metadata__":{"a"')
    got, got_meta = read_safetensors(write_safetensors(t, tmp_path / "f.safetensors", meta))
    assert got_meta == meta and got.keys() == t.keys()
    for k in t:
        assert torch.equal(got[k], t[k]) and got[k].dtype == t[k].dtype
