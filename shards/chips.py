"""Windowing, band selection and nodata handling for one image.

A window is ``(col_off, row_off, width, height)`` in source pixels, the order rasterio's
``Window`` and the sample json's ``"window"`` use. Windows come out row-major (top row of chips
first, left to right), which fixes the order of samples in a shard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from engine.errors import UserError

Window = tuple[int, int, int, int]

# Sentinel-2 L1C band order as distributed (fMoW-Sentinel, BigEarthNet-S2 13-band stacks).
SENTINEL2_L1C = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
BAND_NAME_PRESETS = {"s2": SENTINEL2_L1C, "sentinel2": SENTINEL2_L1C, "rgb": ["red", "green", "blue"]}


def parse_hw(text: str, flag: str) -> tuple[int, int]:
    """'256' -> (256, 256); '256x128' -> (height 256, width 128)."""
    parts = str(text).lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"{flag} '{text}': expected N or HxW in pixels, e.g. 256 or 256x128") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) <= 0:
        raise UserError(f"{flag} '{text}': expected N or HxW with positive integers, e.g. 256 or 256x128")
    return vals[0], vals[1]


def plan_windows(
    width: int, height: int, chip: tuple[int, int] | None, stride: tuple[int, int] | None, edge: str
) -> list[Window]:
    """Windows of one image. ``chip``/``stride`` are (h, w); None chip = the whole image.

    edge 'drop': only windows fully inside the image. edge 'pad': windows continue until the
    image is covered; the last row/column may reach past the edge (filled with nodata on read).
    """
    if chip is None:
        return [(0, 0, width, height)]
    (ch, cw), (sh, sw) = chip, stride or chip
    rows = _offsets(height, ch, sh, edge)
    cols = _offsets(width, cw, sw, edge)
    return [(c, r, cw, ch) for r in rows for c in cols]


def _offsets(size: int, chip: int, stride: int, edge: str) -> list[int]:
    if edge == "drop":
        return list(range(0, size - chip + 1, stride)) if size >= chip else []
    out = [0]
    while out[-1] + chip < size:
        out.append(out[-1] + stride)
    return out


def parse_band_tokens(text: str | None, flag: str = "--bands") -> list[str] | None:
    """'B2,B3,4-6' -> ['B2', 'B3', '4', '5', '6']: index ranges expanded, in the order written (so
    '3-1' -> ['3', '2', '1'], e.g. BGR files to RGB samples); names kept. UserError for index 0
    (indexes are 1-based, like GDAL's) and for a band listed twice ('1,1,2', '2,1-3', 'B2,b2'): a
    repeated band is a typo far more often than a wish to store the same pixels twice."""
    if text is None or str(text).strip() == "":
        return None
    out: list[str] = []
    for tok in (t.strip() for t in str(text).split(",")):
        if not tok:
            continue
        a, dash, b = tok.partition("-")
        if dash and a.isdigit() and b.isdigit():
            lo, hi = int(a), int(b)
            out.extend(str(i) for i in (range(lo, hi + 1) if lo <= hi else range(lo, hi - 1, -1)))
        else:
            out.append(str(int(tok)) if tok.isdigit() else tok)
    if "0" in out:
        raise UserError(f"{flag} '{text}': band indexes start at 1 (GDAL's convention)")
    seen: set[str] = set()
    for tok in out:
        if tok.lower() in seen:
            raise UserError(f"{flag} '{text}': band {tok} is listed twice; list each band once")
        seen.add(tok.lower())
    return out


def parse_band_names(text: str | None) -> list[str] | None:
    """--band-names: a preset ('s2', 'rgb') or a comma list naming every source band in order."""
    if text is None or str(text).strip() == "":
        return None
    preset = BAND_NAME_PRESETS.get(str(text).strip().lower())
    if preset is not None:
        return list(preset)
    return [t.strip() for t in str(text).split(",") if t.strip()]


def select_bands(names: Sequence[str], keep: list[str] | None, drop: list[str] | None) -> list[int]:
    """1-based source band indexes to read, in output order.

    ``keep`` tokens are 1-based indexes (GDAL's convention) or band names (case-insensitive), in
    output order; ``drop`` removes bands from all of them (the CLI never passes both). Raises
    ValueError naming the first token that does not exist in this image, or a band kept twice
    (a name and an index of it); the caller records the file as skipped."""
    lookup = {n.lower(): i + 1 for i, n in enumerate(names)}

    def resolve(tok: str) -> int:
        if tok.isdigit():
            i = int(tok)
            if not 1 <= i <= len(names):
                raise ValueError(f"band index {i} out of range (image has {len(names)} bands; indexes are 1-based)")
            return i
        if tok.lower() not in lookup:
            raise ValueError(f"band {tok!r} not found (bands: {','.join(names)})")
        return lookup[tok.lower()]

    chosen = [resolve(t) for t in keep] if keep else list(range(1, len(names) + 1))
    if len(set(chosen)) != len(chosen):  # a name and an index of the same band ('B2,2')
        twice = next(i for i in chosen if chosen.count(i) > 1)
        raise ValueError(f"band {twice} ({names[twice - 1]}) is selected twice by --bands; list each band once")
    if drop:
        gone = {resolve(t) for t in drop}
        chosen = [i for i in chosen if i not in gone]
    if not chosen:
        raise ValueError("band selection leaves no bands")
    return chosen


def pad_value_for(dtype: str, nodata: float | None) -> float:
    """Edge padding fill: the nodata value, else NaN for floats, else 0 (then excluded from stats
    by count, since 0 may be a real value)."""
    if nodata is not None:
        return nodata
    return math.nan if np.dtype(dtype).kind == "f" else 0


def place(valid: np.ndarray, out_hw: tuple[int, int], at: tuple[int, int], fill: float) -> np.ndarray:
    """Put ``valid`` (C, h, w) at (row, col) of a new (C, H, W) array filled with ``fill``."""
    c = valid.shape[0]
    out = np.empty((c, *out_hw), dtype=valid.dtype)
    out[...] = fill
    r0, c0 = at
    out[:, r0 : r0 + valid.shape[1], c0 : c0 + valid.shape[2]] = valid
    return out


def invalid_fraction(chip: np.ndarray, nodata: float | None, pad_pixels: int) -> float:
    """Fraction of pixels (H*W) where any band is nodata/NaN or that came from edge padding.

    Padding filled with nodata is found by the nodata test; ``pad_pixels`` is added only when the
    padding value is not detectable (no nodata on an integer image).
    """
    hw = chip.shape[1] * chip.shape[2]
    bad = np.zeros(chip.shape[1:], dtype=bool)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        np.any(chip == nodata, axis=0, out=bad)
    if chip.dtype.kind == "f":
        bad |= np.isnan(chip).any(axis=0)
    extra = pad_pixels if nodata is None and chip.dtype.kind != "f" else 0
    return (int(bad.sum()) + extra) / hw
