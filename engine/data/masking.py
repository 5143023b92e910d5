"""iBOT block masks over the global crops' patch grid (BEiT-style blockwise masking, as in DINOv2).

Per batch of N global crops, ``int(N * probability)`` crops are masked; their target ratios are
spread over ``ratio`` (stratified: crop i draws from the i-th of equal sub-intervals) so every
batch sees easy and hard masks; the rest get an empty mask; the assignment is shuffled.

A mask is built by dropping random rectangles (at least ``min_patches`` patches, aspect ratio
log-uniform in [min_aspect, 1/min_aspect]) until the target count is reached or no rectangle adds
new patches. For a group-channel model (G band groups sharing one spatial grid, tokens
group-major) each group gets its own block mask with the same ratio (``consistent_groups`` repeats
one spatial mask for all groups instead), so a crop's mask is (G*h*w,).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


class BlockMaskGenerator:
    """Block masks on an (h, w) patch grid.

    ``min_patches``: smallest rectangle (patches); ``min_aspect``: rectangle aspect range
    [min_aspect, 1/min_aspect].
    """

    def __init__(self, grid: tuple[int, int], min_patches: int = 4, min_aspect: float = 0.3):
        self.h, self.w = int(grid[0]), int(grid[1])
        self.min_patches = min_patches
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try up to 10 rectangles of <= ``budget`` new patches; returns patches newly masked."""
        for _ in range(10):
            area = rng.uniform(min(self.min_patches, budget), budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if not (0 < bh <= self.h and 0 < bw <= self.w):
                continue
            top = int(rng.integers(0, self.h - bh + 1))
            left = int(rng.integers(0, self.w - bw + 1))
            block = mask[top : top + bh, left : left + bw]
            new = bh * bw - int(block.sum())
            if 0 < new <= budget:
                block[...] = True
                return new
        return 0

    def __call__(self, num_patches: int, rng: np.random.Generator) -> np.ndarray:
        """(h, w) bool mask with about ``num_patches`` True (never more)."""
        mask = np.zeros((self.h, self.w), dtype=bool)
        target = min(int(num_patches), self.h * self.w)
        count = 0
        while count < target:
            added = self._add_block(mask, target - count, rng)
            if added == 0:
                break
            count += added
        return mask


def ibot_masks(
    n_crops: int,
    grid: tuple[int, int],
    ratio: Sequence[float],
    probability: float,
    rng: np.random.Generator,
    num_groups: int = 1,
    consistent_groups: bool = False,
    generator: BlockMaskGenerator | None = None,
) -> torch.Tensor:
    """Masks for ``n_crops`` global crops: bool (n_crops, num_groups * h * w), group-major tokens.

    ratio: (lo, hi) fraction of each group's h*w patches to mask; probability: fraction of crops
    that get a mask at all.
    """
    gen = generator or BlockMaskGenerator(grid)
    hw = gen.h * gen.w
    out = np.zeros((n_crops, num_groups, hw), dtype=bool)
    n_masked = int(n_crops * probability)
    edges = np.linspace(ratio[0], ratio[1], n_masked + 1)
    for i in range(n_masked):
        r = rng.uniform(edges[i], edges[i + 1])
        k = int(hw * r)
        if consistent_groups:
            out[i, :] = gen(k, rng).reshape(-1)
        else:
            for g in range(num_groups):
                out[i, g] = gen(k, rng).reshape(-1)
    out = out[rng.permutation(n_crops)]
    return torch.from_numpy(out.reshape(n_crops, num_groups * hw))
