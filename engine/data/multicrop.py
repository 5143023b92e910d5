"""Per-sample views and their batch collation: DINOv2 multi-crop (+ iBOT masks), MAE crop, eval.

Each view is called in a loader worker as ``view(arr, rng) -> item`` on one decoded (C, H, W)
array and ``view.collate(items, rng) -> batch`` on a micro-batch; images stay in the source dtype
(see :mod:`engine.data.transforms`). Batches follow the data interface in CONVENTIONS.md:

- :class:`DinoMultiCrop`: ``global_crops`` (n_global*B, C, Hg, Wg) crop-major (crop g of sample b
  at g*B + b), ``local_crops`` (n_local*B, C, Hl, Wl) (absent when n_local == 0), ``masks``
  (n_global*B, G*(Hg/p)*(Wg/p)) bool iBOT masks;
- :class:`SingleCrop`: ``images`` (B, C, S, S) (MAE pre-training; supervised fine-tuning);
- :class:`EvalView`: ``images`` (B, C, S, S), deterministic centre crop;
- with labels (the pipeline adds ``item["label"]``): also ``labels`` (B,) long, or (B, C) float32
  multi-hot when the label function returns arrays (:class:`~engine.data.labels.MultiLabelIndex`).

Photometric augmentation follows DINOv2 per crop but only on 3-band crops; other band counts get
crops, resizes, flips and 90° rotations only (optionally the per-band blur).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from engine.data.color import RGBAugment, gaussian_blur
from engine.data.masking import BlockMaskGenerator, ibot_masks
from engine.data.transforms import CenterCrop, RandomResizedCrop, cast_back


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` that, inside a DataLoader worker, writes straight into shared memory:
    the batch then crosses to the main process without the extra copy that moving an ordinary
    tensor into shared memory at pickling time costs (what ``default_collate`` does too)."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first.untyped_storage()._new_shared(len(tensors) * first.numel() * first.element_size())
    out = first.new(storage).view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def _stack_labels(items: list[dict], batch: dict) -> dict:
    if items and "label" in items[0]:
        if isinstance(items[0]["label"], np.ndarray):  # multi-hot float32 (C,) -> (B, C)
            batch["labels"] = stack([torch.from_numpy(it["label"]) for it in items])
        else:
            batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return batch


class _AugmentedCrop:
    """One random-resized crop + D4 element + (RGB) photometric pipeline, returned in source dtype."""

    def __init__(self, rrc: RandomResizedCrop, rgb: Optional[RGBAugment], blur_p: float, white_point: float):
        self.rrc, self.rgb, self.blur_p, self.white_point = rrc, rgb, blur_p, white_point

    def __call__(self, arr: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        rgb = self.rgb is not None and self._bands(arr) == 3
        if not rgb and self.blur_p <= 0:
            return self.rrc(arr, rng)
        x = self.rrc.float_crop(arr, rng)
        if rgb:
            x = self.rgb(x, rng, self.white_point)
        elif rng.random() < self.blur_p:
            x = gaussian_blur(x, rng.uniform(0.1, 2.0))
        return cast_back(x, arr.dtype)

    def _bands(self, arr: np.ndarray) -> int:
        return len(self.rrc.bands) if self.rrc.bands is not None else arr.shape[0]


class DinoMultiCrop:
    """DINOv2 multi-crop: ``n_global`` global + ``n_local`` local crops, plus iBOT masks at collate.

    sizes in pixels; scales are area-fraction ranges; ``patch_size`` and ``num_groups`` define the
    mask grid (G * (global_size/p)^2 tokens); ``mask_ratio``/``mask_probability`` as in
    objective.dino; ``rgb_augment``: DINOv2 colour jitter/grayscale/blur/solarize on 3-band crops;
    ``blur_all_bands``: DINOv2's blur probabilities on non-RGB crops too; ``white_point``: the
    value treated as white by the colour ops (255 for uint8).
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_global: int = 2, n_local: int = 8,
                 global_scale: Sequence[float] = (0.32, 1.0), local_scale: Sequence[float] = (0.05, 0.32),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), dihedral: bool = True, rgb_augment: bool = True,
                 blur_all_bands: bool = False, white_point: float = 255.0, patch_size: int = 14,
                 num_groups: int = 1, mask_ratio: Sequence[float] = (0.1, 0.5), mask_probability: float = 0.5,
                 consistent_group_masks: bool = False, bands: Optional[Sequence[int]] = None):
        if global_size % patch_size:
            raise ValueError(f"global crop size {global_size} is not a multiple of patch size {patch_size}")
        self.n_global, self.n_local = n_global, n_local
        g_rrc = RandomResizedCrop(global_size, global_scale, ratio, dihedral, bands)
        l_rrc = RandomResizedCrop(local_size, local_scale, ratio, dihedral, bands)
        # DINOv2 recipe: global crop 1 always blurred; global crop 2 rarely blurred, sometimes solarized.
        g1 = RGBAugment(0.8, 0.2, 1.0, 0.0) if rgb_augment else None
        g2 = RGBAugment(0.8, 0.2, 0.1, 0.2) if rgb_augment else None
        loc = RGBAugment(0.8, 0.2, 0.5, 0.0) if rgb_augment else None
        self.global_views = [
            _AugmentedCrop(g_rrc, g1 if i == 0 else g2, (1.0 if i == 0 else 0.1) if blur_all_bands else 0.0,
                           white_point)
            for i in range(n_global)]
        self.local_view = _AugmentedCrop(l_rrc, loc, 0.5 if blur_all_bands else 0.0, white_point)
        self.grid = (global_size // patch_size, global_size // patch_size)
        self.mask_gen = BlockMaskGenerator(self.grid)
        self.num_groups, self.consistent = int(num_groups), consistent_group_masks
        self.mask_ratio, self.mask_probability = tuple(mask_ratio), float(mask_probability)

    def __call__(self, arr: np.ndarray, rng: np.random.Generator) -> dict:
        return {"global": [v(arr, rng) for v in self.global_views],
                "local": [self.local_view(arr, rng) for _ in range(self.n_local)]}

    def collate(self, items: list[dict], rng: np.random.Generator) -> dict:
        b = len(items)
        batch = {"global_crops": stack([it["global"][g] for g in range(self.n_global) for it in items])}
        if self.n_local:
            batch["local_crops"] = stack([it["local"][j] for j in range(self.n_local) for it in items])
        batch["masks"] = ibot_masks(self.n_global * b, self.grid, self.mask_ratio, self.mask_probability, rng,
                                    self.num_groups, self.consistent, self.mask_gen)
        return _stack_labels(items, batch)


class SingleCrop:
    """One random-resized crop + D4 element per sample (MAE pre-training, supervised fine-tuning)."""

    def __init__(self, size: int = 224, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 dihedral: bool = True, bands: Optional[Sequence[int]] = None):
        self.rrc = RandomResizedCrop(size, scale, ratio, dihedral, bands)

    def __call__(self, arr: np.ndarray, rng: np.random.Generator) -> dict:
        return {"image": self.rrc(arr, rng)}

    def collate(self, items: list[dict], rng: np.random.Generator) -> dict:
        return _stack_labels(items, {"images": stack([it["image"] for it in items])})


class EvalView:
    """Deterministic eval view: centre square of ``crop_pct`` of the short side resized to ``size``."""

    def __init__(self, size: int = 224, crop_pct: float = 0.875, bands: Optional[Sequence[int]] = None):
        self.crop = CenterCrop(size, crop_pct, bands)

    def __call__(self, arr: np.ndarray, rng: Optional[np.random.Generator] = None) -> dict:
        return {"image": self.crop(arr)}

    def collate(self, items: list[dict], rng: Optional[np.random.Generator] = None) -> dict:
        return _stack_labels(items, {"images": stack([it["image"] for it in items])})
