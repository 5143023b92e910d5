"""Frozen-backbone outputs over an eval loader, gathered from every rank in sample order.

An eval loader (``engine.data.build_eval_loader``) gives each rank a disjoint part of the split;
:func:`gather_rows` concatenates the parts on every rank, so each rank can then run the (cheap)
linear probe / kNN itself and all ranks agree on the result. The gather goes through
``torch.distributed.all_gather_object`` because ranks hold different numbers of rows.

Feature caches (:func:`save_features` / :func:`load_features`) are keyed by a fingerprint of the
model and the data, so ``launchers/evaluate.py`` re-runs only the probes when nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer

from engine.atomic import atomic_write
from engine.data import to_device
from engine.errors import UserError
from engine.model.tokens import forward_tokens, pool_tokens
from engine.progress import progress

log = logging.getLogger(__name__)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's (n_r, ...) CPU tensor in rank order (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts, dim=0)


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")


def lockstep(loader: Iterable, device: torch.device) -> Iterator[tuple[dict, bool]]:
    """Yield (batch, real) so that every rank makes the same number of model calls.

    Eval splits give ranks different numbers of batches; under ZeRO-3 every forward all-gathers
    parameters, so a rank that stops early would leave the others waiting forever. A rank that has
    run out repeats its last batch with ``real=False`` (outputs to be discarded) until all are done.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        for b in loader:
            yield b, True
        return
    it, last = iter(loader), None
    flag = torch.zeros(1, device=device)
    while True:
        b = next(it, None)
        flag.fill_(0.0 if b is None else 1.0)
        dist.all_reduce(flag)
        if flag.item() == 0:
            return
        if b is not None:
            last = b
        if last is None:
            raise UserError(
                f"the eval split has fewer samples than ranks ({dist.get_world_size()}); evaluate it on fewer ranks"
            )
        yield (last, b is not None)


@torch.no_grad()
def run_over(
    loader: Iterable,
    device: torch.device,
    fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    normalizer=None,
    precision: str = "fp32",
    desc: str = "eval",
    total: int | None = None,
    input_dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Apply ``fn(images) -> {name: (B, ...)}`` to every batch; returns ({name: (N, ...)} fp32 CPU,
    labels (N, ...)) over all ranks. input_dtype: cast the normalised images (a model stored in 16 bits)."""
    outs: dict[str, list[torch.Tensor]] = {}
    labels: list[torch.Tensor] = []
    for batch, real in progress(lockstep(loader, device), total=total, desc=desc, unit="batch"):
        b = to_device(batch, device, normalizer)
        x = b["images"] if input_dtype is None else b["images"].to(input_dtype)
        with _autocast(device, precision):
            res = fn(x)
        if not real:
            continue
        for k, v in res.items():
            outs.setdefault(k, []).append(v.float().cpu())
        if "labels" in b:
            labels.append(b["labels"].cpu())
    if not outs:
        raise RuntimeError("the eval loader produced no batch on this rank")
    cat = {k: gather_rows(torch.cat(v)) for k, v in outs.items()}
    lab = gather_rows(torch.cat(labels)) if labels else torch.empty(0)
    return cat, lab


def extract_features(
    vit: VisionTransformer,
    loader,
    device: torch.device,
    pools: Sequence[str] = ("cls",),
    precision: str = "fp32",
    desc: str = "features",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Frozen features of every sample of ``loader`` (all ranks): ({pool: (N, D_pool)}, labels)."""
    was_training = vit.training
    vit.eval()
    try:
        batches = len(loader) if hasattr(loader, "__len__") else None
        return run_over(
            loader,
            device,
            lambda x: {p: pool_tokens(forward_tokens(vit, x), p) for p in pools},
            getattr(loader, "normalizer", None),
            precision,
            desc,
            batches,
        )
    finally:
        vit.train(was_training)


def fingerprint(*parts: object) -> str:
    """Short stable hash of JSON-able parts (model identity, data spec, eval view)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_features(path: Path, feats: dict[str, torch.Tensor], labels: torch.Tensor, key: str) -> None:
    """Write a feature cache atomically (a crash never leaves a truncated cache)."""
    with atomic_write(path) as fh:
        torch.save({"key": key, "feats": feats, "labels": labels}, fh)


def load_features(path: Path, key: str, pools: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """The cache at ``path`` if it was written for ``key`` and holds every pool in ``pools``; else None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a cache from another version or a damaged file: recompute
        log.warning("ignoring feature cache %s (%s)", path, e)
        return None
    if blob.get("key") != key or not all(p in blob["feats"] for p in pools):
        return None
    return blob["feats"], blob["labels"]
