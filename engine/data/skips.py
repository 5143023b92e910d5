"""Bad-data policy: log a corrupt sample or shard with its key, skip it, count it, abort past a rate.

A multi-day run must not die on one truncated tar or one bad chip, but it must not silently train
on a fraction of its data either. Every worker keeps a :class:`SkipCounter`; the loader sums the
workers' counters (they travel with each batch) and aborts with :class:`SkipRateExceeded` once
``skipped / (seen + skipped)`` exceeds ``--data.max_skip_rate`` after at least
``MIN_SAMPLES_FOR_ABORT`` samples (so one bad sample among the first ten does not end a run).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import UserError

# Below this many samples a rate is noise; one bad chip in the first batch must not abort a run.
MIN_SAMPLES_FOR_ABORT = 200
# Log every skip up to this many per worker, then every LOG_EVERY-th, so a rotten shard cannot flood logs.
LOG_FIRST = 20
LOG_EVERY = 100


class SkipRateExceeded(UserError):
    """Too much of the data is unreadable: fix or re-convert the shards (shards/verify.py finds them)."""


@dataclass
class SkipCounter:
    """Samples seen/skipped by one worker. ``skipped`` counts samples, including a bad shard's
    unread remainder when the manifest says how many it should hold."""

    seen: int = 0
    skipped: int = 0
    bad_shards: int = 0
    events: int = field(default=0, repr=False)
    pending: list = field(default_factory=list, repr=False)

    def ok(self, n: int = 1) -> None:
        self.seen += n

    def bad_sample(self, key: str, url: str, err: BaseException) -> None:
        self.skipped += 1
        self._log("skipping corrupt sample %r in %s: %s", key, url, err)

    def bad_shard(self, url: str, err: BaseException, lost: int) -> None:
        """A shard failed to open or broke off; ``lost`` samples of it were not read (>= 1)."""
        self.skipped += max(1, lost)
        self.bad_shards += 1
        self._log(
            "skipping the rest of shard %s (%d sample(s) lost): %s: %s", url, max(1, lost), err.__class__.__name__, err
        )

    def _log(self, fmt: str, *args) -> None:
        # Messages travel to the main process with the next batch (drain) and are logged there:
        # worker processes may have no logging configured (spawn start method).
        self.events += 1
        if self.events <= LOG_FIRST or self.events % LOG_EVERY == 0:
            msg = fmt % args
            self.pending.append(msg + (f" [skip event {self.events}]" if self.events > LOG_FIRST else ""))

    def drain(self) -> list[str]:
        out, self.pending = self.pending, []
        return out

    def as_tuple(self) -> tuple[int, int, int]:
        return self.seen, self.skipped, self.bad_shards


def skip_rate(seen: int, skipped: int) -> float:
    total = seen + skipped
    return skipped / total if total else 0.0


def check_skip_rate(seen: int, skipped: int, max_rate: float, where: str, last: str = "") -> None:
    """Raise SkipRateExceeded when the skip rate is above ``max_rate`` with enough samples to judge.

    Failures count towards the minimum too, so an all-corrupt resampled stream stops after
    MIN_SAMPLES_FOR_ABORT failures instead of spinning forever (even with max_rate = 1).
    """
    total = seen + skipped
    if total < MIN_SAMPLES_FOR_ABORT:
        return
    rate = skip_rate(seen, skipped)
    if rate > max_rate or seen == 0:
        raise SkipRateExceeded(
            f"--data.max_skip_rate: {where} skipped {skipped} of {total} samples ({rate:.1%} > "
            f"{max_rate:.1%}); the shards are damaged: run the shard verifier and re-convert the bad "
            "shards, or raise --data.max_skip_rate if losing them is acceptable" + (f" (last: {last})" if last else "")
        )
