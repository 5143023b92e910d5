"""Entry points: config sections -> ready :class:`~engine.data.loader.ShardLoader` for one rank.

- :func:`build_pretrain_loader` — DINOv2 multi-crop + iBOT masks, or MAE single crop;
- :func:`build_finetune_loader` — augmented single crop + labels (supervised fine-tuning);
- :func:`build_eval_loader` — deterministic centre crop + labels, every sample exactly once per
  epoch in a fixed order per rank (linear probe, kNN, validation).

Each returned loader has ``.normalizer`` (manifest stats of the kept bands, see
:mod:`engine.data.normalize`), ``.photometric`` (the device half of photometric augmentation, None
unless ``--data.augment_on`` resolves to ``device``), ``.manifest`` and, for labelled loaders,
``.classes`` (:class:`~engine.data.labels.ClassIndex`, or :class:`~engine.data.labels.MultiLabelIndex`
when ``.multilabel``: labels are then (B, C) float32 multi-hot instead of (B,) long). The trainer
moves a batch with ``to_device(batch, device, loader.normalizer, loader.photometric)``.

Rank and world size come from the arguments, else ``torch.distributed`` when initialised, else
the ``RANK``/``WORLD_SIZE`` environment variables, else a single process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from engine.config import CropConfig, DataConfig, DinoConfig
from engine.data.labels import ClassIndex, MultiLabelIndex
from engine.data.loader import ShardLoader
from engine.data.multicrop import DinoMultiCrop, EvalView, SingleCrop
from engine.data.normalize import Normalizer
from engine.data.photometric import BandRange, Photometric
from engine.data.shardspec import ShardSet, known_sum, resolve_shards
from engine.data.stream import ShardStream, StreamPlan
from engine.errors import UserError

log = logging.getLogger(__name__)


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
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


def _num_bands(shards: ShardSet, bands: Sequence[int] | None) -> int | None:
    m = shards.manifest or {}
    n = m.get("num_bands")
    if bands is not None and n is not None:
        bad = [b for b in bands if b >= int(n)]
        if bad:
            raise UserError(f"--data.bands: index {bad[0]} out of range; the shards have {n} bands")
    return int(n) if n is not None else None


def build_normalizer(data_cfg: DataConfig, manifest: dict | None) -> Normalizer:
    """Normalizer for the kept bands from the manifest, or from --data.mean/--data.std."""
    if manifest is None:
        if data_cfg.mean is None or data_cfg.std is None:  # validate() has them given together
            raise UserError(
                "--data.shards: no manifest.json found beside the shards, so no band statistics; "
                "give --data.manifest or --data.mean and --data.std"
            )
        return Normalizer(data_cfg.mean, data_cfg.std)
    return Normalizer.from_manifest(manifest, data_cfg.bands, data_cfg.clip_percentiles, data_cfg.mean, data_cfg.std)


def band_range(manifest: dict | None, bands: Sequence[int] | None, flag: str = "--crops.rgb_augment") -> BandRange:
    """Unit range of the photometric ops: 0-255 for uint8, else each kept band's p2-p98."""
    if not manifest:
        return BandRange()  # uint8 assumed; a crop of another dtype raises (engine.data.multicrop)
    stats = manifest.get("stats") or {}
    n = int(manifest.get("num_bands") or len(stats.get("p2") or []))
    idx = list(bands) if bands is not None else list(range(n))
    if np.dtype(manifest.get("dtype") or "uint8") == np.uint8:
        return BandRange([0.0] * len(idx), [255.0] * len(idx))
    lo, hi = stats.get("p2"), stats.get("p98")
    if (
        not isinstance(lo, list)
        or not isinstance(hi, list)
        or not all(i < len(lo) and i < len(hi) and lo[i] is not None and hi[i] is not None for i in idx)
    ):
        raise UserError(
            f"{flag}: {manifest.get('dtype')} data needs the manifest's per-band p2/p98 "
            "for photometric augmentation; re-run the converter with statistics, or set "
            "--crops.rgb_augment false and --crops.spectral_jitter none"
        )
    mx = stats.get("max")
    if not isinstance(mx, list):
        mx = []
    tops = []
    for i in idx:  # a band whose p98 equals its p2 (mostly one value) would collapse: widen to its max
        top = float(hi[i])
        if top <= float(lo[i]) and i < len(mx) and mx[i] is not None:
            top = float(mx[i])
        tops.append(top if top > float(lo[i]) else float(lo[i]) + 1.0)
    return BandRange([float(lo[i]) for i in idx], tops)


