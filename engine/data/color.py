"""DINOv2's photometric augmentations, for 3-band RGB crops only (float (3, H, W) tensors).

Colour jitter (brightness, contrast, saturation, hue in random order), grayscale and solarize mix
or re-weight bands, which would corrupt the spectral signature of multispectral data, so the
multi-crop transform applies them only when a crop has exactly 3 bands. Gaussian blur is spatial
and per band; :func:`gaussian_blur` is usable on any band count (``--crops.blur_all_bands``).

Values are handled on a ``[0, scale]`` range: ``scale`` is the data's white point (255 for uint8,
the manifest's max for 16-bit RGB) so that clamping and the solarize threshold (scale / 2) mean
what they mean for 8-bit images.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, H, W) ITU-R 601 luma."""
    return (_LUMA[0] * x[0] + _LUMA[1] * x[1] + _LUMA[2] * x[2])[None]


def _blend(a: torch.Tensor, b: torch.Tensor, f: float) -> torch.Tensor:
    """f * a + (1 - f) * b, clamped to [0, 1]."""
    return (f * a + (1.0 - f) * b).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: float) -> torch.Tensor:
    return (x * f).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: float) -> torch.Tensor:
    return _blend(x, _gray(x).mean(), f)


def adjust_saturation(x: torch.Tensor, f: float) -> torch.Tensor:
    return _blend(x, _gray(x), f)


# RGB <-> YIQ (NTSC): Y is luma, (I, Q) the chroma plane. A hue shift is a rotation of (I, Q).
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def hue_matrix(shift: float) -> torch.Tensor:
    """3x3 RGB->RGB matrix rotating hue by ``shift`` turns in the YIQ chroma plane."""
    c, s = math.cos(2 * math.pi * shift), math.sin(2 * math.pi * shift)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return _YIQ2RGB @ rot @ _RGB2YIQ


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (in [-0.5, 0.5]), keeping luma.

    A chroma rotation in YIQ: one 3x3 matrix per image instead of the HSV round trip
    torchvision uses (6x cheaper on 224 px crops, which dominated RGB multi-crop time). It
    differs from an HSV hue shift in how saturated colours clip, not in what it does.
    """
    m = hue_matrix(shift).to(x.dtype)
    return torch.mm(m, x.reshape(3, -1)).reshape(x.shape).clamp_(0.0, 1.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return _gray(x).expand(3, -1, -1).contiguous()


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable per-band Gaussian blur of float (C, H, W); reflect padding, radius ceil(3 sigma)."""
    radius = min(int(math.ceil(3.0 * sigma)), x.shape[-1] - 1, x.shape[-2] - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


class RGBAugment:
    """DINOv2's per-crop photometric pipeline on float (3, H, W) values in ``[0, scale]``.

    ``jitter_p``: probability of ColorJitter(0.4, 0.4, 0.2, 0.1); ``gray_p``: RandomGrayscale;
    ``blur_p``: Gaussian blur with sigma ~ U(0.1, 2); ``solarize_p``: solarization.
    DINOv2 uses (0.8, 0.2, 1.0, 0) for global crop 1, (0.8, 0.2, 0.1, 0.2) for global crop 2 and
    (0.8, 0.2, 0.5, 0) for local crops.
    """

    brightness, contrast, saturation, hue = 0.4, 0.4, 0.2, 0.1

    def __init__(self, jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float = 0.0,
                 solarize_p: float = 0.0):
        self.jitter_p, self.gray_p, self.blur_p, self.solarize_p = jitter_p, gray_p, blur_p, solarize_p

    def jitter(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        for op in rng.permutation(4):
            if op == 0:
                x = adjust_brightness(x, rng.uniform(1 - self.brightness, 1 + self.brightness))
            elif op == 1:
                x = adjust_contrast(x, rng.uniform(1 - self.contrast, 1 + self.contrast))
            elif op == 2:
                x = adjust_saturation(x, rng.uniform(1 - self.saturation, 1 + self.saturation))
            else:
                x = adjust_hue(x, rng.uniform(-self.hue, self.hue))
        return x

    def __call__(self, x: torch.Tensor, rng: np.random.Generator, scale: float) -> torch.Tensor:
        """x: float (3, H, W) in [0, scale] -> same shape and range."""
        x = (x / scale).clamp_(0.0, 1.0)
        if rng.random() < self.jitter_p:
            x = self.jitter(x, rng)
        if rng.random() < self.gray_p:
            x = grayscale(x)
        if rng.random() < self.blur_p:
            x = gaussian_blur(x, rng.uniform(0.1, 2.0))
        if rng.random() < self.solarize_p:
            x = solarize(x)
        return x * scale
