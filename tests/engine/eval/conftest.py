"""A small labelled two-split shard set whose two classes differ in brightness (easy on purpose:
these tests check the machinery learns, not that a method is good)."""
import numpy as np
import pytest


def _pixels(rng, class_index, c, h, w):
    level = 70.0 if class_index == 0 else 180.0
    return level + 20.0 * rng.standard_normal((c, h, w)).astype(np.float32)


@pytest.fixture(scope="session")
def labelled_shards(tmp_path_factory):
    from shards.convert import run_convert
    from shards.synthetic import generate_archive

    root = tmp_path_factory.mktemp("labelled")
    for split, n, seed in (("train", 48, 5), ("val", 24, 6)):
        generate_archive(root / "src" / split, n, 32, classes=["dark", "bright"], pixel_fn=_pixels, seed=seed)
        run_convert([str(root / "src" / split), "-o", str(root / "shards" / split), "--labels", "folder",
                     "--max-samples-per-shard", "16"])
    return root / "shards"
