"""The converter's settings, parsed once at the CLI boundary and trusted everywhere after.

``fingerprint()`` is the subset that decides what ends up in the shards; ``--resume`` refuses to
continue a run whose fingerprint differs (worker count, --strict and the like may change).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass

from engine.errors import UserError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose complaints are one ``error: ...`` line (a UserError, exit 2 via cli_entry)
    instead of the usage block followed by the message; ``--help`` still prints the usage."""

    def error(self, message: str):
        msg = message[len("argument ") :] if message.startswith("argument ") else message
        raise UserError(f"{msg}; see '{self.prog} --help'")


def parse_size(text: str, flag: str) -> int:
    """'256MB' -> 256e6, '1GiB' -> 2**30, '5000000' -> 5e6 (bytes)."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else ""
    if not m or unit not in _UNITS:
        raise UserError(f"{flag} '{text}': expected a size like 256MB, 1GiB or a byte count")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise UserError(f"{flag} '{text}': must be > 0")
    return n


@dataclass
class ConvertOptions:
    """Everything one conversion needs. Sizes are (height, width) in pixels."""

    inputs: list[str]
    out: str
    prefix: str = "shard"
    root: str | None = None
    exts: tuple[str, ...] = ("tif", "tiff", "png", "jpg", "jpeg")
    labels: str | None = None
    sidecars: bool = True
    chip: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    edge: str = "drop"
    max_nodata: float = 1.0
    bands: list[str] | None = None
    drop_bands: list[str] | None = None
    band_names: list[str] | None = None
    nodata: float | None = None
    resize: tuple[int, int] | None = None
    resampling: str = "bilinear"
    max_samples: int = 10000
    max_bytes: int = 1 << 30
    workers: int = 1
    stall_timeout: float = 600.0  # seconds a busy worker may send nothing before it is killed; 0: never
    resume: bool = False
    overwrite: bool = False
    strict: bool = False
    fsync: bool = False
    band_files: str | None = None
    resolution: float | None = None
    crop_boxes: bool = False
    box_context: float | None = None
    part: tuple[int, int] | None = None

    def validate(self) -> ConvertOptions:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", self.prefix):
            raise UserError(f"--prefix '{self.prefix}': use letters, digits, '_' or '-' only")
        if self.edge not in ("drop", "pad"):
            raise UserError(f"--edge '{self.edge}': choose drop or pad")
        if not 0.0 <= self.max_nodata <= 1.0:
            raise UserError(f"--max-nodata {self.max_nodata}: must be a fraction in [0, 1]")
        if self.stride is not None and self.chip is None:
            raise UserError("--stride needs --chip-size (without it each image is one sample)")
        if self.max_samples < 1:
            raise UserError(f"--max-samples-per-shard {self.max_samples}: must be >= 1")
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: must be >= 1")
        if not self.stall_timeout >= 0:  # NaN too
            raise UserError(f"--stall-timeout {self.stall_timeout:g}: use seconds >= 0 (0 waits without a bound)")
        if self.bands and self.drop_bands:
            # --bands lists every band kept, in order; a drop list beside it is redundant at best and
            # contradicts it at worst (--bands 1,2 --drop-bands 2), so the two never combine
            raise UserError(
                "--bands and --drop-bands: give one of them (--bands already lists every band to keep, in order)"
            )
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        self._validate_sources()
        from shards.raster import resampling_method

        try:
            resampling_method(self.resampling)
        except ValueError:
            raise UserError(
                f"--resampling '{self.resampling}': use nearest, bilinear, cubic, average, mode, ..."
            ) from None
        return self

    def _validate_sources(self) -> None:
        """Per-band files (--band-files, --resolution), fMoW boxes (--crop-boxes) and --part."""
        if self.band_files is not None:
            from shards.band_files import check_band_options

            check_band_options(self)
        elif self.resolution is not None:
            raise UserError(
                "--resolution resamples per-band files; it needs --band-files (use --resize to resample whole images)"
            )
        if self.crop_boxes:
            if self.chip is not None:
                raise UserError("--crop-boxes and --chip-size both choose the windows; pick one")
            if not self.sidecars:
                raise UserError("--crop-boxes reads the boxes from the JSON sidecars; drop --no-sidecars")
            if self.band_files is not None:
                raise UserError("--crop-boxes works on single images with sidecars, not on --band-files scenes")
        elif self.box_context is not None:
            raise UserError("--box-context sets the margin of --crop-boxes; add --crop-boxes")
        if self.box_context is not None and not 0.0 <= self.box_context <= 10.0:
            raise UserError(f"--box-context {self.box_context}: use a fraction of the box size in [0, 10], or fmow")
        if self.part is not None:
            k, n = self.part
            if not 1 <= k <= n:
                raise UserError(f"--part {k}/{n}: K must be between 1 and N")

    def fingerprint(self) -> dict:
        """The settings that determine the output (a resumed run must match them exactly)."""
        d = asdict(self)
        for k in ("workers", "stall_timeout", "resume", "overwrite", "strict", "fsync", "out"):
            d.pop(k)
        d["inputs"] = list(self.inputs)
        if self.part is not None:
            d["part"] = f"{self.part[0]}/{self.part[1]}"
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def parse_part(text: str | None) -> tuple[int, int] | None:
    """--part 'K/N' -> (K, N), 1-based."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or int(m.group(2)) < 1:
        raise UserError(f"--part '{text}': expected K/N with 1 <= K <= N, e.g. 3/8")
    return int(m.group(1)), int(m.group(2))


def parse_box_context(text: str | None) -> float | None:
    """--box-context 'fmow' (the fMoW baseline's size-dependent margin) -> None, else a float."""
    if text is None or str(text).strip().lower() == "fmow":
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--box-context '{text}': expected fmow or a fraction of the box size, e.g. 0.15") from None
