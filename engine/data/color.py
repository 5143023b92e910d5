"""Batched photometric operations on float crops ``x: (N, C, H, W)`` with per-crop parameters.

One implementation serves both places augmentation can run: a loader worker calls these with
N = 1 per crop, the training device with every crop of a batch at once
(:mod:`engine.data.photometric` draws the parameters and decides which ops apply). Values are in
the unit range ``[0, 1]`` (see :class:`~engine.data.photometric.BandRange`) except for
:func:`gaussian_blur`, which is linear and works in any units.

- Colour ops (3 bands): brightness, saturation and hue are 3x3 colour matrices, contrast a scale
  plus an offset; :func:`colour_step` applies one per crop as a batched matmul and clamps to
  [0, 1], as torchvision's ColorJitter does after each of its ops. Hue is a rotation of the YIQ
  chroma plane (one matrix instead of torchvision's HSV round trip: 6x cheaper on 224 px crops; it
  differs from an HSV hue shift only in how saturated colours clip).
- Band-wise ops (any band count): brightness and contrast per band as ``a * x + t``
  (:func:`bandwise_step`), never mixing bands.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # colour op codes (a crop's jitter order)

# RGB <-> YIQ (NTSC): Y is luma, (I, Q) the chroma plane.
_RGB2YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]], dtype=torch.float64
)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W)."""
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """(N,) hue shifts in turns -> (N, 3, 3) RGB->RGB matrices rotating the YIQ chroma plane."""
    a = 2 * math.pi * shift.to(torch.float64)
    rot = torch.zeros(shift.shape[0], 3, 3, dtype=torch.float64, device=shift.device)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(a), -torch.sin(a)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(a), torch.cos(a)
    yiq2rgb, rgb2yiq = _YIQ2RGB.to(shift.device), _RGB2YIQ.to(shift.device)
    return (yiq2rgb @ rot @ rgb2yiq).to(torch.float32)


def colour_matrices(
    brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor, hue: torch.Tensor
) -> torch.Tensor:
    """(N, 4, 3, 3): per crop the matrix of each colour op, indexed by its op code.

    brightness (N, 3) per-band factors; contrast, saturation (N,) factors; hue (N,) shift in turns.
    Contrast's matrix is the scale c * I; its offset (1 - c) * mean luma depends on the crop at the
    time the op runs and is added by :func:`colour_step`."""
    n = brightness.shape[0]
    eye = torch.eye(3, device=brightness.device).expand(n, 3, 3)
    gray = torch.tensor(LUMA, device=brightness.device).expand(3, 3)  # every output band = luma
    s = saturation.view(-1, 1, 1)
    return torch.stack(
        [torch.diag_embed(brightness), contrast.view(-1, 1, 1) * eye, s * eye + (1.0 - s) * gray, hue_matrices(hue)],
        dim=1,
    )


def colour_step(x: torch.Tensor, op: torch.Tensor, matrices: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """One jitter op per crop on (N, 3, H, W) in [0, 1], clamped to [0, 1] as torchvision's
    ColorJitter does after each op. op: (N,) op codes; matrices: (N, 4, 3, 3) from
    :func:`colour_matrices`; contrast: (N,) factors (contrast blends with the crop's mean luma,
    saturation with its luma image: torchvision's definitions)."""
    n = x.shape[0]
    code = op.long()
    m = matrices[torch.arange(n, device=x.device), code]
    y = torch.bmm(m, x.reshape(n, 3, -1))
    is_c = code == CONTRAST
    if bool(is_c.any()):
        mean_luma = x.mean(dim=(2, 3)) @ torch.tensor(LUMA, device=x.device)
        y.add_(torch.where(is_c, (1.0 - contrast) * mean_luma, torch.zeros_like(mean_luma)).view(n, 1, 1))
    return y.clamp_(0.0, 1.0).view_as(x)


def bandwise_step(x: torch.Tensor, op: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """One band-wise op per crop on (N, C, H, W) in [0, 1]: ``op`` BRIGHTNESS scales band c by
    ``brightness[:, c]``; CONTRAST moves band c away from its own crop mean by ``contrast[:, c]``;
    -1 keeps the crop. Clamped to [0, 1]. Bands are never mixed."""
    code = op.long().view(-1, 1)
    a = torch.where(code == BRIGHTNESS, brightness, torch.where(code == CONTRAST, contrast, torch.ones_like(contrast)))
    t = torch.where(code == CONTRAST, (1.0 - contrast) * x.mean(dim=(2, 3)), torch.zeros_like(contrast))
    return (x * a[:, :, None, None]).add_(t[:, :, None, None]).clamp_(0.0, 1.0)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> the luma image in all three bands."""
    return luma(x).expand(-1, 3, -1, -1).contiguous()


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert values at or above ``threshold`` (torchvision's solarize on [0, 1])."""
    return torch.where(x >= threshold, 1.0 - x, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable per-band Gaussian blur of (N, C, H, W) with a sigma per crop (N,); reflect padding.

    Crop n uses radius r_n = ceil(3 sigma_n), at most min(H, W) - 1 so reflect padding fits; all
    crops share the padding of the largest radius, with zero weights beyond their own, which gives
    each crop exactly the result of blurring it alone. A radius below 1 leaves the crop unchanged.
    Computed as 2(2R + 1) shifted multiply-adds: on one CPU thread a 224 px RGB crop takes 0.35-0.5
    ms this way against 5.5 ms for the same kernel as two grouped ``conv2d`` (measured, same run)."""
    n, c, h, w = x.shape
    radii = torch.ceil(3.0 * sigma.to(x.device, torch.float32)).clamp_(max=min(h, w) - 1).long()
    big = int(radii.max()) if n else 0
    if big < 1:
        return x
    t = torch.arange(-big, big + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma.to(x.device, x.dtype).clamp_min(1e-6)[:, None]) ** 2)
    k = k * (t[None].abs() <= radii[:, None])
    k[radii < 1] = (t == 0).to(x.dtype)  # identity kernel
    k = (k / k.sum(dim=1, keepdim=True)).view(n, 1, 1, 1, -1)
    y = F.pad(x, (big, big, big, big), mode="reflect")
    rows = y[..., :, 0:w] * k[..., 0]
    for i in range(1, 2 * big + 1):
        rows.addcmul_(y[..., :, i : i + w], k[..., i])
    out = rows[..., 0:h, :] * k[..., 0]
    for i in range(1, 2 * big + 1):
        out.addcmul_(rows[..., i : i + h, :], k[..., i])
    return out
