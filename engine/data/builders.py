"""Entry points: config sections -> ready :class:`~engine.data.loader.ShardLoader` for one rank.

- :func:`build_pretrain_loader` — DINOv2 multi-crop + iBOT masks, or MAE single crop;
- :func:`build_finetune_loader` — augmented single crop + labels (supervised fine-tuning);
- :func:`build_eval_loader` — deterministic centre crop + labels, every sample exactly once per
  epoch in a fixed order per rank (linear probe, kNN, validation).

Each returned loader has ``.normalizer`` (manifest stats of the kept bands, see
:mod:`engine.data.normalize`), ``.manifest`` and, for labelled loaders, ``.classes``
(:class:`~engine.data.labels.ClassIndex`, or :class:`~engine.data.labels.MultiLabelIndex` when
``.multilabel``: labels are then (B, C) float32 multi-hot instead of (B,) long). The trainer moves
a batch with ``to_device(batch, device, loader.normalizer)``.

Rank and world size come from the arguments, else ``torch.distributed`` when initialised, else
the ``RANK``/``WORLD_SIZE`` environment variables, else a single process.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np

from engine.data.labels import ClassIndex, MultiLabelIndex
from engine.data.loader import ShardLoader
from engine.data.multicrop import DinoMultiCrop, EvalView, SingleCrop
from engine.data.normalize import Normalizer
from engine.data.pipeline import ShardStream, StreamPlan
from engine.data.shardspec import ShardSet, resolve_shards
from engine.errors import UserError

log = logging.getLogger(__name__)


def rank_and_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """(rank, world size) from the arguments, torch.distributed, or RANK/WORLD_SIZE."""
    if rank is not None and world_size is not None:
        r, w = int(rank), int(world_size)
    else:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            r, w = dist.get_rank(), dist.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not (w >= 1 and 0 <= r < w):
        raise UserError(f"rank {r} / world size {w} is not a valid process layout")
    return r, w


def _num_bands(shards: ShardSet, bands: Optional[Sequence[int]]) -> Optional[int]:
    m = shards.manifest or {}
    n = m.get("num_bands")
    if bands is not None and n is not None:
        bad = [b for b in bands if b >= int(n)]
        if bad:
            raise UserError(f"--data.bands: index {bad[0]} out of range; the shards have {n} bands")
    return int(n) if n is not None else None


def build_normalizer(data_cfg: Any, manifest: Optional[dict]) -> Normalizer:
    """Normalizer for the kept bands from the manifest, or from --data.mean/--data.std."""
    if manifest is None:
        if data_cfg.mean is None:
            raise UserError("--data.shards: no manifest.json found beside the shards, so no band statistics; "
                            "give --data.manifest or --data.mean and --data.std")
        return Normalizer(data_cfg.mean, data_cfg.std)
    return Normalizer.from_manifest(manifest, data_cfg.bands, data_cfg.clip_percentiles, data_cfg.mean, data_cfg.std)


def _white_point(manifest: Optional[dict], bands: Optional[Sequence[int]]) -> float:
    """Value the RGB colour ops treat as white: 255 for uint8, else the manifest's max of the bands."""
    m = manifest or {}
    dtype = np.dtype(m.get("dtype") or "uint8")
    if dtype == np.uint8:
        return 255.0
    mx = (m.get("stats") or {}).get("max")
    idx = list(bands) if bands is not None else list(range(len(mx or [])))
    if mx and all(i < len(mx) and mx[i] is not None for i in idx) and idx:
        return max(1.0, max(float(mx[i]) for i in idx))
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


