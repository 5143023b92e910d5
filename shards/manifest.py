"""manifest.json: what a shard directory holds (engine/data sizes epochs and normalizes from it).

Layout (format ``geoexplora-shards/1``)::

    {"format", "converter": {"version", "args"},
     "shards": [{"name", "count", "bytes", "sha256"}], "total_samples",
     "num_bands", "band_names", "dtype", "nodata", "classes",
     "stats": {"count", "mean", "std", "min", "max", "p2", "p98"}}   # one entry per band

The file is strict JSON (no NaN/Infinity tokens, which most JSON readers other than Python's
reject): a NaN nodata value is written as the string ``"nan"`` (the STAC raster extension's
convention; ``float("nan")`` reads it back), and a statistic is a finite number or null (null
exactly when the band has no valid pixel, ``count`` 0). ``stats`` cover exactly the samples the
shards hold. ``classes`` is the sorted list of labels present (class index = position) or null. When a sample
has several class names (CSV cell ``"a;b"``), ``classes`` lists the individual names and the
manifest adds ``"multilabel": true``; such a sample's json has ``"labels": ["a", "b"]`` beside
``"label": "a;b"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from engine.atomic import atomic_write_text
from engine.errors import UserError

FORMAT = "geoexplora-shards/1"
NAME = "manifest.json"


def converter_version() -> str:
    from shards import __version__

    return __version__


def json_number(v: float | None):
    """A float for strict JSON: NaN/inf become the strings "nan"/"inf"/"-inf" (STAC raster's nodata
    convention); None and finite values pass through."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def build_manifest(
    args: dict,
    shards: Sequence[dict],
    band_names: list[str],
    dtype: str,
    nodata: float | None,
    classes: list[str] | None,
    stats: dict,
    multilabel: bool = False,
) -> dict:
    """shards: [{"name", "count", "bytes", "sha256"}] in shard order; multilabel: some sample has
    several class names (adds ``"multilabel": true``)."""
    rows = [
        {"name": s["name"], "count": int(s["count"]), "bytes": int(s["bytes"]), "sha256": s["sha256"]} for s in shards
    ]
    return {
        "format": FORMAT,
        "converter": {"version": converter_version(), "args": args},
        "shards": rows,
        "total_samples": sum(r["count"] for r in rows),
        "num_bands": len(band_names),
        "band_names": list(band_names),
        "dtype": dtype,
        "nodata": json_number(nodata),
        "classes": sorted(classes) if classes else None,
        "stats": stats,
    } | ({"multilabel": True} if multilabel else {})


def write_manifest(out: Path, manifest: dict) -> Path:
    path = Path(out) / NAME
    # allow_nan=False: a non-finite value is a bug upstream; fail here rather than write what
    # strict JSON readers reject
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=False, allow_nan=False) + "\n")
    return path


def read_manifest(out: Path, flag: str = "verify") -> dict:
    """Load and sanity-check ``<out>/manifest.json``; UserError when missing or not ours."""
    path = Path(out) / NAME if Path(out).is_dir() else Path(out)
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{flag} '{out}': no {NAME}; convert an archive into it first "
            "(or the conversion was interrupted: rerun it with --resume)"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(
            f"{flag} '{path}': unreadable manifest ({e.__class__.__name__}); rerun the conversion"
        ) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{flag} '{path}': not a {FORMAT} manifest")
    if not isinstance(m.get("shards"), list):
        raise UserError(f"{flag} '{path}': 'shards' is not a list")
    return m


def summary_lines(m: dict) -> list[str]:
    """Short human-readable description of a manifest (demo / CLI output)."""
    st = m.get("stats") or {}

    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"

    lines = [
        f"{m['total_samples']} samples in {len(m['shards'])} shard(s); {m['num_bands']} bands "
        f"{m['dtype']}, nodata {m['nodata']}; classes: {', '.join(m['classes']) if m['classes'] else '-'}"
    ]
    for i, name in enumerate(m["band_names"]):
        lines.append(
            f"  {name:>6}: mean {fmt(st['mean'][i])} std {fmt(st['std'][i])} "
            f"min {fmt(st['min'][i])} max {fmt(st['max'][i])} p2 {fmt(st['p2'][i])} "
            f"p98 {fmt(st['p98'][i])} (n={st['count'][i]})"
        )
    return lines
