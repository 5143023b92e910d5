"""The converter's settings, parsed once at the CLI boundary and trusted everywhere after.

``fingerprint()`` is the subset that decides what ends up in the shards; ``--resume`` refuses to
continue a run whose fingerprint differs (worker count, --strict and the like may change).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass
from typing import Optional

from engine.errors import UserError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose complaints are one ``error: ...`` line (a UserError, exit 2 via cli_entry)
    instead of the usage block followed by the message; ``--help`` still prints the usage."""

    def error(self, message: str):
        msg = message[len("argument "):] if message.startswith("argument ") else message
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
    root: Optional[str] = None
    exts: tuple[str, ...] = ("tif", "tiff", "png", "jpg", "jpeg")
    labels: Optional[str] = None
    sidecars: bool = True
    chip: Optional[tuple[int, int]] = None
    stride: Optional[tuple[int, int]] = None
    edge: str = "drop"
    max_nodata: float = 1.0
    bands: Optional[list[str]] = None
    drop_bands: Optional[list[str]] = None
    band_names: Optional[list[str]] = None
    nodata: Optional[float] = None
    resize: Optional[tuple[int, int]] = None
    resampling: str = "bilinear"
    max_samples: int = 10000
    max_bytes: int = 1 << 30
    workers: int = 1
    resume: bool = False
    overwrite: bool = False
    strict: bool = False
    fsync: bool = False

    def validate(self) -> "ConvertOptions":
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
        if self.bands and self.drop_bands:
            # --bands lists every band kept, in order; a drop list beside it is redundant at best and
            # contradicts it at worst (--bands 1,2 --drop-bands 2), so the two never combine
            raise UserError("--bands and --drop-bands: give one of them (--bands already lists every "
                            "band to keep, in order)")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        from shards.raster import resampling_method

        try:
            resampling_method(self.resampling)
        except ValueError:
            raise UserError(f"--resampling '{self.resampling}': use nearest, bilinear, cubic, average, mode, ...") from None
        return self

    def fingerprint(self) -> dict:
        """The settings that determine the output (a resumed run must match them exactly)."""
        d = asdict(self)
        for k in ("workers", "resume", "overwrite", "strict", "fsync", "out"):
            d.pop(k)
        d["inputs"] = list(self.inputs)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
