"""Geometric transforms, colour ops and class labels."""

import numpy as np
import pytest
import torch

from engine.data import ClassIndex
from engine.data.color import HUE, SATURATION, colour_matrices, colour_step, gaussian_blur, grayscale
from engine.data.samples import CorruptSample
from engine.data.transforms import crop_view, random_resized_box
from engine.errors import UserError


def test_dihedral_group_has_eight_distinct_elements():
    arr = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    views = {crop_view(arr, (0, 0, 3, 3), k).tobytes() for k in range(8)}
    assert len(views) == 8
    assert np.shares_memory(crop_view(arr, (0, 0, 3, 3), 5), arr)  # a view, no pixel copy


def test_random_resized_box_in_bounds_and_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_box(rng, 40, 30, (0.2, 0.6), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 30
        assert 0.15 * 1200 <= h * w <= 0.65 * 1200


def _colour(x, op, factor):
    """One colour op with one factor on every crop of x (N, 3, H, W)."""
    n = x.shape[0]
    f = torch.full((n,), float(factor))
    return colour_step(x, torch.full((n,), float(op)), colour_matrices(f[:, None].expand(n, 3), f, f, f), f)


def test_colour_ops_identities():
    x = torch.rand(2, 3, 9, 7)
    assert torch.allclose(_colour(x, HUE, 0.0), x, atol=1e-5, rtol=0)
    mid = 0.4 + 0.2 * x  # no clipping: the rotation is exactly invertible and keeps luma
    shifted = _colour(mid.clone(), HUE, 0.1)
    assert not torch.allclose(shifted, mid, atol=1e-3)
    assert torch.allclose(_colour(shifted, HUE, -0.1), mid, atol=1e-5, rtol=0)
    assert torch.allclose(grayscale(shifted), grayscale(mid), atol=1e-5, rtol=0)
    assert torch.allclose(_colour(x, SATURATION, 1.0), x)
    g = grayscale(x)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    const = torch.full((2, 5, 12, 12), 7.0)
    assert torch.allclose(gaussian_blur(const, torch.tensor([1.5, 0.3])), const)


def test_class_index():
    ci = ClassIndex.from_manifest({"classes": ["forest", "river", "urban"]})
    assert ci({"label": "urban"}) == 2 and ci.num_classes == 3
    with pytest.raises(CorruptSample):
        ci({"label": "lake"})
    with pytest.raises(UserError, match="lists no classes"):
        ClassIndex.from_manifest({"classes": None})
    assert ClassIndex.from_manifest(None, ["b", "a"])({"label": "a"}) == 1
