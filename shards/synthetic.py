"""Synthetic archives of real GeoTIFFs (CRS, transform, nodata, band names) for the demo and tests.

``generate_archive(out_dir, n_files, size, kind="rgb"|"s2", classes=..., pixel_fn=..., seed=...)``
writes 3-band uint8 (fMoW-RGB style; also as PNG/JPEG previews) or 13-band uint16 Sentinel-2 L1C
style files (band descriptions B1..B8,B8A,B9..B12). Default content looks vaguely like imagery:
smooth fields (bilinear up-sampled coarse noise) plus per-pixel texture, scaled per band by a
spectral profile, all deterministic from ``seed`` and the file index. ``pixel_fn(rng, class_index,
C, H, W) -> (C, H, W) array`` replaces it, e.g. to make classes differ only in non-RGB bands.
``bad_files`` adds broken inputs for tests: garbage bytes, a truncated file, a wrong band count.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from shards.chips import SENTINEL2_L1C

PixelFn = Callable[[np.random.Generator, int, int, int, int], np.ndarray]
# Rough top-of-atmosphere DN (reflectance x 10^4) of mixed vegetated land per S2 L1C band.
S2_PROFILE = np.array([1300, 1100, 1000, 900, 1300, 2200, 2500, 2700, 2800, 900, 30, 1900, 1100], np.float32)
RGB_PROFILE = np.array([110, 115, 95], np.float32)
_KINDS = {"rgb": (3, "uint8", 0.5), "s2": (13, "uint16", 10.0)}  # bands, dtype, gsd in metres
BAD_KINDS = ("garbage", "truncated", "bandcount")


@dataclass
class SyntheticFile:
    path: str
    relpath: str
    label: str | None
    class_index: int | None


@dataclass
class Archive:
    root: str
    files: list[SyntheticFile]
    bad: dict[str, str] = field(default_factory=dict)
    labels_csv: str | None = None
    band_names: list[str] = field(default_factory=list)
    nodata: float | None = None


def smooth_field(rng: np.random.Generator, h: int, w: int, cells: int = 6) -> np.ndarray:
    """(h, w) float32 in [0, 1]: coarse uniform noise bilinearly up-sampled (fields, land cover)."""
    coarse = rng.random((cells + 1, cells + 1), dtype=np.float32)
    ys = np.linspace(0, cells, h, dtype=np.float32)
    xs = np.linspace(0, cells, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(np.int64), cells - 1)
    x0 = np.minimum(xs.astype(np.int64), cells - 1)
    ty, tx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    return (a * (1 - tx) + b * tx) * (1 - ty) + (c * (1 - tx) + d * tx) * ty


def default_pixels(rng: np.random.Generator, class_index: int, c: int, h: int, w: int) -> np.ndarray:
    """(C, H, W) float32: profile x (smooth field) + texture; classes shift the field's brightness."""
    profile = S2_PROFILE if c == 13 else RGB_PROFILE if c == 3 else np.full(c, 1000, np.float32)
    bright = 0.7 + 0.6 * smooth_field(rng, h, w) + 0.1 * (class_index % 4)
    texture = rng.standard_normal((c, h, w), dtype=np.float32)
    return profile[:, None, None] * (bright[None] + 0.08 * texture)


def _cast(x: np.ndarray, dtype: str, nodata: float | None) -> np.ndarray:
    info = np.iinfo(dtype)
    lo = info.min + 1 if nodata is not None and nodata == info.min else info.min
    return np.clip(np.rint(x), lo, info.max).astype(dtype)