def build_photometric(crops_cfg: CropConfig, manifest: dict | None, bands: Sequence[int] | None) -> Photometric | None:
    """The run's photometric augmentation, or None when no op is enabled."""
    if not (crops_cfg.rgb_augment or crops_cfg.spectral_jitter != "none" or crops_cfg.blur_all_bands):
        return None
    n = len(bands) if bands is not None else (manifest or {}).get("num_bands")
    colour = crops_cfg.rgb_augment and n in (3, None)
    scaled = colour or crops_cfg.spectral_jitter != "none"
    flag = "--crops.rgb_augment" if colour else "--crops.spectral_jitter"
    return Photometric(
        band_range(manifest, bands, flag) if scaled else BandRange(),
        crops_cfg.rgb_augment,
        crops_cfg.spectral_jitter,
        crops_cfg.blur_all_bands,
        (manifest or {}).get("nodata"),
    )


def augment_on_device(data_cfg: DataConfig) -> bool:
    """--data.augment_on resolved: 'auto' means the device when CUDA is available."""
    if data_cfg.augment_on == "auto":
        return torch.cuda.is_available()
    return data_cfg.augment_on == "device"


def _shuffle_sizes(
    data_cfg: DataConfig, shards: ShardSet, batch_size: int, shuffle: bool, rank: int
) -> tuple[int, int, int]:
    """(samples, bytes, initial) of each worker's shuffle buffer; logs what they allow on rank 0."""
    if not shuffle or data_cfg.shuffle_buffer <= 1:
        return 0, 0, 1
    workers = max(1, data_cfg.num_workers)
    per_worker = data_cfg.shuffle_buffer_bytes // workers
    entries = (shards.manifest or {}).get("shards") or []
    total_bytes = sum(int(e.get("bytes") or 0) for e in entries if isinstance(e, dict))
    total = sum(int(e.get("count") or 0) for e in entries if isinstance(e, dict))
    if rank == 0:
        if total_bytes and total:
            mean = total_bytes / total
            n = min(data_cfg.shuffle_buffer, max(1, int(per_worker // mean)))
            log.info(
                "shuffle buffer: about %d samples per worker x %d worker(s) = %.2f GiB per rank (samples "
                "average %.0f KiB; caps --data.shuffle_buffer %d, --data.shuffle_buffer_bytes %.2f GiB)",
                n,
                workers,
                n * mean * workers / 2**30,
                mean / 1024,
                data_cfg.shuffle_buffer,
                data_cfg.shuffle_buffer_bytes / 2**30,
            )
        else:
            log.info(
                "shuffle buffer: up to %d samples and %.2f GiB per worker x %d worker(s) (sample size "
                "unknown: no manifest)",
                data_cfg.shuffle_buffer,
                per_worker / 2**30,
                workers,
            )
    return data_cfg.shuffle_buffer, per_worker, min(data_cfg.shuffle_buffer, batch_size)


def _plan(
    data_cfg: DataConfig,
    shards: ShardSet,
    *,
    rank: int,
    world: int,
    seed: int,
    resampled: bool,
    batch_size: int,
    drop_last: bool,
    shuffle: bool,
) -> StreamPlan:
    steps = int(data_cfg.steps_per_epoch)
    if resampled and steps == 0:
        total = shards.total_samples
        if total is None:
            raise UserError(
                "--data.steps_per_epoch: the shards have no manifest with sample counts; "
                "set the number of batches per rank per epoch explicitly"
            )
        steps = total // (world * batch_size)
        if steps == 0:
            log.warning(
                "%d samples < world_size x batch_size (%d x %d): using 1 step per epoch", total, world, batch_size
            )
            steps = 1
    workers = max(1, data_cfg.num_workers)
    n = len(shards.urls)
    if not resampled and n < world * workers:
        log.info(
            "%d shard(s) for %d rank(s) x %d worker(s): splitting by sample where shards run out "
            "(each such reader skips the others' samples)",
            n,
            world,
            workers,
        )
    buffer, buffer_bytes, initial = _shuffle_sizes(data_cfg, shards, batch_size, shuffle, rank)
    return StreamPlan(
        urls=shards.urls,
        counts=shards.counts,
        rank=rank,
        world_size=world,
        batch_size=batch_size,
        seed=seed,
        resampled=resampled,
        steps_per_epoch=steps if resampled else 0,
        shuffle_shards=shuffle and data_cfg.shuffle_shards,
        shuffle_buffer=buffer,
        shuffle_bytes=buffer_bytes,
        shuffle_initial=initial,
        drop_last=drop_last,
        num_bands=_num_bands(shards, data_cfg.bands),
        max_skip_rate=data_cfg.max_skip_rate,
    )


def _training_plan(data_cfg: DataConfig, shards: ShardSet, rank: int, world: int, seed: int) -> StreamPlan:
    """The plan of a training loader: shuffled, full batches only, resampled as ``--data.resampled`` says."""
    return _plan(
        data_cfg,
        shards,
        rank=rank,
        world=world,
        seed=seed,
        resampled=data_cfg.resampled,
        batch_size=data_cfg.batch_size,
        drop_last=True,
        shuffle=True,
    )


def _loader(
    data_cfg: DataConfig,
    shards: ShardSet,
    view,
    plan: StreamPlan,
    label_fn: Callable | None,
    equalize: bool,
    opener: Callable | None,
    *,
    persistent: bool = True,
    photometric: Photometric | None = None,
    classes: ClassIndex | None = None,
) -> ShardLoader:
    nw = max(1, data_cfg.num_workers)
    dataset = ShardStream(plan, view, label_fn, opener, num_workers=nw)
    if equalize and not plan.resampled and shards.total_samples is None:
        log.warning("exact epochs without per-shard counts: ranks may yield different numbers of batches")
    num_samples = None
    if not plan.resampled:  # samples this rank reads per exact epoch, per the manifest's counts
        per_worker = [dataset.expected_samples(0, w, nw) for w in range(nw)]
        num_samples = known_sum(per_worker)
    return ShardLoader(
        dataset,
        data_cfg.num_workers,
        data_cfg.pin_memory,
        data_cfg.prefetch_factor,
        equalize,
        persistent,
        manifest=shards.manifest,
        shards=shards,
        normalizer=build_normalizer(data_cfg, shards.manifest),
        photometric=photometric,
        classes=classes,
        num_samples=num_samples,
    )


def build_pretrain_loader(
    data_cfg: DataConfig,
    crops_cfg: CropConfig,
    objective: Literal["dino", "mae"] = "dino",
    *,
    patch_size: int,
    num_groups: int = 1,
    mask_cfg: DinoConfig | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
    opener: Callable | None = None,
) -> ShardLoader:
    """Self-supervised pre-training loader for this rank.

    objective: 'dino' -> batches {global_crops, local_crops, masks} (+ photometric parameters when
    augmentation runs on the device); 'mae' -> {images} (crops.global_size, crops.single_scale).
    patch_size/num_groups: the model's patch side and band groups (iBOT mask length
    G*(global_size/patch_size)^2). mask_cfg: the iBOT mask ratio and probability (objective.dino;
    None = DinoConfig's defaults). seed: train.seed. Resampled unless ``data.resampled`` is false.
    """
    if objective not in ("dino", "mae"):
        raise UserError(f"--objective.name: unknown objective {objective!r}; use 'dino' or 'mae'")
    shards = resolve_shards(data_cfg.shards, data_cfg.manifest)
    rank, world = rank_and_world(rank, world_size)
    bands = data_cfg.bands
    photometric: Photometric | None = None
    if objective == "dino":
        if crops_cfg.global_size % patch_size:
            raise UserError(
                f"--crops.global_size {crops_cfg.global_size} must be a multiple of the model's patch size {patch_size}"
            )
        photometric = build_photometric(crops_cfg, shards.manifest, bands)
        on_device = photometric is not None and augment_on_device(data_cfg)
        if rank == 0 and photometric is not None:
            log.info(
                "photometric augmentation on the %s (--data.augment_on %s)",
                "device" if on_device else "loader workers",
                data_cfg.augment_on,
            )
        view: DinoMultiCrop | SingleCrop = DinoMultiCrop(
            crops_cfg,
            patch_size=patch_size,
            num_groups=num_groups,
            dino=mask_cfg,
            photometric=photometric,
            on_device=on_device,
            bands=bands,
        )
        photometric = photometric if on_device else None
    else:
        view = SingleCrop(crops_cfg.global_size, crops_cfg, bands)
    plan = _training_plan(data_cfg, shards, rank, world, seed)
    return _loader(data_cfg, shards, view, plan, None, equalize=True, opener=opener, photometric=photometric)


def _labelled_shards(data_cfg: DataConfig, split: str | None, shards: str | Sequence[str] | None) -> ShardSet:
    spec = shards if shards is not None else data_cfg.shards
    if split:
        base = Path(str(spec))
        if not (base / split).is_dir():
            raise UserError(
                f"--data.shards '{spec}': no '{split}' split directory inside it; convert the "
                f"split into '{base / split}' or pass its shards explicitly"
            )
        spec = str(base / split)
    return resolve_shards(spec, data_cfg.manifest if shards is None and not split else "")


def _label_index(data_cfg: DataConfig, manifest: dict | None, multilabel: bool | None) -> ClassIndex:
    """ClassIndex, or MultiLabelIndex when ``multilabel`` (None = the manifest's "multilabel")."""
    if multilabel is None:
        multilabel = bool((manifest or {}).get("multilabel", False))
    return (MultiLabelIndex if multilabel else ClassIndex).from_manifest(manifest, data_cfg.classes)


def build_finetune_loader(
    data_cfg: DataConfig,
    crops_cfg: CropConfig,
    img_size: int,
    *,
    split: str | None = None,
    shards: str | Sequence[str] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
    opener: Callable | None = None,
    multilabel: bool | None = None,
) -> ShardLoader:
    """Supervised training loader: {images (B, C, S, S) source dtype, labels (B,) long}.

    Random-resized crop (crops.single_scale) + D4 element, resampled per ``data.resampled``.
    split: sub-directory of data.shards (e.g. 'train'); shards: an explicit spec instead.
    multilabel: labels (B, num_classes) float32 multi-hot; None = the manifest's "multilabel".
    """
    ss = _labelled_shards(data_cfg, split, shards)
    classes = _label_index(data_cfg, ss.manifest, multilabel)
    rank, world = rank_and_world(rank, world_size)
    view = SingleCrop(img_size, crops_cfg, data_cfg.bands)
    plan = _training_plan(data_cfg, ss, rank, world, seed)
    return _loader(data_cfg, ss, view, plan, classes, equalize=True, opener=opener, classes=classes)


def build_eval_loader(
    data_cfg: DataConfig,
    img_size: int,
    *,
    split: str | None = None,
    shards: str | Sequence[str] | None = None,
    labels: bool = True,
    batch_size: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    opener: Callable | None = None,
    multilabel: bool | None = None,
) -> ShardLoader:
    """Deterministic loader: {images (B, C, S, S) source dtype[, labels (B,) long]}.

    multilabel: labels (B, num_classes) float32 multi-hot; None = the manifest's "multilabel".

    Every sample exactly once per epoch across ranks, in the same order on every pass (shards in
    spec order, split [rank::world] then [worker::num_workers], no shuffling, last batch partial).
    Ranks may get different numbers of samples (``loader.num_samples``); gather with sizes. Its
    workers live for one pass (an eval loader is usually read once).
    """
    ss = _labelled_shards(data_cfg, split, shards)
    classes = _label_index(data_cfg, ss.manifest, multilabel) if labels else None
    rank, world = rank_and_world(rank, world_size)
    view = EvalView(img_size, data_cfg.eval_crop_pct, data_cfg.bands)
    plan = _plan(
        data_cfg,
        ss,
        rank=rank,
        world=world,
        seed=0,
        resampled=False,
        batch_size=batch_size or data_cfg.batch_size,
        drop_last=False,
        shuffle=False,
    )
    return _loader(data_cfg, ss, view, plan, classes, equalize=False, opener=opener, persistent=False, classes=classes)
