"""Streaming per-band statistics over valid pixels: count, mean, std, min, max, p2, p98.

Two exact-or-bounded strategies, chosen by dtype:

- 8/16-bit integers (uint8, int8, uint16, int16 -- nearly every satellite archive): an exact
  per-band histogram with one bin per representable value, filled by ``np.bincount`` over slices of
  at most 256 Ki pixels cast into one reused intp buffer (bincount casts its input to intp; a
  reused, cache-sized buffer saves that allocation and keeps the pass in L2). Measured on
  13 x 512 x 512 uint16 (2-core VM): 3.9 ms, against 4.8 ms for a plain per-band ``np.bincount``
  and 7.3 ms for ``np.add.at``. Count, mean, std, min, max and the percentiles all follow from it
  exactly (percentiles match ``np.percentile``'s default linear interpolation); merging is plain
  addition, so independent of the order shards finish in. Nodata is excluded by restoring its bin
  to the count it had before the chip, padding (when no nodata value exists) by subtracting the padded pixel
  count from the pad bin: no per-pixel mask is ever built.
- everything else (float32, int32, ...): float64 count/mean/M2 (Chan's parallel merge), min/max,
  and a 4096-bin histogram on a power-of-two grid that coarsens by 2 whenever the data outgrows
  it, so two histograms always align after coarsening. Percentiles are interpolated within a bin.
"""

from __future__ import annotations

import math

import numpy as np

EXACT_DTYPES = {"uint8", "int8", "uint16", "int16"}
FLOAT_BINS = 4096
_SLICE = 1 << 18  # pixels per bincount call: a 2 MiB intp buffer stays in L2
_BUFFER: list[np.ndarray] = []


def _intp_buffer(n: int) -> np.ndarray:
    """This process's reusable intp buffer of at least ``n`` elements (bincount's input)."""
    if not _BUFFER or _BUFFER[0].size < n:
        _BUFFER[:] = [np.empty(max(n, 1), dtype=np.intp)]
    return _BUFFER[0]


def _as_unsigned(x: np.ndarray) -> np.ndarray:
    """Signed 8/16-bit -> the unsigned type with the same order (flip the sign bit), else x."""
    if x.dtype == np.int8:
        return x.view(np.uint8) ^ np.uint8(0x80)
    if x.dtype == np.int16:
        return x.view(np.uint16) ^ np.uint16(0x8000)
    return x


