"""Per-sample views and their batch collation: DINOv2 multi-crop (+ iBOT masks), MAE crop, eval.

Each view is called in a loader worker as ``view(arr, rng) -> item`` on one decoded (C, H, W)
array and ``view.collate(items, rng) -> batch`` on a micro-batch; images stay in the source dtype
(see :mod:`engine.data.transforms`). Batches:

- :class:`DinoMultiCrop`: ``global_crops`` (n_global*B, C, Hg, Wg) crop-major (crop g of sample b
  at g*B + b), ``local_crops`` (n_local*B, C, Hl, Wl) (absent when n_local == 0), ``masks``
  (n_global*B, G*(Hg/p)*(Wg/p)) bool iBOT masks; with photometric augmentation on the device also
  ``global_crops_photometric`` / ``local_crops_photometric``, one float32 parameter row per crop
  in the same order (:mod:`engine.data.photometric`), which :func:`~engine.data.normalize.to_device`
  consumes;
- :class:`SingleCrop`: ``images`` (B, C, S, S) (MAE pre-training; supervised fine-tuning);
- :class:`EvalView`: ``images`` (B, C, S, S), deterministic centre crop;
- with labels (the stream adds ``item["label"]``): also ``labels`` (B,) long, or (B, C) float32
  multi-hot when the label function returns arrays (:class:`~engine.data.labels.MultiLabelIndex`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from engine.config import CropConfig, DinoConfig
from engine.data.masking import BlockMaskGenerator, ibot_masks
from engine.data.photometric import GLOBAL_1, GLOBAL_2, LOCAL, PARAMS_SUFFIX, CropKind, Photometric
from engine.data.transforms import CenterCrop, RandomResizedCrop, cast_back, crop_resize, crop_resize_native
from engine.errors import UserError


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
    """One random-resized crop + D4 element, then the photometric ops of ``kind``: applied here
    (returned in the source dtype), or only drawn when ``on_device`` (crop in the source dtype plus
    its parameter row, applied after the host->device copy)."""

    def __init__(self, rrc: RandomResizedCrop, photometric: Photometric | None, kind: CropKind, on_device: bool):
        self.rrc, self.photometric, self.kind, self.on_device = rrc, photometric, kind, on_device

    def __call__(self, arr: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray | None]:
        box, k = self.rrc.params(arr, rng)
        bands = len(self.rrc.bands) if self.rrc.bands is not None else arr.shape[0]
        photo = self.photometric
        mode = None if photo is None else photo.mode(bands)
        if photo is None or mode is None:
            return crop_resize_native(arr, box, self.rrc.size, k, self.rrc.bands), None
        if mode != "blur" and photo.range.lo is None and arr.dtype != np.uint8:
            raise UserError(
                f"--data.manifest: photometric augmentation of {arr.dtype} images needs the manifest's "
                "p2/p98 band statistics; give the manifest or set --crops.rgb_augment false"
            )
        if self.on_device:
            crop = crop_resize_native(arr, box, self.rrc.size, k, self.rrc.bands)
            return crop, photo.draw(rng, self.kind, bands)
        x = crop_resize(arr, box, self.rrc.size, k, self.rrc.bands)
        params = torch.from_numpy(photo.draw(rng, self.kind, bands))
        return cast_back(photo.augment_crop(x, params), arr.dtype), None


class DinoMultiCrop:
    """DINOv2 multi-crop: ``crops.num_global`` global + ``crops.num_local`` local crops, plus iBOT
    masks at collate.

    crops: sizes, scales, aspect ratios and D4 flips of the crops; dino: ``mask_ratio`` and
    ``mask_probability`` of the iBOT masks (None = DinoConfig's defaults); patch_size, num_groups:
    the model's patch side and band groups (mask grid G * (global_size/p)^2 tokens); photometric:
    the augmentation (None = geometry only); on_device: draw its parameters here, apply them on the
    training device; bands: band indices kept (None = all).
    """

    def __init__(
        self,
        crops: CropConfig,
        *,
        patch_size: int,
        num_groups: int = 1,
        dino: DinoConfig | None = None,
        photometric: Photometric | None = None,
        on_device: bool = False,
        bands: Sequence[int] | None = None,
    ):
        if crops.global_size % patch_size:
            raise ValueError(f"global crop size {crops.global_size} is not a multiple of patch size {patch_size}")
        dino = dino or DinoConfig()
        self.n_global, self.n_local, self.on_device = crops.num_global, crops.num_local, on_device
        g_rrc = RandomResizedCrop(crops.global_size, crops.global_scale, crops.ratio, crops.dihedral, bands)
        l_rrc = RandomResizedCrop(crops.local_size, crops.local_scale, crops.ratio, crops.dihedral, bands)
        self.global_views = [
            _AugmentedCrop(g_rrc, photometric, GLOBAL_1 if i == 0 else GLOBAL_2, on_device)
            for i in range(crops.num_global)
        ]
        self.local_view = _AugmentedCrop(l_rrc, photometric, LOCAL, on_device)
        self.grid = (crops.global_size // patch_size, crops.global_size // patch_size)
        self.mask_gen = BlockMaskGenerator(self.grid)
        self.num_groups, self.consistent = int(num_groups), crops.consistent_group_masks
        self.mask_ratio, self.mask_probability = tuple(dino.mask_ratio), float(dino.mask_probability)

    def __call__(self, arr: np.ndarray, rng: np.random.Generator) -> dict:
        return {
            "global": [v(arr, rng) for v in self.global_views],
            "local": [self.local_view(arr, rng) for _ in range(self.n_local)],
        }

    def collate(self, items: list[dict], rng: np.random.Generator) -> dict:
        b = len(items)
        batch = {}
        for key, part, n in (("global_crops", "global", self.n_global), ("local_crops", "local", self.n_local)):
            if n == 0:
                continue
            crops = [it[part][j] for j in range(n) for it in items]  # crop-major
            batch[key] = stack([c for c, _ in crops])
            if crops[0][1] is not None:
                batch[key + PARAMS_SUFFIX] = torch.from_numpy(np.stack([p for _, p in crops]))
        batch["masks"] = ibot_masks(
            self.n_global * b,
            self.grid,
            self.mask_ratio,
            self.mask_probability,
            rng,
            self.num_groups,
            self.consistent,
            self.mask_gen,
        )
        return _stack_labels(items, batch)


class SingleCrop:
    """One random-resized crop + D4 element per sample (MAE pre-training, supervised fine-tuning)."""

    def __init__(self, size: int, crops: CropConfig, bands: Sequence[int] | None = None):
        self.rrc = RandomResizedCrop(size, crops.single_scale, crops.ratio, crops.dihedral, bands)

    def __call__(self, arr: np.ndarray, rng: np.random.Generator) -> dict:
        return {"image": self.rrc(arr, rng)}

    def collate(self, items: list[dict], rng: np.random.Generator) -> dict:
        return _stack_labels(items, {"images": stack([it["image"] for it in items])})


class EvalView:
    """Deterministic eval view: centre square of ``crop_pct`` of the short side resized to ``size``."""

    def __init__(self, size: int, crop_pct: float, bands: Sequence[int] | None = None):
        self.crop = CenterCrop(size, crop_pct, bands)

    def __call__(self, arr: np.ndarray, rng: np.random.Generator | None = None) -> dict:
        return {"image": self.crop(arr)}

    def collate(self, items: list[dict], rng: np.random.Generator | None = None) -> dict:
        return _stack_labels(items, {"images": stack([it["image"] for it in items])})
