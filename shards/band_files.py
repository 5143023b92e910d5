"""One file per band (``--band-files``): group the listed files into scenes, one sample source each.

Landsat and Sentinel-2 ship one raster per band. ``--band-files '{scene}_{band}.TIF' --bands
B4,B3,B2`` matches every listed file's path against the pattern: ``{band}`` is one of the ``--bands``
tokens (longest first, so ``SR_B4`` and ``B4`` never mix up), ``{scene}`` is the rest of the name,
``*`` matches within a name, and any folders before the pattern belong to the scene too. A scene's
relative path (``<folders>/<scene>``) is its ``"source"`` and sample key. Files that match no band
are left out (QA bands, thumbnails); a scene that lacks one of the bands is skipped with the reason.
When several files match one band of a scene (Sentinel-2 L2A ships B02 at 10, 20 and 60 m), the
scan keeps the finest.

``--band-files safe`` reads Sentinel-2 ``.SAFE`` products: the JP2 files in
``<name>.SAFE/GRANULE/<granule>/IMG_DATA/`` (L1C) or ``IMG_DATA/R10m|R20m|R60m/`` (L2A), one scene per
granule. ``--bands`` may use this project's names (B1..B12, B8A; the default is all 13, in
``--band-names s2`` order) or the product's zero-padded ones (B01..B12).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from engine.errors import UserError
from shards.chips import SENTINEL2_L1C
from shards.inputs import InputFile

log = logging.getLogger(__name__)

SAFE = "safe"
_FIELD = re.compile(r"\{(scene|band)\}|\*")


def check_band_options(opts) -> None:
    """Validate the --band-files flag family (called from ConvertOptions.validate)."""
    if opts.band_files != SAFE:
        fields = re.findall(r"\{(\w*)\}", opts.band_files)
        if sorted(fields) != ["band", "scene"]:
            raise UserError(
                f"--band-files '{opts.band_files}': the pattern needs one {{scene}} and one {{band}} "
                "field (and no others), e.g. '{scene}_{band}.TIF', or 'safe'"
            )
        if not opts.bands:
            raise UserError(
                "--band-files: list the bands to stack with --bands, in output order, e.g. --bands B4,B3,B2"
            )
    if opts.drop_bands:
        raise UserError("--drop-bands does not apply to --band-files; list the bands to stack with --bands")
    if opts.band_names is not None:
        raise UserError("--band-names does not apply to --band-files; the --bands tokens name the bands")
    if opts.bands and len(set(opts.bands)) != len(opts.bands):
        raise UserError(f"--bands {','.join(opts.bands)}: a band is listed twice")
    if opts.resolution is not None and not opts.resolution > 0:
        raise UserError(f"--resolution {opts.resolution}: must be > 0 (pixel size in CRS units, e.g. 10)")


def band_tokens(opts) -> list[str]:
    """The bands to stack, in output order (--bands; for SAFE products all 13 by default)."""
    if opts.bands:
        return list(opts.bands)
    return list(SENTINEL2_L1C)


def input_exts(opts) -> tuple[str, ...]:
    """--ext plus what the band pattern asks for (its extension; JP2 for SAFE products)."""
    if opts.band_files is None:
        return tuple(opts.exts)
    extra: str | None = "jp2"  # SAFE products
    if opts.band_files != SAFE:
        m = re.search(r"\.([A-Za-z0-9]+)$", opts.band_files)
        extra = m.group(1).lower() if m else None
    return tuple(opts.exts) + ((extra,) if extra and extra not in opts.exts else ())


def _safe_token(name: str) -> str:
    """Project band name -> the token in a SAFE file name: B1 -> B01, B8A -> B8A."""
    m = re.fullmatch(r"[Bb](\d)", name)
    return f"B0{m.group(1)}" if m else name.upper()


def compile_pattern(pattern: str, tokens: Sequence[str]) -> re.Pattern:
    """A --band-files pattern -> regex over relative paths with groups ``dir``, ``scene``, ``band``."""
    alt = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    parts, pos = [], 0
    for m in _FIELD.finditer(pattern):
        parts.append(re.escape(pattern[pos : m.start()]))
        parts.append({"{scene}": r"(?P<scene>[^/]+)", "{band}": f"(?P<band>{alt})"}.get(m.group(0), r"[^/]*"))
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile(r"(?P<dir>(?:.*/)?)" + "".join(parts))


def safe_pattern(tokens: Sequence[str]) -> re.Pattern:
    """IMG_DATA band files of a .SAFE product; the granule folder is the scene."""
    alt = "|".join(re.escape(_safe_token(t)) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(
        r"(?P<dir>)(?P<scene>(?:.*/)?[^/]+\.SAFE/GRANULE/[^/]+)/IMG_DATA/(?:R\d+m/)?"
        rf"[^/]*_(?P<band>{alt})(?:_\d+m)?\.jp2",
        re.IGNORECASE,
    )


def group_band_files(files: Sequence[InputFile], opts) -> tuple[list[InputFile], list[dict]]:
    """Listed files -> (scenes sorted by relative path, skipped entries for incomplete scenes).

    Each scene is an InputFile whose ``relpath`` is ``<folders>/<scene>`` and whose ``bands`` maps
    every --bands token to the files matching it (path, relpath), sorted by relative path."""
    tokens = band_tokens(opts)
    safe = opts.band_files == SAFE
    regex = safe_pattern(tokens) if safe else compile_pattern(opts.band_files, tokens)
    by_file_token = {_safe_token(t): t for t in tokens} if safe else {t: t for t in tokens}
    scenes: dict[str, dict[str, list[tuple[str, str]]]] = {}
    unmatched = []
    for f in files:
        m = regex.fullmatch(f.relpath)
        if m is None:
            unmatched.append(f.relpath)
            continue
        token = by_file_token[m.group("band").upper() if safe else m.group("band")]
        scenes.setdefault(m.group("dir") + m.group("scene"), {}).setdefault(token, []).append((f.path, f.relpath))
    if unmatched:
        log.info(
            "--band-files: %d listed file(s) match no band of --bands and are left out (e.g. '%s')",
            len(unmatched),
            unmatched[0],
        )
    if not scenes:
        what = "Sentinel-2 .SAFE IMG_DATA JP2 files" if safe else f"'{opts.band_files}' with bands {','.join(tokens)}"
        raise UserError(f"--band-files: no listed file matches {what}; check the pattern, --bands and --ext")
    out, skipped = [], []
    for rel in sorted(scenes):
        have = scenes[rel]
        missing = [t for t in tokens if t not in have]
        if missing:
            skipped.append(
                {
                    "source": rel,
                    "reason": f"scene lacks band(s) {','.join(missing)} "
                    f"(found {','.join(t for t in tokens if t in have)}); --bands asks for {','.join(tokens)}",
                }
            )
            continue
        bands = {t: sorted(have[t], key=lambda pr: pr[1]) for t in tokens}
        out.append(InputFile(path=bands[tokens[0]][0][0], relpath=rel, bands=bands))
    return out, skipped
