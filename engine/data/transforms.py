"""Spectral-safe geometric transforms on C×H×W images of any band count and dtype.

Everything here acts on each band identically and never combines bands: crops, resizes, flips and
90° rotations (the dihedral group D4; overhead imagery has no canonical "up"). Photometric
augmentation lives in :mod:`engine.data.photometric`.

Data flow inside a loader worker, per crop:

1. ``arr`` is the decoded (C, H, W) array, a view of the tar member's buffer;
2. the crop box and the dihedral element are *views* of it (no pixels touched);
3. one copy converts the selected bands of the view to float32 (``to_float``);
4. bilinear resize with antialiasing (``resize``) in float, so uint16 radiometry is not truncated
   by integer interpolation (uint8 crops without worker-side photometrics resize in uint8);
5. ``cast_back`` rounds and clamps to the source dtype, so only uint8/uint16 (1-2 bytes/pixel, not
   4) crosses the worker -> main process boundary; float conversion, photometric augmentation on
   the device (``--data.augment_on device``) and normalisation happen on the training device
   (:mod:`engine.data.normalize`).

Randomness comes from a ``numpy.random.Generator`` the caller seeds per batch, so a resumed
stream reproduces the augmentations of the original run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]  # (top, left, height, width) in source pixels


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype matching a numpy dtype (uint16 included)."""
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def random_resized_box(rng: np.random.Generator, h: int, w: int, scale: Sequence[float], ratio: Sequence[float]) -> Box:
    """Inception-style crop box: area fraction ~ U(scale), aspect ~ log-U(ratio); 10 tries, then
    the largest centred box within ``ratio``."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def center_box(h: int, w: int, crop_pct: float) -> Box:
    """Centred square of side ``crop_pct * min(h, w)``: "resize the short side to size/crop_pct,
    then centre-crop size" done as one crop + one resize."""
    side = max(1, int(round(min(h, w) * crop_pct)))
    return (h - side) // 2, (w - side) // 2, side, side


def random_dihedral(rng: np.random.Generator) -> int:
    """One of the 8 elements of D4: bits 0-1 = number of 90° turns, bit 2 = horizontal flip."""
    return int(rng.integers(0, 8))


def crop_view(arr: np.ndarray, box: Box, dihedral: int = 0) -> np.ndarray:
    """(C, H, W) -> (C, h, w) view of ``box`` after the dihedral element (strides only, no copy)."""
    top, left, ch, cw = box
    v = arr[:, top : top + ch, left : left + cw]
    if dihedral & 4:
        v = v[:, :, ::-1]
    turns = dihedral & 3
    if turns:
        v = np.rot90(v, k=turns, axes=(1, 2))
    return v


def select_bands(view: np.ndarray, bands: Sequence[int] | None) -> np.ndarray:
    """Keep ``bands`` (indices into C); a contiguous ascending run stays a view."""
    if bands is None:
        return view
    b = list(bands)
    if b == list(range(b[0], b[0] + len(b))):
        return view[b[0] : b[0] + len(b)]
    return view[b]


def to_float(view: np.ndarray) -> torch.Tensor:
    """Strided (C, h, w) view -> contiguous float32 tensor (the one pixel copy of a crop)."""
    return torch.from_numpy(np.ascontiguousarray(view, dtype=np.float32))


def to_tensor(view: np.ndarray) -> torch.Tensor:
    """Strided (C, h, w) view -> contiguous tensor in the source dtype (no float detour)."""
    return torch.from_numpy(np.ascontiguousarray(view))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float or uint8 (C, h, w) -> (C, size, size), bilinear, antialiased when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = x.shape[-2] > size or x.shape[-1] > size
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)[0]


def cast_back(x: torch.Tensor, dtype: np.dtype) -> torch.Tensor:
    """Float tensor -> the source dtype: integers are rounded and clamped to the dtype's range."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        x = x.round_().clamp_(float(info.min), float(info.max))
    return x.to(torch_dtype(dtype))


def crop_resize(
    arr: np.ndarray, box: Box, size: int, dihedral: int = 0, bands: Sequence[int] | None = None
) -> torch.Tensor:
    """Float32 (C', size, size) crop of ``arr`` (C', the selected bands), before any cast back."""
    return resize(to_float(select_bands(crop_view(arr, box, dihedral), bands)), size)


def crop_resize_native(
    arr: np.ndarray, box: Box, size: int, dihedral: int = 0, bands: Sequence[int] | None = None
) -> torch.Tensor:
    """Like :func:`crop_resize` but returned in the source dtype; skips the float round trip when
    the box already has the output size (e.g. eval on chips converted at the model's size), and
    resizes uint8 directly: torch's uint8 kernel is ~3x faster than float32 on a 224 px RGB crop
    (one thread, measured) and differs from rounding the float result by at most one level."""
    view = select_bands(crop_view(arr, box, dihedral), bands)
    if view.shape[-2:] == (size, size):
        return to_tensor(view)
    if view.dtype == np.uint8:
        return resize(to_tensor(view), size)
    return cast_back(resize(to_float(view), size), arr.dtype)


class RandomResizedCrop:
    """Random-resized crop + random D4 element, output in the source dtype.

    ``size``: output side (pixels); ``scale``: area fraction range; ``ratio``: aspect range;
    ``dihedral``: draw flips/90° rotations (else identity). Call with (C, H, W) array and rng.
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float],
        ratio: Sequence[float],
        dihedral: bool,
        bands: Sequence[int] | None = None,
    ):
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.dihedral, self.bands = dihedral, bands

    def params(self, arr: np.ndarray, rng: np.random.Generator) -> tuple[Box, int]:
        box = random_resized_box(rng, arr.shape[1], arr.shape[2], self.scale, self.ratio)
        return box, (random_dihedral(rng) if self.dihedral else 0)

    def __call__(self, arr: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        box, k = self.params(arr, rng)
        return crop_resize_native(arr, box, self.size, k, self.bands)


class CenterCrop:
    """Deterministic eval view: centre square of ``crop_pct`` of the short side, resized to ``size``."""

    def __init__(self, size: int, crop_pct: float, bands: Sequence[int] | None = None):
        self.size, self.crop_pct, self.bands = int(size), float(crop_pct), bands

    def __call__(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        box = center_box(arr.shape[1], arr.shape[2], self.crop_pct)
        return crop_resize_native(arr, box, self.size, 0, self.bands)
