"""What ``--model.name`` says before any model is built: the timm architecture behind the tiny test
names, the patch size, and whether the run's image sizes are multiples of it (checked at config time,
so a bad crop size is one error line naming the flag, not a shape error in the first step)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from engine.errors import UserError

# The tiny test and demo models (width 64, depth 2, 2 heads: engine/model/architecture.py) and the
# timm architecture each one shrinks.
TINY_ARCHS = {
    "tiny": "vit_small_patch14_dinov2",
    "tiny_reg4": "vit_small_patch14_reg4_dinov2",
    "tiny_mae": "vit_base_patch16_224",
}


def patch_size_of(name: str) -> int | None:
    """Patch side of ``--model.name`` read from the name (``vit_large_patch14_dinov2`` -> 14, 'tiny'
    -> 14); None when the name does not say (then the model builder checks)."""
    base = name.split(".", 1)[0]
    m = re.search(r"patch(\d+)", TINY_ARCHS.get(base, base))
    return int(m.group(1)) if m else None


def check_image_sizes(model_name: str, sizes: Sequence[tuple[str, int]]) -> None:
    """Every ``(flag, pixels)`` must be a multiple of the model's patch size; else one UserError
    naming the flag, the model and the nearest valid size (``--crops.local_size 96: not a multiple
    of patch size 14 (vit_large_patch14_dinov2); use 98``)."""
    p = patch_size_of(model_name)
    if not p:
        return
    for flag, size in sizes:
        if size % p:
            near = max(p, round(size / p) * p)
            raise UserError(f"--{flag} {size}: not a multiple of patch size {p} ({model_name}); use {near}")
