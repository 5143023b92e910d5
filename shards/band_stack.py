"""A scene of one-file-per-band rasters read as one multi-band image on a reference grid.

``scan_scene`` reads the band files' headers and fixes the scene's grid: the finest band's grid
(the first such band in --bands order), or, with ``--resolution R``, that band's bounds cut into
R-sized pixels. ``BandStack`` is what the converter reads pixels from: it answers
``read(indexes, window=, out_shape=, resampling=)`` like a rasterio dataset. A band already on the
grid is read directly; any other band goes through a ``WarpedVRT`` onto the grid (``--resampling``,
default bilinear), which also reprojects a band in another CRS. A window read from the VRT equals
the same window of ``rasterio.warp.reproject`` over the whole band (tests/shards/test_band_files.py
checks it). Nodata: the first band file's, else ``--nodata``; warped bands treat their own nodata
as missing, so it never bleeds into the resampled values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from shards.band_files import band_tokens
from shards.raster import SourceInfo, crs_string, open_dataset, resampling_method


@dataclass
class BandHeader:
    path: str
    relpath: str
    width: int
    height: int
    dtype: str
    nodata: float | None
    crs: str | None
    transform: Affine
    timestamp: str | None

    @property
    def pixel_area(self) -> float:
        return abs(self.transform.a * self.transform.e - self.transform.b * self.transform.d)


def _header(path: str, relpath: str) -> BandHeader:
    with open_dataset(path) as ds:
        if ds.count != 1:
            raise ValueError(f"'{relpath}' has {ds.count} bands; --band-files expects one band per file")
        return BandHeader(
            path,
            relpath,
            ds.width,
            ds.height,
            ds.dtypes[0],
            ds.nodata,
            crs_string(ds.crs),
            ds.transform,
            ds.tags().get("TIFFTAG_DATETIME"),
        )


def scene_grid(ref: BandHeader, resolution: float | None) -> tuple[Affine, int, int]:
    """(transform, width, height) of the scene: ``ref``'s grid, or its bounds at ``resolution``."""
    if resolution is None:
        return ref.transform, ref.width, ref.height
    t = ref.transform
    if t.b != 0 or t.d != 0:
        raise ValueError(f"'{ref.relpath}' has a rotated grid; --resolution needs a north-up one")
    width = max(1, round(abs(t.a) * ref.width / resolution))
    height = max(1, round(abs(t.e) * ref.height / resolution))
    return Affine(math.copysign(resolution, t.a), 0.0, t.c, 0.0, math.copysign(resolution, t.e), t.f), width, height


def scan_scene(index: int, relpath: str, bands: dict, opts) -> SourceInfo:
    """Header-only read of a scene's band files (see module docstring); raises ValueError with the
    reason when the scene cannot be stacked (the caller records it in skipped.jsonl)."""
    tokens = band_tokens(opts)
    heads = []
    for tok in tokens:
        cands = [_header(p, r) for p, r in bands[tok]]
        heads.append(min(cands, key=lambda h: h.pixel_area))  # the finest of several matches; ties: first
    dtypes = sorted({h.dtype for h in heads})
    if len(dtypes) > 1:
        raise ValueError("bands differ in dtype (" + ", ".join(f"{t} {h.dtype}" for t, h in zip(tokens, heads)) + ")")
    if any(h.crs is None for h in heads):
        raise ValueError(
            f"'{next(h.relpath for h in heads if h.crs is None)}' has no CRS; cannot put the bands on one grid"
        )
    finest = min(h.pixel_area for h in heads)
    ref = next(h for h in heads if h.pixel_area == finest)
    transform, width, height = scene_grid(ref, opts.resolution)
    nodata = heads[0].nodata if heads[0].nodata is not None else opts.nodata
    crs = CRS.from_user_input(ref.crs)
    gsd = abs(transform.a) if crs.is_projected and (crs.linear_units or "").lower() in ("metre", "meter", "m") else None
    return SourceInfo(
        index=index,
        path=heads[0].path,
        relpath=relpath,
        width=width,
        height=height,
        count=len(tokens),
        dtype=dtypes[0],
        nodata=None if nodata is None else float(nodata),
        band_names=list(tokens),
        indexes=list(range(1, len(tokens) + 1)),
        crs=ref.crs,
        transform=tuple(transform)[:6],
        gsd=gsd,
        timestamp=ref.timestamp,
        band_paths=[h.path for h in heads],
        extra={"band_sources": [h.relpath for h in heads]},
    )


class BandStack:
    """The bands of one scene on its grid; closes every file it opened."""

    def __init__(self, info: SourceInfo, resampling: str):
        self.info = info
        self.width, self.height = info.width, info.height
        transform = Affine(*info.transform)
        crs = CRS.from_user_input(info.crs)
        method = resampling_method(resampling)
        self._files, self._bands = [], []
        try:
            for path in info.band_paths:
                ds = open_dataset(path)
                self._files.append(ds)
                if ds.crs == crs and ds.transform == transform and (ds.width, ds.height) == (self.width, self.height):
                    self._bands.append(ds)
                    continue
                src_nd = ds.nodata if ds.nodata is not None else info.nodata
                vrt = WarpedVRT(
                    ds,
                    crs=crs,
                    transform=transform,
                    width=self.width,
                    height=self.height,
                    resampling=method,
                    src_nodata=src_nd,
                    nodata=info.nodata,
                )
                self._files.append(vrt)
                self._bands.append(vrt)
        except BaseException:
            self.close()
            raise

    def read(self, indexes, window: Window | None = None, out_shape=None, resampling=None) -> np.ndarray:
        """(len(indexes), h, w) in the scene dtype; ``indexes`` are 1-based positions in --bands."""
        win = window if window is not None else Window(0, 0, self.width, self.height)
        hw = tuple(out_shape[-2:]) if out_shape is not None else (int(win.height), int(win.width))
        out = np.empty((len(indexes), *hw), dtype=self.info.dtype)
        for k, i in enumerate(indexes):
            if out_shape is None:
                self._bands[i - 1].read(1, window=win, out=out[k])
            else:
                self._bands[i - 1].read(1, window=win, out=out[k], resampling=resampling)
        return out

    def close(self) -> None:
        for f in reversed(self._files):
            f.close()
        self._files, self._bands = [], []