def _plan(data_cfg: Any, shards: ShardSet, *, rank: int, world: int, seed: int, resampled: bool,
          batch_size: int, drop_last: bool, shuffle: bool) -> StreamPlan:
    steps = int(data_cfg.steps_per_epoch)
    if resampled and steps == 0:
        total = shards.total_samples
        if total is None:
            raise UserError("--data.steps_per_epoch: the shards have no manifest with sample counts; "
                            "set the number of batches per rank per epoch explicitly")
        steps = total // (world * batch_size)
        if steps == 0:
            log.warning("%d samples < world_size x batch_size (%d x %d): using 1 step per epoch",
                        total, world, batch_size)
            steps = 1
    workers = max(1, data_cfg.num_workers)
    n = len(shards.urls)
    if not resampled and n < world * workers:
        log.info("%d shard(s) for %d rank(s) x %d worker(s): splitting by sample where shards run out "
                 "(each such reader skips the others' samples)", n, world, workers)
    return StreamPlan(urls=shards.urls, counts=shards.counts, rank=rank, world_size=world, batch_size=batch_size,
                      seed=seed, resampled=resampled, steps_per_epoch=steps if resampled else 0,
                      shuffle_shards=shuffle and data_cfg.shuffle_shards,
                      shuffle_buffer=data_cfg.shuffle_buffer if shuffle else 0, drop_last=drop_last,
                      num_bands=_num_bands(shards, data_cfg.bands), max_skip_rate=data_cfg.max_skip_rate)


def _loader(data_cfg: Any, shards: ShardSet, view, plan: StreamPlan, label_fn: Optional[Callable],
            equalize: bool, opener: Optional[Callable]) -> ShardLoader:
    dataset = ShardStream(plan, view, label_fn, opener)
    if equalize and not plan.resampled and shards.total_samples is None:
        log.warning("exact epochs without per-shard counts: ranks may yield different numbers of batches")
    loader = ShardLoader(dataset, data_cfg.num_workers, data_cfg.pin_memory, data_cfg.prefetch_factor, equalize)
    loader.manifest = shards.manifest
    loader.shards = shards
    loader.normalizer = build_normalizer(data_cfg, shards.manifest)
    return loader


def build_pretrain_loader(data_cfg: Any, crops_cfg: Any, objective: Literal["dino", "mae"] = "dino", *,
                          patch_size: int, num_groups: int = 1, mask_cfg: Any = None,
                          rank: Optional[int] = None, world_size: Optional[int] = None, seed: int = 0,
                          opener: Optional[Callable] = None) -> ShardLoader:
    """Self-supervised pre-training loader for this rank.

    objective: 'dino' -> batches {global_crops, local_crops, masks}; 'mae' -> {images}
    (crops.global_size, crops.single_scale). patch_size/num_groups: the model's patch side and
    band groups (iBOT mask length G*(global_size/patch_size)^2). mask_cfg: anything with
    ``mask_ratio`` (lo, hi) and ``mask_probability`` (objective.dino); None = (0.1, 0.5), 0.5.
    seed: train.seed. Resampled unless ``data.resampled`` is false.
    """
    if objective not in ("dino", "mae"):
        raise UserError(f"--objective.name: unknown objective {objective!r}; use 'dino' or 'mae'")
    shards = resolve_shards(data_cfg.shards, data_cfg.manifest)
    rank, world = rank_and_world(rank, world_size)
    bands = data_cfg.bands
    if objective == "dino":
        if crops_cfg.global_size % patch_size:
            raise UserError(f"--crops.global_size {crops_cfg.global_size} must be a multiple of the model's "
                            f"patch size {patch_size}")
        ratio = tuple(getattr(mask_cfg, "mask_ratio", (0.1, 0.5)))
        prob = float(getattr(mask_cfg, "mask_probability", 0.5))
        view = DinoMultiCrop(crops_cfg.global_size, crops_cfg.local_size, crops_cfg.num_global, crops_cfg.num_local,
                             crops_cfg.global_scale, crops_cfg.local_scale, crops_cfg.ratio, crops_cfg.dihedral,
                             crops_cfg.rgb_augment, crops_cfg.blur_all_bands,
                             _white_point(shards.manifest, bands), patch_size, num_groups, ratio, prob,
                             crops_cfg.consistent_group_masks, bands)
    else:
        view = SingleCrop(crops_cfg.global_size, crops_cfg.single_scale, crops_cfg.ratio, crops_cfg.dihedral, bands)
    plan = _plan(data_cfg, shards, rank=rank, world=world, seed=seed, resampled=data_cfg.resampled,
                 batch_size=data_cfg.batch_size, drop_last=True, shuffle=True)
    return _loader(data_cfg, shards, view, plan, None, equalize=True, opener=opener)


