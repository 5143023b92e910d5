"""Device-side float conversion, photometric augmentation and per-band normalisation.

Loader batches carry images in the source dtype (uint8/uint16/...), 2-4x fewer bytes than float32
through worker queues, pinned memory and the host->device copy. On the training device,
:func:`to_device` copies each tensor with ``non_blocking=True`` and :class:`Normalizer` converts to
float32 and applies, per band c::

    invalid = (x == nodata) | isnan(x) # of the values as they arrived
    x = augment(x)                     # photometric ops, when the batch carries their parameters
    x = clamp(x, p2[c], p98[c])        # only with clip=True
    x = (x - mean[c]) / std[c]
    x[invalid] = 0                     # the band mean, i.e. "no information"

``mean``/``std``/``p2``/``p98`` come from the manifest's ``stats`` (computed by the converter over
valid pixels), for the bands the run keeps (``--data.bands``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from engine.data.photometric import PARAMS_SUFFIX, Photometric
from engine.errors import UserError

IMAGE_KEYS = ("global_crops", "local_crops", "images")
# std below this (a constant band) would blow values up; treat the band as unit-scaled instead.
_MIN_STD = 1e-6


def to_float32(x: torch.Tensor) -> torch.Tensor:
    """Any dtype -> float32. uint16 goes through an int32 bit view where a backend lacks the
    direct uint16 conversion (uint16 is a "limited support" dtype in PyTorch)."""
    if x.dtype == torch.uint16:
        try:
            return x.to(torch.float32)
        except RuntimeError:
            return uint16_bits_to_float32(x)
    return x.to(torch.float32)


def uint16_bits_to_float32(x: torch.Tensor) -> torch.Tensor:
    """uint16 -> float32 using only int16/int32 kernels (reinterpret, widen, mask the sign)."""
    return x.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).to(torch.float32)


class Normalizer:
    """Per-band ``(clip(x) - mean) / std`` on (..., C, H, W) tensors of any dtype; output float32.

    mean, std: (C,) band statistics in source units; clip_low/clip_high: optional (C,) bounds
    (the manifest's p2/p98); nodata: source value marking missing pixels (set to 0 after
    normalising).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        clip_low: Sequence[float] | None = None,
        clip_high: Sequence[float] | None = None,
        nodata: float | None = None,
    ):
        if len(mean) != len(std):
            raise UserError(f"normalization: {len(mean)} means but {len(std)} stds; give one of each per band")
        if (clip_low is None) != (clip_high is None):
            raise UserError("normalization: give both clip bounds (p2 and p98) or neither")
        self.mean = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        self.std = torch.tensor([max(float(s), _MIN_STD) for s in std], dtype=torch.float32)
        self.clip_low = None if clip_low is None else torch.tensor([float(v) for v in clip_low])
        self.clip_high = None if clip_high is None else torch.tensor([float(v) for v in clip_high])
        self.nodata = None if nodata is None else float(nodata)
        self._cache: dict[torch.device, tuple] = {}

    @property
    def num_bands(self) -> int:
        return int(self.mean.numel())

    @classmethod
    def from_manifest(
        cls,
        manifest: Mapping,
        bands: Sequence[int] | None = None,
        clip: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> Normalizer:
        """Stats of ``bands`` (None = all) from ``manifest["stats"]``; ``mean``/``std`` override them
        (already restricted to the kept bands). ``clip`` clamps to the manifest's p2/p98 first."""
        stats = manifest.get("stats") or {}
        idx = list(range(int(manifest.get("num_bands") or len(stats.get("mean") or []))))
        if bands is not None:
            bad = [b for b in bands if not 0 <= b < len(idx)]
            if bad:
                raise UserError(f"--data.bands: index {bad[0]} out of range for {len(idx)} bands in the manifest")
            idx = list(bands)

        def pick(name: str, flag: str) -> list[float]:
            vals = stats.get(name)
            if not isinstance(vals, list) or any(b >= len(vals) for b in idx) or any(vals[b] is None for b in idx):
                raise UserError(
                    f"{flag}: the manifest has no per-band '{name}' statistics; "
                    "re-run the converter with statistics or give them explicitly"
                )
            return [float(vals[b]) for b in idx]

        mean = list(mean) if mean is not None else pick("mean", "--data.mean")
        std = list(std) if std is not None else pick("std", "--data.std")
        if len(mean) != len(idx) or len(std) != len(idx):
            raise UserError(
                f"--data.mean/--data.std: need {len(idx)} values (one per kept band), got {len(mean)} and {len(std)}"
            )
        lo = hi = None
        if clip:
            lo, hi = pick("p2", "--data.clip_percentiles"), pick("p98", "--data.clip_percentiles")
        return cls(mean, std, lo, hi, manifest.get("nodata"))

    def _on(self, device: torch.device) -> tuple:
        if device not in self._cache:

            def move(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t.to(device).view(-1, 1, 1)

            self._cache[device] = (move(self.mean), move(self.std), move(self.clip_low), move(self.clip_high))
        return self._cache[device]

    def __call__(self, x: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x: (..., C, H, W) any dtype on any device -> float32 normalised, same shape and device.
        augment: applied to the float32 values in source units before clipping and normalising."""
        if x.shape[-3] != self.num_bands:
            raise ValueError(f"normalizer has {self.num_bands} bands, batch has {x.shape[-3]}")
        mean, std, lo, hi = self._on(x.device)
        # Convert first: uint16 has few kernels on CUDA, and every 8/16-bit value (and any nodata
        # value in that range) is exact in float32, so comparisons after the cast are exact.
        y = to_float32(x)
        if y.data_ptr() == x.data_ptr():
            y = y.clone()  # already float32: never modify the caller's tensor
        invalid = None
        if self.nodata is not None and self.nodata == self.nodata:
            invalid = y == self.nodata
        if x.is_floating_point():
            nan = torch.isnan(y)
            invalid = nan if invalid is None else invalid | nan
        if augment is not None:
            y = augment(y)
        # In place: on a (B, C, 224, 224) batch each extra temporary costs a pass over memory.
        if lo is not None:
            y.clamp_(lo, hi)
        y.sub_(mean).div_(std)
        if invalid is not None:
            y = y.masked_fill_(invalid, 0.0)
        return y


def to_device(
    batch: Mapping[str, torch.Tensor],
    device: torch.device | str,
    normalizer: Normalizer | None = None,
    photometric: Photometric | None = None,
) -> dict:
    """Copy a loader batch to ``device`` (``non_blocking``; the loader pins memory on CUDA hosts),
    then turn image keys (``global_crops``/``local_crops``/``images``) into normalised float32 there.

    When the batch carries photometric parameters (``<key>_photometric``, the loader's
    ``augment_on=device`` path), ``photometric`` (the loader's ``.photometric``) applies them to the
    crops of ``<key>`` between the float conversion and the normalisation; the parameter keys are
    consumed. Other tensors (``masks`` bool, ``labels`` long) are copied unchanged; non-tensors
    pass through. Without a normalizer, images are only converted to float32 (and augmented).
    """
    device = torch.device(device)
    out = {}
    for k, v in batch.items():
        if k.endswith(PARAMS_SUFFIX):
            continue
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k in IMAGE_KEYS:
                augment = _augmenter(batch.get(k + PARAMS_SUFFIX), photometric, device, k)
                if normalizer is not None:
                    v = normalizer(v, augment)
                else:
                    v = to_float32(v)
                    v = augment(v.clone()) if augment is not None else v  # never modify the caller's tensor
        out[k] = v
    return out


def _augmenter(
    params: torch.Tensor | None, photometric: Photometric | None, device: torch.device, key: str
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if params is None:
        return None
    if photometric is None:
        raise ValueError(
            f"the batch carries photometric parameters for '{key}' but no photometric was given; "
            "pass the loader's .photometric to to_device"
        )
    p = params.to(device, non_blocking=True)
    return lambda y: photometric.apply(y, p)