class BandStats:
    """Accumulates statistics of a (C, H, W) stream of one dtype.

    ``add(chip, nodata, pad_pixels, pad_value)``: chip (C, H, W); ``nodata`` the value to exclude
    (None = none; NaN is always excluded for floats); ``pad_pixels`` pixels per band that were
    filled with ``pad_value`` by edge padding and are not data.
    """

    def __init__(self, num_bands: int, dtype: str):
        self.num_bands = int(num_bands)
        self.dtype = np.dtype(dtype).name
        self.exact = self.dtype in EXACT_DTYPES
        if self.exact:
            bits = np.dtype(dtype).itemsize * 8
            self.offset = 1 << (bits - 1) if np.dtype(dtype).kind == "i" else 0
            self.hist = np.zeros((self.num_bands, 1 << bits), dtype=np.int64)
        else:
            self.n = np.zeros(self.num_bands, dtype=np.int64)
            self.mean = np.zeros(self.num_bands)
            self.m2 = np.zeros(self.num_bands)
            self.vmin = np.full(self.num_bands, np.inf)
            self.vmax = np.full(self.num_bands, -np.inf)
            self.fhist = [FloatHist() for _ in range(self.num_bands)]
            self.zeros = np.zeros(self.num_bands, dtype=np.int64)

    # ---- accumulation -------------------------------------------------------------------------
    def add(
        self, chip: np.ndarray, nodata: float | None = None, pad_pixels: int = 0, pad_value: float | None = None
    ) -> None:
        """Fold one chip (C, H, W) into the statistics."""
        for b in range(self.num_bands):
            band = chip[b].reshape(-1)
            if self.exact:
                self._add_exact(b, band, nodata, int(pad_pixels), pad_value)
            else:
                self._add_float(b, band, nodata)

    def band_adder(self, nodata: float | None = None, pad_pixels: int = 0, pad_value: float | None = None):
        """For 8/16-bit data: ``fn(b, band)`` that folds band ``b`` (1-D) of one chip in, as ``add``
        does for the whole chip (``ShardWriter.write(visit=...)`` calls it band by band); None for
        other dtypes (use ``add``)."""
        if not self.exact:
            return None
        return lambda b, band: self._add_exact(b, band, nodata, int(pad_pixels), pad_value)

    def _add_exact(self, b: int, band: np.ndarray, nodata, pad: int, pad_value) -> None:
        h = self.hist[b]
        nd = int(nodata) + self.offset if nodata is not None and self._in_range(nodata) else None
        before = int(h[nd]) if nd is not None else 0
        values = _as_unsigned(band)
        idx_buf = _intp_buffer(min(values.size, _SLICE))
        for start in range(0, values.size, _SLICE):
            part = values[start : start + _SLICE]
            idx = idx_buf[: part.size]
            np.copyto(idx, part, casting="unsafe")
            counts = np.bincount(idx)
            h[: counts.size] += counts
        if nd is not None:
            h[nd] = before
        if pad and pad_value is not None and (nd is None or int(pad_value) + self.offset != nd):
            h[int(pad_value) + self.offset] -= pad

    def _in_range(self, v: float) -> bool:
        return float(v).is_integer() and 0 <= int(v) + self.offset < self.hist.shape[1]

    def _add_float(self, b: int, band: np.ndarray, nodata) -> None:
        x = band.astype(np.float64, copy=False)
        valid = ~np.isnan(x)
        if nodata is not None and not math.isnan(nodata):
            valid &= x != nodata
        if not valid.all():
            x = x[valid]
        if x.size == 0:
            return
        self.zeros[b] += int(np.count_nonzero(x == 0))
        n, mean = x.size, float(x.mean())
        m2 = float(np.square(x - mean).sum())
        self._merge_moments(b, n, mean, m2)
        self.vmin[b] = min(self.vmin[b], float(x.min()))
        self.vmax[b] = max(self.vmax[b], float(x.max()))
        self.fhist[b].add(x)

    def _merge_moments(self, b: int, n: int, mean: float, m2: float) -> None:
        na = int(self.n[b])
        tot = na + n
        delta = mean - self.mean[b]
        self.mean[b] += delta * n / tot
        self.m2[b] += m2 + delta * delta * na * n / tot
        self.n[b] = tot

    def zero_counts(self) -> np.ndarray:
        """(C,) pixels counted so far whose value is exactly 0 (the undeclared-nodata check)."""
        return self.hist[:, self.offset].copy() if self.exact else self.zeros.copy()

    # ---- merge / persistence --------------------------------------------------------------------
    def merge(self, other: BandStats) -> None:
        """Fold ``other`` into self. Exact: order-free; float: merge in a fixed order."""
        if self.exact:
            self.hist += other.hist
            return
        for b in range(self.num_bands):
            if other.n[b]:
                self._merge_moments(b, int(other.n[b]), float(other.mean[b]), float(other.m2[b]))
                self.vmin[b] = min(self.vmin[b], other.vmin[b])
                self.vmax[b] = max(self.vmax[b], other.vmax[b])
                self.fhist[b].merge(other.fhist[b])

    def merge_arrays(self, d) -> None:
        """Fold a ``to_arrays()`` state into self (sparse add for exact histograms)."""
        if self.exact and str(d["dtype"]) == self.dtype:
            np.add.at(self.hist, (np.asarray(d["band"]), np.asarray(d["value"])), np.asarray(d["count"]))
        else:
            self.merge(BandStats.from_arrays(d))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Compact picklable/np.savez-able state (sparse histograms)."""
        head = {"num_bands": np.array(self.num_bands), "dtype": np.array(self.dtype)}
        if self.exact:
            band, value = np.nonzero(self.hist)
            return {
                **head,
                "band": band.astype(np.int32),
                "value": value.astype(np.int32),
                "count": self.hist[band, value],
            }
        out = {**head, "n": self.n, "mean": self.mean, "m2": self.m2, "vmin": self.vmin, "vmax": self.vmax}
        for b, fh in enumerate(self.fhist):
            out[f"h{b}"] = fh.to_array()
        return out

    @classmethod
    def from_arrays(cls, d) -> BandStats:
        s = cls(int(d["num_bands"]), str(d["dtype"]))
        if s.exact:
            s.hist[np.asarray(d["band"]), np.asarray(d["value"])] = np.asarray(d["count"])
            return s
        s.n, s.mean, s.m2 = np.array(d["n"]), np.array(d["mean"]), np.array(d["m2"])
        s.vmin, s.vmax = np.array(d["vmin"]), np.array(d["vmax"])
        s.fhist = [FloatHist.from_array(np.asarray(d[f"h{b}"])) for b in range(s.num_bands)]
        return s

    # ---- results --------------------------------------------------------------------------------
    def result(self) -> dict[str, list]:
        """{"count", "mean", "std", "min", "max", "p2", "p98"}: one entry per band (None when no
        valid pixel). Std is the population std (ddof=0), like ``np.std``. Every value is finite
        or None (a float64 overflow, e.g. the squares of 1e200 values, gives None, never inf/NaN:
        the manifest is strict JSON and verify flags a None beside a non-zero count)."""
        keys = ("count", "mean", "std", "min", "max", "p2", "p98")
        out: dict[str, list] = {k: [] for k in keys}
        for b in range(self.num_bands):
            row = self._exact_band(b) if self.exact else self._float_band(b)
            for k in keys:
                v = row[k]
                out[k].append(None if isinstance(v, float) and not math.isfinite(v) else v)
        return out

    def _exact_band(self, b: int) -> dict:
        h = self.hist[b]
        nz = np.nonzero(h)[0]
        n = int(h.sum())
        if n == 0:
            return _empty_row()
        values = nz.astype(np.float64) - self.offset
        counts = h[nz].astype(np.float64)
        mean = float(np.dot(values, counts) / n)
        var = float(np.dot(np.square(values - mean), counts) / n)
        cum = np.cumsum(h[nz])

        def pct(q: float) -> float:
            # np.percentile "linear": value at fractional rank q/100 * (n - 1) in the sorted data.
            r = q / 100.0 * (n - 1)
            lo, frac = int(math.floor(r)), r - math.floor(r)
            v_lo = values[np.searchsorted(cum, lo, side="right")]
            v_hi = values[np.searchsorted(cum, min(lo + 1, n - 1), side="right")]
            return float(v_lo + frac * (v_hi - v_lo))

        return {
            "count": n,
            "mean": mean,
            "std": math.sqrt(var),
            "min": float(values[0]),
            "max": float(values[-1]),
            "p2": pct(2),
            "p98": pct(98),
        }

    def _float_band(self, b: int) -> dict:
        n = int(self.n[b])
        if n == 0:
            return _empty_row()
        lo, hi = float(self.vmin[b]), float(self.vmax[b])
        clamp = lambda v: float(min(max(v, lo), hi))  # noqa: E731
        fh = self.fhist[b]
        return {
            "count": n,
            "mean": float(self.mean[b]),
            "std": math.sqrt(max(self.m2[b], 0.0) / n),
            "min": lo,
            "max": hi,
            "p2": clamp(fh.percentile(2)),
            "p98": clamp(fh.percentile(98)),
        }


ZERO_SHARE_WARN = 0.01
"""Warn when files without a nodata value have at least this share of pixels that are 0 in every
band: a scene border (the Landsat scene of issue 17: 3.5 %, mean 6544 instead of 6783)."""


def undeclared_nodata_warning(records) -> str | None:
    """records: [source, pixels, zeros per band] of files that declare no nodata (build.ShardResult
    .zeros, several per file when it spans shards) -> a warning suggesting --nodata 0, or None.
    A file's share is that of its band with the fewest zeros: an upper bound on the pixels that are
    0 in every band, and equal to it for a border (0 in all bands). Read off the histograms, it costs
    no pass over the pixels."""
    per: dict[str, list] = {}
    for src, pixels, zeros in records:
        acc = per.setdefault(src, [0, np.zeros(len(zeros), dtype=np.int64)])
        acc[0] += pixels
        acc[1] += np.asarray(zeros, dtype=np.int64)
    share = {src: float(z.min()) / n for src, (n, z) in per.items() if n}
    hit = sorted((s for s in share if share[s] >= ZERO_SHARE_WARN), key=lambda s: (-share[s], s))
    if not hit:
        return None
    pixels = sum(per[s][0] for s in hit)
    zeros = sum(float(per[s][1].min()) for s in hit)
    return (
        f"{len(hit)} file(s) declare no nodata value, yet {100 * zeros / pixels:.1f} % of their pixels are 0 in "
        f"every band (e.g. '{hit[0]}': {100 * share[hit[0]]:.1f} %): a scene border? The stats count those "
        "zeros as data; if 0 marks missing pixels, rerun with --nodata 0"
    )


def _empty_row() -> dict:
    return {"count": 0, "mean": None, "std": None, "min": None, "max": None, "p2": None, "p98": None}


class FloatHist:
    """Histogram of floats on the grid ``[k * w, (k + 1) * w)``, ``w`` a power of two, at most
    FLOAT_BINS occupied-span bins. ``k0`` is the first bin's index, ``counts`` the span."""

    def __init__(self):
        self.exp = 0  # w = 2 ** exp
        self.k0 = 0
        self.counts = np.zeros(0, dtype=np.int64)

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exp)

    def add(self, x: np.ndarray) -> None:
        """x: finite float64 values (1-D)."""
        lo, hi = float(x.min()), float(x.max())
        if not self.counts.size:
            span = hi - lo
            if span > 0:
                self.exp = math.ceil(math.log2(span / (FLOAT_BINS - 2)))
            else:
                self.exp = (math.frexp(abs(lo))[1] - 24) if lo != 0 else -24
        while math.floor(hi / self.width) - math.floor(lo / self.width) >= FLOAT_BINS:
            self._coarsen()
        k = np.floor(x / self.width).astype(np.int64)
        kmin = int(k.min())
        other = np.bincount(k - kmin)
        self._add_span(kmin, other)

    def _coarsen(self) -> None:
        """Double the bin width; bin k merges into k // 2 (floor), so grids stay aligned."""
        self.exp += 1
        if self.counts.size:
            ks = np.arange(self.k0, self.k0 + self.counts.size) // 2
            new0 = int(ks[0])
            self.counts = np.bincount(ks - new0, weights=self.counts).astype(np.int64)
            self.k0 = new0

    def _add_span(self, k0: int, counts: np.ndarray) -> None:
        """Add ``counts`` of bins k0.. (same width); coarsen both sides first until the union of
        the two spans fits FLOAT_BINS, so nothing larger than that is ever allocated."""
        if not self.counts.size:
            self.k0, self.counts = k0, counts.astype(np.int64)
            while self.counts.size > FLOAT_BINS:
                self._coarsen()
            return
        o = FloatHist()
        o.exp, o.k0, o.counts = self.exp, k0, counts.astype(np.int64)
        while (max(self.k0 + self.counts.size, o.k0 + o.counts.size) - min(self.k0, o.k0)) > FLOAT_BINS:
            self._coarsen()
            o._coarsen()
        start = min(self.k0, o.k0)
        out = np.zeros(max(self.k0 + self.counts.size, o.k0 + o.counts.size) - start, dtype=np.int64)
        out[self.k0 - start : self.k0 - start + self.counts.size] += self.counts
        out[o.k0 - start : o.k0 - start + o.counts.size] += o.counts
        self.k0, self.counts = start, out

    def merge(self, other: FloatHist) -> None:
        if not other.counts.size:
            return
        o = FloatHist()
        o.exp, o.k0, o.counts = other.exp, other.k0, other.counts.copy()
        if not self.counts.size:
            self.exp = o.exp
        while o.exp < self.exp:
            o._coarsen()
        while self.exp < o.exp:
            self._coarsen()
        self._add_span(o.k0, o.counts)

    def percentile(self, q: float) -> float:
        """np.percentile's linear interpolation between order statistics, each taken as the
        centre of its bin (error <= half a bin width)."""
        n = int(self.counts.sum())
        cum = np.cumsum(self.counts)
        r = q / 100.0 * (n - 1)
        lo, frac = int(math.floor(r)), r - math.floor(r)

        def at(rank: int) -> float:
            return (self.k0 + int(np.searchsorted(cum, rank, side="right")) + 0.5) * self.width

        v_lo = at(lo)
        return v_lo + frac * (at(min(lo + 1, n - 1)) - v_lo)

    def to_array(self) -> np.ndarray:
        return np.concatenate([[self.exp, self.k0], self.counts]).astype(np.int64)

    @classmethod
    def from_array(cls, a: np.ndarray) -> FloatHist:
        h = cls()
        h.exp, h.k0, h.counts = int(a[0]), int(a[1]), a[2:].astype(np.int64)
        return h
