"""iBOT block masks: shape, per-crop ratio within the range, masked fraction, group layout."""

import numpy as np
import pytest

from engine.data.masking import BlockMaskGenerator, ibot_masks


@pytest.mark.parametrize("grid", [(8, 8), (16, 16), (6, 10)])
def test_block_mask_hits_target_without_exceeding(grid):
    gen = BlockMaskGenerator(grid)
    rng = np.random.default_rng(0)
    n = grid[0] * grid[1]
    for target in (0, 3, n // 4, n // 2):
        m = gen(target, rng)
        assert m.shape == grid and m.sum() <= target
        assert m.sum() >= 0.75 * target  # blocks fill the budget closely


def test_ibot_masks_ratio_range_and_probability():
    rng = np.random.default_rng(1)
    n_crops, grid, lo, hi = 64, (14, 14), 0.1, 0.5
    m = ibot_masks(n_crops, grid, (lo, hi), 0.5, rng)
    assert m.shape == (64, 196) and m.dtype.is_floating_point is False
    frac = m.float().mean(dim=1)
    masked = frac > 0
    assert int(masked.sum()) == 32  # int(64 * 0.5) crops masked, the rest empty
    assert float(frac[masked].max()) <= hi and float(frac[masked].min()) >= 0.75 * lo
    assert 0.2 <= float(frac[masked].mean()) <= 0.32  # stratified over [0.1, 0.5]: mean near 0.3
    assert not bool(masked[:32].all())  # masked crops are shuffled among the batch


def test_group_channel_masks_are_group_major():
    rng = np.random.default_rng(2)
    m = ibot_masks(8, (4, 4), (0.5, 0.5), 1.0, rng, num_groups=3).view(8, 3, 16)
    per_group = m.sum(dim=2)
    assert (per_group <= 8).all() and (per_group >= 6).all()
    assert any(not bool((m[i, 0] == m[i, 1]).all()) for i in range(8))  # independent per group
    c = ibot_masks(8, (4, 4), (0.5, 0.5), 1.0, rng, num_groups=3, consistent_groups=True).view(8, 3, 16)
    assert bool((c[:, 0] == c[:, 1]).all() and (c[:, 1] == c[:, 2]).all())
