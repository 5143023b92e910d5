"""Helpers for converter tests: run a conversion in-process, read shards back with plain tarfile
(tests/faults imports them too)."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shards.convert import convert_parser, options_from_args
from shards.pipeline import convert


def run(inputs, out, *flags, on_shard=None):
    """Convert like the CLI would (same parser), in this process; returns the Summary."""
    argv = [str(i) for i in ([inputs] if not isinstance(inputs, (list, tuple)) else inputs)]
    opts = options_from_args(convert_parser().parse_args(argv + ["--out", str(out), *map(str, flags)]))
    return convert(opts, on_shard=on_shard)


def read_samples(out):
    """{key: (array, meta)} over every shard listed in the manifest, plus the manifest."""
    m = json.loads((Path(out) / "manifest.json").read_text())
    samples = {}
    for s in m["shards"]:
        with tarfile.open(Path(out) / s["name"]) as tar:
            members = {}
            for info in tar:
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for key, mem in members.items():
            assert key not in samples, f"duplicate key {key}"
            samples[key] = (np.load(io.BytesIO(mem["img.npy"])), json.loads(mem["json"]))
    return samples, m


@pytest.fixture
def run_convert():
    return run


@pytest.fixture
def read_shards():
    return read_samples
