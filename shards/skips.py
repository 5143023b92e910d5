"""skipped.jsonl (one ``{"source", "reason"}`` line per input the converter could not use) and the
terminal's summary of it: the reasons grouped, the biggest group first, one example each.

Reasons of the same kind differ in their numbers and the file they name ("band index 7 out of
range (image has 3 bands ...)"), so they are grouped with digits and the input's own path masked.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from engine.atomic import atomic_write_text
from shards.state import SKIPPED

SHOWN_KINDS = 5
_DIGITS = re.compile(r"\d+")


def write_skipped(out: Path, skipped: Sequence[dict]) -> None:
    atomic_write_text(Path(out) / SKIPPED, "".join(json.dumps(e, sort_keys=True) + "\n" for e in skipped))


def reason_kind(entry: dict) -> str:
    """The reason with the input's path and every number masked (the grouping key)."""
    reason = str(entry["reason"])
    src = str(entry["source"])
    for name in sorted({src, src.rsplit("/", 1)[-1]}, key=len, reverse=True):
        reason = reason.replace(name, "<input>")
    return _DIGITS.sub("#", reason)


def summary_lines(skipped: Sequence[dict], limit: int = SHOWN_KINDS) -> list[str]:
    """``["3 x <first reason> (e.g. 'a.tif')", ...]``, the most frequent kind first (ties: the kind
    seen first), at most ``limit`` kinds and then a line counting the rest."""
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for e in skipped:
        groups.setdefault(reason_kind(e), []).append(e)
    ranked = sorted(groups.values(), key=len, reverse=True)  # stable: ties keep first-seen order
    lines = [f"{len(g)} x {g[0]['reason']} (e.g. '{g[0]['source']}')" for g in ranked[:limit]]
    rest = ranked[limit:]
    if rest:
        lines.append(f"... and {sum(len(g) for g in rest)} more in {len(rest)} other kind(s) of reason")
    return lines
