"""DINOv2's photometric augmentation for any dtype and band count, drawn in the loader workers and
applied there or on the training device (``--data.augment_on``).

Parameters are drawn per crop in the worker, from the batch's generator (so they follow from the
step and the sample, and exact resume holds), and packed into one float32 row per crop
(:meth:`Photometric.draw`). :meth:`Photometric.apply` runs the ops of a stack of such rows on a
stack of crops -- in the worker one crop at a time before the cast back to the source dtype, on the
device all crops of a batch at once, after the host->device copy and before normalisation
(:func:`~engine.data.normalize.to_device`). Both paths run the same code on the same parameters.

What a crop gets depends on its band count:

- **colour** (3 bands, ``--crops.rgb_augment``): DINOv2's recipe (``dinov2/data/augmentations.py``):
  ColorJitter(0.4, 0.4, 0.2, 0.1) in random order with p 0.8, grayscale p 0.2, Gaussian blur
  sigma ~ U(0.1, 2) with p 1.0 / 0.1 / 0.5 (global crop 1 / global crop 2 / local crops), and
  solarize p 0.2 on global crop 2 only.
- **spectral** (other band counts, ``--crops.spectral_jitter shared|per_band``): brightness and
  contrast jitter (0.4, 0.4; p 0.8, random order) as SSL4EO-S12's DINO/MoCo recipe for 13-band
  Sentinel-2 (``RandomBrightness``/``RandomContrast`` in ``src/benchmark/pretrain_ssl``): one
  brightness factor for all bands (band ratios kept) and contrast about each band's own mean;
  ``per_band`` draws both factors independently per band (ratios change). No grayscale or
  solarize, which would mix or invert bands. Blur only with ``--crops.blur_all_bands``.
- **none** (default for non-RGB): geometry only, as SatMAE (``util/datasets.py``: random-resized
  crop and flip for Sentinel-2), keeping spectral ratios; ``--crops.blur_all_bands`` adds DINOv2's
  blur, applied in source units.

Colour and spectral ops act on values in the unit range given by :class:`BandRange`: ``[0, 255]``
for uint8 (DINOv2's meaning of brightness, contrast and the solarize threshold 0.5), and each
band's robust ``[p2, p98]`` from the manifest for every other dtype. Values outside are clipped
there, so a colour- or spectrally-augmented crop lies within ``[p2, p98]`` per band and its
normalised values within ``[(p2 - mean) / std, (p98 - mean) / std]`` (the white point used to be
the manifest's max: one saturated pixel at 24,147 against a p98 of 8,621 turned normalised global
crops of a Landsat scene into std 3.6 with 16 % of values beyond |z| = 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.data.color import bandwise_step, colour_matrices, colour_step, gaussian_blur, grayscale, solarize

PARAMS_SUFFIX = "_photometric"  # batch key of a crop stack's parameter rows: "global_crops_photometric"

JITTER = (0.4, 0.4, 0.2, 0.1)  # ColorJitter(brightness, contrast, saturation, hue), DINOv2 and SSL4EO
SIGMA = (0.1, 2.0)  # Gaussian blur sigma range (pixels), DINOv2

# Row layout: jitter order (4 op codes, -1 = no jitter), saturation, hue, grayscale flag, blur sigma
# (0 = none), solarize flag, then brightness and contrast per band.
_ORDER, _SAT, _HUE, _GRAY, _SIGMA, _SOLAR, _BANDS = slice(0, 4), 4, 5, 6, 7, 8, 9
# On CPU, crops are augmented in chunks of about this many float32 bytes: the ops are memory-bound,
# and a chunk that stays in cache ran 2-3x faster per crop than the whole 64 x 224 px batch at once
# (one thread; chunks of 4-16 global or 16 local crops measured best).
_CPU_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class CropKind:
    """Probabilities of one kind of crop (DINOv2 values below)."""

    jitter_p: float
    gray_p: float
    blur_p: float
    solarize_p: float


GLOBAL_1 = CropKind(0.8, 0.2, 1.0, 0.0)
GLOBAL_2 = CropKind(0.8, 0.2, 0.1, 0.2)
LOCAL = CropKind(0.8, 0.2, 0.5, 0.0)


class BandRange:
    """Per-band ``[lo, hi]`` mapped to ``[0, 1]`` for the photometric ops (module docstring).

    lo, hi: (C,) values of the kept bands in source units; None = uint8 data without a manifest
    (0 and 255 for every band)."""

    def __init__(self, lo: Sequence[float] | None = None, hi: Sequence[float] | None = None):
        if (lo is None) != (hi is None):
            raise ValueError("give both band bounds or neither")
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        if lo is not None and hi is not None:
            if any(float(h) <= float(v) for v, h in zip(lo, hi)):
                raise ValueError(f"every band needs hi > lo, got {list(lo)} and {list(hi)}")
            self.lo = torch.tensor([float(v) for v in lo], dtype=torch.float32)
            self.hi = torch.tensor([float(h) for h in hi], dtype=torch.float32)

    def _bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            return torch.zeros((), device=x.device), torch.full((), 255.0, device=x.device)
        if self.lo.numel() != x.shape[1]:
            raise ValueError(f"band range has {self.lo.numel()} bands, the crops have {x.shape[1]}")
        return self.lo.to(x.device).view(1, -1, 1, 1), self.hi.to(x.device).view(1, -1, 1, 1)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds(x)
        return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds(u)
        return u.mul_(hi - lo).add_(lo)


class Photometric:
    """Draws and applies the photometric augmentation of one run (module docstring).

    band_range: unit range of the colour/spectral ops; rgb: the colour recipe on 3-band crops;
    spectral: jitter of other band counts ('none', 'shared' or 'per_band'); blur_all_bands:
    DINOv2's blur on non-colour crops too; nodata: the manifest's nodata value (see
    :meth:`augment_crop`).
    """

    def __init__(
        self,
        band_range: BandRange,
        rgb: bool = True,
        spectral: str = "none",
        blur_all_bands: bool = False,
        nodata: float | None = None,
    ):
        if spectral not in ("none", "shared", "per_band"):
            raise ValueError(f"spectral jitter {spectral!r} is not 'none', 'shared' or 'per_band'")
        self.range, self.rgb, self.spectral, self.blur_all_bands = band_range, rgb, spectral, blur_all_bands
        self.nodata = nodata

    def mode(self, bands: int) -> str | None:
        """'colour', 'spectral', 'blur' (source units) or None for crops with ``bands`` bands."""
        if bands == 3 and self.rgb:
            return "colour"
        if self.spectral != "none":
            return "spectral"
        return "blur" if self.blur_all_bands else None

    def draw(self, rng: np.random.Generator, kind: CropKind, bands: int) -> np.ndarray | None:
        """One crop's parameter row (float32, 9 + 2 * bands), or None when no op applies."""
        mode = self.mode(bands)
        if mode is None:
            return None
        row = np.zeros(_BANDS + 2 * bands, dtype=np.float32)
        row[_ORDER] = -1
        row[_BANDS:] = 1.0
        b, c, s, h = JITTER
        if mode == "colour":
            if rng.random() < kind.jitter_p:
                row[_ORDER] = rng.permutation(4)
                row[_BANDS : _BANDS + bands] = rng.uniform(1 - b, 1 + b)
                row[_BANDS + bands :] = rng.uniform(1 - c, 1 + c)
                row[_SAT] = rng.uniform(1 - s, 1 + s)
                row[_HUE] = rng.uniform(-h, h)
            row[_GRAY] = rng.random() < kind.gray_p
        elif mode == "spectral" and rng.random() < kind.jitter_p:
            row[0:2] = rng.permutation(2)
            n = bands if self.spectral == "per_band" else 1
            row[_BANDS : _BANDS + bands] = rng.uniform(1 - b, 1 + b, n)
            row[_BANDS + bands :] = rng.uniform(1 - c, 1 + c, n)
        if (mode == "colour" or self.blur_all_bands) and rng.random() < kind.blur_p:
            row[_SIGMA] = rng.uniform(*SIGMA)
        if mode == "colour":
            row[_SOLAR] = rng.random() < kind.solarize_p
        return row

    def augment_crop(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The worker path: one float (C, H, W) crop and its (9 + 2C,) row. Pixels equal to
        ``nodata`` keep it, so the normaliser still finds them after augmentation; on the device
        path the normaliser takes them from the values as they arrived instead."""
        if self.nodata is None or self.nodata != self.nodata:
            return self.apply(x[None], params[None])[0]
        out = self.apply(x[None].clone(), params[None])[0]
        return torch.where(x == self.nodata, x, out)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x: float (N, C, H, W) in source units; params: (N, 9 + 2C) rows from :meth:`draw`, on
        x's device. Returns the augmented crops in source units (x may be modified in place)."""
        mode = self.mode(x.shape[1])
        if mode is None or x.shape[0] == 0:
            return x
        chunk = max(1, _CPU_CHUNK_BYTES // (x[0].numel() * 4))
        if x.device.type == "cpu" and x.shape[0] > chunk:
            for i in range(0, x.shape[0], chunk):
                x[i : i + chunk] = self._apply(mode, x[i : i + chunk], params[i : i + chunk])
            return x
        return self._apply(mode, x, params)

    def _apply(self, mode: str, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        sigma = params[:, _SIGMA]
        if mode == "blur":
            return _where(x, sigma > 0, lambda v, i: gaussian_blur(v, sigma[i]))
        u = self.range.to_unit(x)
        c = x.shape[1]
        bright, contrast = params[:, _BANDS : _BANDS + c], params[:, _BANDS + c :]
        order = params[:, _ORDER]

        def jitter(v: torch.Tensor, i) -> torch.Tensor:
            if mode == "colour":
                mats = colour_matrices(bright[i], contrast[i, 0], params[i, _SAT], params[i, _HUE])
                for k in range(4):
                    v = colour_step(v, order[i, k], mats, contrast[i, 0])
            else:
                for k in range(2):
                    v = bandwise_step(v, order[i, k], bright[i], contrast[i])
            return v

        u = _where(u, order[:, 0] >= 0, jitter)
        if mode == "colour":
            u = _where(u, params[:, _GRAY] > 0, lambda v, i: grayscale(v))
        u = _where(u, sigma > 0, lambda v, i: gaussian_blur(v, sigma[i]))
        if mode == "colour":
            u = _where(u, params[:, _SOLAR] > 0, lambda v, i: solarize(v))
        return self.range.from_unit(u)


def _where(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """``fn(x[i], i)`` written back at the crops ``i`` where ``mask`` holds (no copy when all do)."""
    if bool(mask.all()):
        return fn(x, slice(None))
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    x[idx] = fn(x[idx], idx)
    return x
