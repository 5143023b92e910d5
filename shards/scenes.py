"""Pixel functions for the demo's two synthetic domains (``generate_archive(pixel_fn=...)``).

- **Source domain** (:func:`photo_pixels`), the stand-in for natural photos the base model is
  pre-trained on: smooth colour fields with a few flat-coloured discs and soft edges, and no
  fine texture at all.
- **Target domain** (:func:`overhead_pixels`), the "satellite" scenes: every class shares the same
  colour and brightness distribution, and classes differ *only* in texture at the scale of a ViT
  patch (period 14-24 px against a 14 px patch): row crops (oriented stripes), orchards (a dot
  lattice), forest (blotchy canopy) and bare soil (smooth). A model whose features were shaped by
  the smooth source domain has little reason to encode these textures; extended pre-training on the
  target domain (without its labels) can teach it to. Rotations and flips do not change a class,
  so the data pipeline's dihedral augmentation stays label-preserving.
"""

from __future__ import annotations

import numpy as np

from shards.synthetic import smooth_field

OVERHEAD_CLASSES = ("bare_soil", "forest", "orchard", "row_crops")


def _colour(rng: np.random.Generator, c: int) -> np.ndarray:
    """(C,) base colour in [60, 190] DN, the same distribution for every class."""
    return rng.uniform(60.0, 190.0, size=c).astype(np.float32)


def photo_pixels(rng: np.random.Generator, class_index: int, c: int, h: int, w: int) -> np.ndarray:
    """(C, H, W) float32 in [0, 255]: smooth per-band fields + 1-3 flat discs (objects)."""
    img = np.stack([_colour(rng, 1)[0] * (0.6 + 0.8 * smooth_field(rng, h, w, cells=3)) for _ in range(c)])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.12, 0.35) * min(h, w)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[:, inside] = _colour(rng, c)[:, None]
    return np.clip(img, 0, 255)


PERIOD_PX = (14.0, 24.0)
"""Texture period range (pixels) of the patterned classes."""


def _texture(rng: np.random.Generator, kind: int, h: int, w: int) -> np.ndarray:
    """(H, W) zero-mean, unit-RMS texture of class ``kind`` (0 is smooth: all zeros)."""
    if kind == 0:
        return np.zeros((h, w), np.float32)
    lo, hi = PERIOD_PX
    if kind == 1:  # canopy: smooth noise with blobs about half a period across
        t = smooth_field(rng, h, w, cells=max(2, int(round(4 * min(h, w) / (lo + hi)))))
    else:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta, period = rng.uniform(0, np.pi), rng.uniform(lo, hi)
        u = (np.cos(theta) * xx + np.sin(theta) * yy) * 2 * np.pi / period + rng.uniform(0, 2 * np.pi)
        if kind == 3:
            t = np.sin(u)
        else:
            v = (-np.sin(theta) * xx + np.cos(theta) * yy) * 2 * np.pi / period + rng.uniform(0, 2 * np.pi)
            t = np.sin(u) * np.sin(v)
    t = t - t.mean()
    return (t / (t.std() + 1e-6)).astype(np.float32)


def overhead_pixels(rng: np.random.Generator, class_index: int, c: int, h: int, w: int) -> np.ndarray:
    """(C, H, W) float32 in [0, 255]: base colour x smooth field x (1 + a * class texture)."""
    base = _colour(rng, c)[:, None, None] * (0.75 + 0.5 * smooth_field(rng, h, w, cells=3))[None]
    amp = rng.uniform(0.3, 0.5)
    tex = _texture(rng, class_index % len(OVERHEAD_CLASSES), h, w)
    return np.clip(base * (1.0 + amp * tex[None]), 0, 255)
