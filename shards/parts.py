"""``--part K/N``: one node's share of a conversion, and the records ``merge`` joins.

Every part lists and scans all inputs (headers only) and makes the same plan as a single run, then
builds only its planned shards: the K-th of N contiguous ranges (``plan.part_range``), keeping
their global numbers (part 2 of 3 of a 9-shard plan writes ``shard-000003.tar`` .. ``-000005``).
That is what makes a merge identical to a single run: the same shards, named the same, with the
same bytes. A part's ``--out`` is an archive of its own (manifest.json with a ``"part"`` entry,
verifiable) plus two records for the merge, written before its manifest:

- ``part.json``: the part's index, the settings, the plan digest, the done record of each of its
  planned shards (count, bytes, sha256, sample offsets, labels, read failures, ...) and the scan's
  skipped inputs;
- ``part-stats.npz``: its statistics, one folded state for 8/16-bit data (exact histograms add up
  in any order), else one state per planned shard (float moments are merged in plan order).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.atomic import atomic_write, atomic_write_text
from engine.errors import UserError
from shards.plan import part_range
from shards.state import PART_FILES
from shards.stats import BandStats

FORMAT = "geoexplora-part/1"
RECORD, STATS = PART_FILES


def write_part(
    out: Path,
    part: tuple[int, int],
    args: dict,
    plan: str,
    num_tasks: int,
    records: list[dict],
    load_stats,
    stats: BandStats,
    scan_skipped: list[dict],
    fallback: dict,
) -> None:
    """Write part-stats.npz, then part.json (the part's records for ``merge``). ``stats``: the
    records' statistics folded; ``load_stats(i)``: record i's own (kept per record for floats)."""
    if stats.exact:
        arrays = {f"all/{k}": v for k, v in stats.to_arrays().items()}
    else:
        arrays = {f"{i}/{k}": v for i in range(len(records)) for k, v in load_stats(i).items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub checks **arrays against allow_pickle
    with atomic_write(Path(out) / STATS) as f:
        f.write(buf.getvalue())
    span = part_range(num_tasks, part)
    atomic_write_text(
        Path(out) / RECORD,
        json.dumps(
            {
                "format": FORMAT,
                "part": list(part),
                "args": args,
                "plan": plan,
                "tasks": num_tasks,
                "range": [span.start, span.stop],
                "records": records,
                "skipped": scan_skipped,
                "fallback": fallback,
                "num_bands": stats.num_bands,
            }
        )
        + "\n",
    )  # args keep their order: the manifest's


def part_manifest_entry(part: tuple[int, int], num_tasks: int) -> dict:
    span = part_range(num_tasks, part)
    return {"part": {"index": part[0], "of": part[1], "shards": [span.start, span.stop], "planned": num_tasks}}


def _load(d: Path) -> dict:
    try:
        rec = json.loads((d / RECORD).read_text())
    except FileNotFoundError:
        raise UserError(
            f"merge: '{d}' holds no {RECORD}; it is not a finished --part run (rerun that part with --resume)"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"merge: '{d / RECORD}' is unreadable ({e.__class__.__name__}); rerun that part") from None
    if rec.get("format") != FORMAT:
        raise UserError(f"merge: '{d / RECORD}' is not a {FORMAT} record")
    return rec


def _settings(args: dict) -> dict:
    return {k: v for k, v in args.items() if k not in ("part", "workers")}


class Parts:
    """The finished parts of one conversion, checked to fit together (``read_parts``)."""

    def __init__(self, dirs: list[Path], recs: list[dict]):
        self.dirs, self.recs = dirs, recs
        first = recs[0]
        self.args = dict(first["args"], part=None)
        self.fallback, self.num_bands = first["fallback"], int(first["num_bands"])
        self.records = [r for rec in recs for r in rec["records"]]
        self.record_dirs = [d for d, rec in zip(dirs, recs) for _ in rec["records"]]
        self.scan_skipped = first["skipped"]

    def stats(self) -> BandStats:
        """All parts' statistics folded as a single run folds them."""
        stats = BandStats(self.num_bands, self.fallback["dtype"])
        for d in self.dirs:
            with np.load(d / STATS) as z:
                groups: dict[str, dict] = {}
                for name in z.files:
                    group, _, key = name.partition("/")
                    groups.setdefault(group, {})[key] = z[name]
            order = ["all"] if "all" in groups else sorted(groups, key=int)
            for g in order:
                stats.merge_arrays(groups[g])
        return stats


def read_parts(part_dirs: Sequence[str | os.PathLike]) -> Parts:
    """Load and cross-check the parts: one conversion (same settings and plan), every K of 1..N once,
    each with the planned shards of its range. Raises UserError naming what does not fit."""
    loaded = sorted(((Path(d), _load(Path(d))) for d in part_dirs), key=lambda p: p[1]["part"][0])
    n = loaded[0][1]["part"][1]
    ks = [rec["part"][0] for _, rec in loaded]
    if any(rec["part"][1] != n for _, rec in loaded) or ks != list(range(1, n + 1)):
        have = ", ".join(f"{rec['part'][0]}/{rec['part'][1]}" for _, rec in loaded)
        missing = sorted(set(range(1, n + 1)) - set(ks))
        raise UserError(
            f"merge: the parts given are {have}; a merge needs each of 1/{n} .. {n}/{n} exactly once"
            + (f" (missing {', '.join(f'{k}/{n}' for k in missing)})" if missing else "")
        )
    d0, r0 = loaded[0]
    for d, rec in loaded[1:]:
        if _settings(rec["args"]) != _settings(r0["args"]) or rec["plan"] != r0["plan"]:
            diff = sorted(
                k
                for k in set(rec["args"]) | set(r0["args"])
                if k not in ("part", "workers") and rec["args"].get(k) != r0["args"].get(k)
            )
            what = f"settings differ: {', '.join(diff)}" if diff else "the inputs changed between the parts' scans"
            raise UserError(
                f"merge: '{d}' and '{d0}' are not parts of one conversion ({what}); "
                "rerun the parts with the same command and inputs"
            )
    for d, rec in loaded:
        span = part_range(rec["tasks"], tuple(rec["part"]))
        if rec["range"] != [span.start, span.stop] or len(rec["records"]) != len(span):
            raise UserError(f"merge: '{d / RECORD}' does not list the shards of part {rec['part'][0]}/{n}; rerun it")
    return Parts([d for d, _ in loaded], [rec for _, rec in loaded])
