"""A small labelled shard set with one sub-directory per split whose two classes differ in
brightness (easy on purpose: these tests check that the machinery learns and counts right, not
that a method is good)."""

from pathlib import Path

import numpy as np
import pytest


def two_level_pixels(rng, class_index, c, h, w):
    """(C, H, W): class 0 dark, class 1 bright, plus per-pixel noise."""
    return (70.0 + 110.0 * class_index) + 20.0 * rng.standard_normal((c, h, w)).astype(np.float32)


def write_labelled_splits(root: Path, sizes: dict[str, int], per_shard: int = 16) -> Path:
    """Generate and convert one 32 px archive per split into ``root/shards/<split>``; returns ``root/shards``."""
    from shards.convert import run_convert
    from shards.synthetic import generate_archive

    for seed, (split, n) in enumerate(sizes.items(), start=5):
        generate_archive(root / "src" / split, n, 32, classes=["dark", "bright"], pixel_fn=two_level_pixels, seed=seed)
        run_convert(
            [
                str(root / "src" / split),
                "-o",
                str(root / "shards" / split),
                "--labels",
                "folder",
                "--max-samples-per-shard",
                str(per_shard),
            ]
        )
    return root / "shards"


@pytest.fixture(scope="session")
def labelled_shards(tmp_path_factory):
    return write_labelled_splits(tmp_path_factory.mktemp("labelled"), {"train": 48, "val": 24})
