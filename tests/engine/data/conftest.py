"""Fixtures for the data-pipeline tests: tiny shard archives written in the binding format."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_shards import write_shards


@pytest.fixture
def shard_dir(tmp_path):
    """Factory: ``shard_dir(name, **write_shards kwargs) -> Path`` of a fresh archive."""

    def make(name: str = "ds", **kw) -> Path:
        root = tmp_path / name
        write_shards(root, **kw)
        return root

    return make
