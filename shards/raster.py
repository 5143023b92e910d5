"""Reading rasters (GeoTIFF, JPEG, PNG, anything GDAL opens) through rasterio.

``scan_source`` reads only a file's header into a :class:`SourceInfo` (size, dtype, bands, CRS,
transform, nodata, gsd, timestamp, sidecar fields). ``DatasetCache`` keeps one open handle per
worker process. ``read_window`` reads the in-image part of a window, optionally resampled, and
pads the rest. JPEG/PNG previews have no georeferencing: their transform is pixel coordinates
(identity) and their CRS null.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from shards.chips import pad_value_for, place, select_bands

_COLOR_NAMES = {
    ColorInterp.red: "red",
    ColorInterp.green: "green",
    ColorInterp.blue: "blue",
    ColorInterp.alpha: "alpha",
}


@dataclass
class SourceInfo:
    """One input image as planned. ``indexes`` are the 1-based source bands read, in output order;
    ``band_names`` their names; ``nodata`` the effective value (the file's, else --nodata)."""

    index: int
    path: str
    relpath: str
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    band_names: list[str]
    indexes: list[int]
    crs: str | None
    transform: tuple[float, ...]
    gsd: float | None
    timestamp: str | None
    label: str | None = None
    key: str = ""
    extra: dict = field(default_factory=dict)
    band_paths: list[str] = field(default_factory=list)  # --band-files: one file per band, in order

    @property
    def signature(self) -> tuple[int, str]:
        """What every sample of one conversion must share: (bands out, dtype)."""
        return len(self.indexes), self.dtype


# GDAL settings for the converter's reads. GTIFF_VIRTUAL_MEM_IO maps uncompressed GeoTIFFs and
# copies pixels straight out of the mapping instead of through GDAL's block cache: measured on
# 512x512x13 uint16 pixel-interleaved files (idle 2-core VM), 7.5-10 ms a file instead of 18-20.
# GDAL checks the file size first, so a truncated file still fails cleanly; compressed files
# take the normal path. GDAL_DISABLE_READDIR_ON_OPEN=TRUE: GDAL stops listing the input's folder
# (up to 1000 entries) on every open to look for sidecars and probes the sidecars it wants by name
# instead, so world files and .aux.xml are still found: 0.55 instead of 0.9-1.0 ms an open in a
# folder of 5,000 or 50,000 GeoTIFFs (EMPTY_DIR would lose the sidecars). A value the user exports
# in the environment wins.
READ_OPTIONS = {"GTIFF_VIRTUAL_MEM_IO": "IF_ENOUGH_RAM", "GDAL_DISABLE_READDIR_ON_OPEN": "TRUE"}


def reading_env() -> rasterio.Env:
    """rasterio.Env with READ_OPTIONS (minus any the user set in the environment)."""
    return rasterio.Env(**{k: v for k, v in READ_OPTIONS.items() if k not in os.environ})


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def open_dataset(path: str):
    with _quiet():
        return rasterio.open(path)


_CRS_NAMES: dict[str, str] = {}


def crs_string(crs) -> str | None:
    """'EPSG:n' when the CRS is exactly an EPSG code, else its WKT; None when absent.

    Cached by WKT: the EPSG lookup searches PROJ's database (~1 ms) and archives reuse a few CRSs."""
    if crs is None:
        return None
    wkt = crs.to_wkt()
    if wkt not in _CRS_NAMES:
        epsg = crs.to_epsg()
        _CRS_NAMES[wkt] = f"EPSG:{epsg}" if epsg else wkt
    return _CRS_NAMES[wkt]


def source_band_names(ds, override: list[str] | None) -> list[str]:
    """Band names: --band-names, else the GeoTIFF band descriptions, else RGB colour
    interpretation, else 'band1'..'bandN'."""
    if override is not None:
        if len(override) != ds.count:
            raise ValueError(f"--band-names gives {len(override)} names but the image has {ds.count} bands")
        return list(override)
    names = []
    for i in range(ds.count):
        desc = ds.descriptions[i]
        ci = _COLOR_NAMES.get(ds.colorinterp[i]) if ds.count in (3, 4) else None
        names.append(desc or ci or f"band{i + 1}")
    return names


def _gsd(ds) -> float | None:
    """Ground sample distance in metres from the transform, for projected metre CRSs only."""
    crs = ds.crs
    if crs is None or not crs.is_projected:
        return None
    units = (crs.linear_units or "").lower()
    if units not in ("metre", "meter", "m", "metres", "meters"):
        return None
    return float(abs(ds.transform.a))


def scan_source(index: int, path: str, relpath: str, opts, sidecar: dict | None) -> SourceInfo:
    """Header-only read of one file; raises (any exception) when it is not a usable raster or the
    band selection does not apply; the caller turns that into a skipped.jsonl entry."""
    with open_dataset(path) as ds:
        if ds.count < 1:
            raise ValueError("no raster bands")
        dtypes = set(ds.dtypes)
        if len(dtypes) != 1:
            raise ValueError(f"mixed band dtypes {sorted(dtypes)}")
        names = source_band_names(ds, opts.band_names)
        indexes = select_bands(names, opts.bands, opts.drop_bands)
        nodata = ds.nodata if ds.nodata is not None else opts.nodata
        info = SourceInfo(
            index=index,
            path=path,
            relpath=relpath,
            width=ds.width,
            height=ds.height,
            count=ds.count,
            dtype=ds.dtypes[0],
            nodata=None if nodata is None else float(nodata),
            band_names=[names[i - 1] for i in indexes],
            indexes=indexes,
            crs=crs_string(ds.crs),
            transform=tuple(float(v) for v in tuple(ds.transform)[:6]),
            gsd=_gsd(ds),
            timestamp=ds.tags().get("TIFFTAG_DATETIME"),
        )
    if sidecar:
        if isinstance(sidecar.get("gsd"), (int, float)):
            info.gsd = float(sidecar["gsd"])
        if sidecar.get("timestamp") is not None:
            info.timestamp = str(sidecar["timestamp"])
        info.extra = {k: v for k, v in sidecar.items() if k not in ("gsd", "timestamp")}
    return info


class DatasetCache:
    """The one open source of this process (kept across consecutive windows/shards of the same
    file or scene, closed when another one is needed): a rasterio dataset, or a
    ``band_stack.BandStack`` for a --band-files scene."""

    def __init__(self):
        self.path: str | None = None
        self.ds = None

    def get(self, info: SourceInfo, resampling: str = "bilinear"):
        key = info.relpath if info.band_paths else info.path
        if self.path != key:
            self.close()
            if info.band_paths:
                from shards.band_stack import BandStack

                self.ds = BandStack(info, resampling)
            else:
                self.ds = open_dataset(info.path)
            self.path = key
        return self.ds

    def close(self) -> None:
        if self.ds is not None:
            self.ds.close()
        self.ds, self.path = None, None


def window_transform(info: SourceInfo, window, out_hw: tuple[int, int] | None) -> list[float]:
    """Affine [a, b, c, d, e, f] of a chip: the window's origin, scaled when resized to out_hw."""
    a, b, c, d, e, f = info.transform
    col, row, w, h = window
    sx = w / out_hw[1] if out_hw else 1.0
    sy = h / out_hw[0] if out_hw else 1.0
    return [a * sx, b * sy, a * col + b * row + c, d * sx, e * sy, d * col + e * row + f]


def read_window(
    ds, info: SourceInfo, window, out_hw: tuple[int, int] | None, resampling: Resampling
) -> tuple[np.ndarray, int]:
    """Read one window -> (chip (C, H, W) in the source dtype, padded pixels per band).

    The in-image part is read (resampled to its share of ``out_hw`` when resizing); the rest is
    filled with nodata (see ``chips.pad_value_for``).
    """
    col, row, w, h = window
    vw = min(col + w, info.width) - col
    vh = min(row + h, info.height) - row
    oh, ow = out_hw if out_hw else (h, w)
    if vw == w and vh == h:
        return _read(ds, info, Window(col, row, w, h), (oh, ow) if out_hw else None, resampling), 0
    # partial window: scale the valid part into its share of the output grid
    th = max(1, round(vh * oh / h))
    tw = max(1, round(vw * ow / w))
    valid = _read(ds, info, Window(col, row, vw, vh), (th, tw) if out_hw else None, resampling)
    fill = pad_value_for(info.dtype, info.nodata)
    return place(valid, (oh, ow), (0, 0), fill), oh * ow - th * tw


def _read(ds, info: SourceInfo, window: Window, out_hw, resampling: Resampling) -> np.ndarray:
    with _quiet():
        if out_hw is None:
            return ds.read(info.indexes, window=window)
        return ds.read(info.indexes, window=window, out_shape=(len(info.indexes), *out_hw), resampling=resampling)


def read_rows(ds, info: SourceInfo, row: int, height: int, col: int, width: int) -> np.ndarray:
    """Rows [row, row+height) x cols [col, col+width) clipped to the image, native resolution."""
    h = min(row + height, info.height) - row
    w = min(col + width, info.width) - col
    with _quiet():
        if row == 0 and col == 0 and h == info.height and w == info.width:
            return ds.read(info.indexes)
        return ds.read(info.indexes, window=Window(col, row, w, h))


def resampling_method(name: str) -> Resampling:
    try:
        return Resampling[name]
    except KeyError:
        raise ValueError(name) from None


def is_nan(v: float | None) -> bool:
    return v is not None and isinstance(v, float) and math.isnan(v)