def _labelled_shards(data_cfg: Any, split: Optional[str], shards: Any) -> ShardSet:
    spec = shards if shards is not None else data_cfg.shards
    if split:
        base = Path(str(spec))
        if not (base / split).is_dir():
            raise UserError(f"--data.shards '{spec}': no '{split}' split directory inside it; convert the "
                            f"split into '{base / split}' or pass its shards explicitly")
        spec = str(base / split)
    return resolve_shards(spec, data_cfg.manifest if shards is None and not split else "")


def _label_index(data_cfg: Any, manifest: Optional[dict], multilabel: Optional[bool]) -> ClassIndex:
    """ClassIndex, or MultiLabelIndex when ``multilabel`` (None = the manifest's "multilabel")."""
    if multilabel is None:
        multilabel = bool((manifest or {}).get("multilabel", False))
    return (MultiLabelIndex if multilabel else ClassIndex).from_manifest(manifest, data_cfg.classes)


def build_finetune_loader(data_cfg: Any, crops_cfg: Any, img_size: int, *, split: Optional[str] = None,
                          shards: Any = None, rank: Optional[int] = None, world_size: Optional[int] = None,
                          seed: int = 0, opener: Optional[Callable] = None,
                          multilabel: Optional[bool] = None) -> ShardLoader:
    """Supervised training loader: {images (B, C, S, S) source dtype, labels (B,) long}.

    Random-resized crop (crops.single_scale) + D4 element, resampled per ``data.resampled``.
    split: sub-directory of data.shards (e.g. 'train'); shards: an explicit spec instead.
    multilabel: labels (B, num_classes) float32 multi-hot; None = the manifest's "multilabel".
    """
    ss = _labelled_shards(data_cfg, split, shards)
    classes = _label_index(data_cfg, ss.manifest, multilabel)
    rank, world = rank_and_world(rank, world_size)
    view = SingleCrop(img_size, crops_cfg.single_scale, crops_cfg.ratio, crops_cfg.dihedral, data_cfg.bands)
    plan = _plan(data_cfg, ss, rank=rank, world=world, seed=seed, resampled=data_cfg.resampled,
                 batch_size=data_cfg.batch_size, drop_last=True, shuffle=True)
    loader = _loader(data_cfg, ss, view, plan, classes, equalize=True, opener=opener)
    loader.classes = classes
    loader.multilabel = isinstance(classes, MultiLabelIndex)
    return loader


def build_eval_loader(data_cfg: Any, img_size: int, *, split: Optional[str] = None, shards: Any = None,
                      labels: bool = True, batch_size: Optional[int] = None, rank: Optional[int] = None,
                      world_size: Optional[int] = None, opener: Optional[Callable] = None,
                      multilabel: Optional[bool] = None) -> ShardLoader:
    """Deterministic loader: {images (B, C, S, S) source dtype[, labels (B,) long]}.

    multilabel: labels (B, num_classes) float32 multi-hot; None = the manifest's "multilabel".

    Every sample exactly once per epoch across ranks, in the same order on every pass (shards in
    spec order, split [rank::world] then [worker::num_workers], no shuffling, last batch partial).
    Ranks may get different numbers of samples (``loader.num_samples``); gather with sizes.
    """
    ss = _labelled_shards(data_cfg, split, shards)
    classes = _label_index(data_cfg, ss.manifest, multilabel) if labels else None
    rank, world = rank_and_world(rank, world_size)
    view = EvalView(img_size, data_cfg.eval_crop_pct, data_cfg.bands)
    plan = _plan(data_cfg, ss, rank=rank, world=world, seed=0, resampled=False,
                 batch_size=batch_size or data_cfg.batch_size, drop_last=False, shuffle=False)
    loader = _loader(data_cfg, ss, view, plan, classes, equalize=False, opener=opener)
    loader.classes = classes
    loader.multilabel = isinstance(classes, MultiLabelIndex)
    nw = max(1, data_cfg.num_workers)
    per_worker = [loader.dataset.expected_samples(0, w, nw) for w in range(nw)]
    loader.num_samples = None if any(n is None for n in per_worker) else int(sum(per_worker))
    return loader