def _write(
    path: Path,
    data: np.ndarray,
    fmt: str,
    crs: str | None,
    transform,
    nodata,
    names,
    compress: str | None,
    interleave: str,
    tiled: bool,
) -> None:
    c, h, w = data.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("png", "jpg"):
        profile = dict(driver="PNG" if fmt == "png" else "JPEG", width=w, height=h, count=c, dtype=data.dtype.name)
    else:
        profile = dict(
            driver="GTiff",
            width=w,
            height=h,
            count=c,
            dtype=data.dtype.name,
            crs=crs,
            transform=transform,
            nodata=nodata,
            interleave=interleave,
        )
        if compress:
            profile["compress"] = compress
        if tiled:
            profile.update(tiled=True, blockxsize=min(256, w // 16 * 16 or 16), blockysize=min(256, h // 16 * 16 or 16))
        if c == 3 and data.dtype == np.uint8:
            profile["photometric"] = "RGB"
    with warnings.catch_warnings():  # PNG/JPEG previews carry no georeferencing by design
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        dst = rasterio.open(path, "w", **profile)
    with dst:
        dst.write(data)
        if fmt == "tif" and names:
            for i, n in enumerate(names):
                dst.set_band_description(i + 1, n)


def generate_archive(
    out_dir: str | os.PathLike,
    n_files: int,
    size: int | tuple[int, int] = 64,
    kind: str = "rgb",
    classes: Sequence[str] | None = None,
    pixel_fn: PixelFn | None = None,
    seed: int = 0,
    nodata: Literal["auto"] | float | None = "auto",
    layout: str = "class_folders",
    fmt: str = "tif",
    compress: str | None = None,
    interleave: str = "pixel",
    tiled: bool = False,
    sidecars: bool = False,
    labels_csv: bool = False,
    nodata_fraction: float = 0.0,
    bad_files: Sequence[str] = (),
) -> Archive:
    """Write ``n_files`` images under ``out_dir`` and return what was written.

    size: N or (H, W) pixels. kind: 'rgb' (3 x uint8, 0.5 m) or 's2' (13 x uint16, 10 m, band
    descriptions). classes: file i gets class i % len(classes); layout 'class_folders' puts it in
    ``<class>/``, 'flat' does not. nodata: 'auto' (0 for s2, none for rgb), None or a value;
    ``nodata_fraction`` blanks that fraction of rows at the top of every image with it.
    fmt: 'tif', or 'png'/'jpg' (rgb only; no georeferencing). sidecars: fMoW-style ``<name>.json``
    (gsd, timestamp, utm, bounding_boxes). labels_csv: write ``<out_dir>/labels.csv`` (path,label).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}")
    c, dtype, gsd = _KINDS[kind]
    if fmt != "tif" and kind != "rgb":
        raise ValueError("png/jpg archives are 3-band uint8 (kind='rgb')")
    h, w = (size, size) if isinstance(size, int) else size
    nd = (0.0 if kind == "s2" else None) if isinstance(nodata, str) else nodata  # str: 'auto'
    if fmt != "tif":
        nd = None
    names = list(SENTINEL2_L1C) if kind == "s2" else ["red", "green", "blue"]
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    fn = pixel_fn or default_pixels
    ext = {"tif": "tif", "png": "png", "jpg": "jpg"}[fmt]
    files: list[SyntheticFile] = []
    for i in range(n_files):
        rng = np.random.default_rng([seed, i])
        ci, label = (i % len(classes), classes[i % len(classes)]) if classes else (None, None)
        stem = f"{label}_{i:05d}" if label else f"img_{i:05d}"
        rel = f"{label}/{stem}.{ext}" if label and layout == "class_folders" else f"{stem}.{ext}"
        data = _cast(np.asarray(fn(rng, ci or 0, c, h, w)), dtype, nd)
        if nd is not None and nodata_fraction > 0:
            data[:, : int(round(h * nodata_fraction))] = nd
        transform = Affine(gsd, 0.0, 500000.0 + i * w * gsd, 0.0, -gsd, 4600000.0)
        _write(root / rel, data, fmt, "EPSG:32633", transform, nd, names, compress, interleave, tiled)
        if sidecars:
            side = {
                "gsd": gsd,
                "timestamp": f"2017-{1 + i % 12:02d}-{1 + i % 28:02d}T10:30:00Z",
                "utm": "33T",
                "img_width": w,
                "img_height": h,
                "bounding_boxes": [{"category": label or "none", "box": [0, 0, w, h]}],
            }
            (root / rel).with_suffix(".json").write_text(json.dumps(side))
        files.append(SyntheticFile(str(root / rel), rel, label, ci))
    bad = {k: str(_write_bad(root, k, kind, (h, w), seed)) for k in bad_files}
    csv_path = None
    if labels_csv:
        csv_path = str(root / "labels.csv")
        with open(csv_path, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["path", "label"])
            for sf in files:
                wr.writerow([sf.relpath, sf.label])
    return Archive(root=str(root), files=files, bad=bad, labels_csv=csv_path, band_names=names, nodata=nd)


def _write_bad(root: Path, what: str, kind: str, hw: tuple[int, int], seed: int) -> Path:
    """One broken input named ``bad_<what>.tif`` at the archive root."""
    path = root / f"bad_{what}.tif"
    c, dtype, gsd = _KINDS[kind]
    rng = np.random.default_rng([seed, 99991])
    if what == "garbage":
        path.write_bytes(b"this is not a tiff\n" + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif what in ("truncated", "bandcount"):
        bands = c + 1 if what == "bandcount" else c
        data = _cast(default_pixels(rng, 0, bands, *hw), dtype, None)
        _write(path, data, "tif", "EPSG:32633", Affine(gsd, 0.0, 0.0, 0.0, -gsd, 0.0), None, None, None, "band", False)
        if what == "truncated":
            # keep the header and directory, lose most pixel data: opens, fails on read
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)
    else:
        raise ValueError(f"bad_files kinds: {BAD_KINDS}")
    return path
