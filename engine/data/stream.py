"""Sharded sample stream for multi-node training: rank/worker split, shuffling, resampling, batching
in workers, exact position tracking.

Inside each DataLoader worker (``ShardStream.__iter__``), for logical worker ``w`` of ``nw`` on
rank ``r`` of ``R``, epoch ``e``:

1. **Shards.** Exact mode: all shards, permuted by ``(seed, e)`` when ``shuffle_shards`` (the same
   permutation on every rank), then ``[r::R]`` for the rank and ``[w::nw]`` for the worker. With
   fewer shards than ranks (or a rank's shards fewer than its workers) that level splits *samples*
   instead (every ``R``-th / ``nw``-th sample of the shared shards): still disjoint and complete,
   at the cost of reading skipped bytes, and never an idle worker that hangs a collective.
   Resampled mode: an endless draw of shards with replacement (probability ∝ sample count) from
   a generator seeded by ``(seed, e, r, w)``; no split is needed and shard count never matters.
2. **Raw samples** are read sequentially from each shard (:mod:`engine.data.samples`); a shard
   that fails to open or breaks off is logged, counted and skipped (:mod:`engine.data.skips`).
3. **Shuffle buffer** of raw (undecoded) samples, capped at ``shuffle_buffer`` samples and
   ``shuffle_bytes`` bytes, seeded by ``(seed, e, r, w)``; it starts yielding after
   ``shuffle_initial`` samples (:mod:`engine.data.shuffle`).
4. **Decode + view**: zero-copy ``.npy`` decode, then the per-sample view (multi-crop, MAE crop or
   eval crop) with a generator seeded by ``(seed, e, r, w, batch index)``, which also draws the
   photometric parameters (:mod:`engine.data.photometric`); a sample that fails is logged, counted
   and skipped.
5. **Batching** in the worker (``view.collate``); each batch carries a small ``_position`` record
   (logical worker, batch index, raw samples consumed, skip counters) that the loader strips.

Resampled epochs have a fixed length: ``steps_per_epoch`` batches per rank, split over workers
as evenly as possible, so every rank yields the same number of batches and no rank waits at an
epoch end. See :mod:`engine.data.loader` for position/resume semantics.

A resampled worker whose every shard turned out to hold no sample (possible only when the manifest
gives no counts; listed empty shards are dropped up front by :mod:`engine.data.shardspec`) stops
with a UserError instead of re-reading them forever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from engine.data.epoch import EpochControl
from engine.data.samples import ShardOpener, decode_image, decode_meta, iter_shard
from engine.data.shardspec import known_sum
from engine.data.shuffle import shuffled
from engine.data.skips import SkipCounter, check_skip_rate
from engine.errors import UserError

log = logging.getLogger(__name__)

POSITION_KEY = "_position"
_SHARD_STREAM, _SHUFFLE_STREAM, _AUG_STREAM = 0, 1, 2


@dataclass
class StreamPlan:
    """Everything a worker needs to produce its share of an epoch (picklable, no tensors).

    shuffle_buffer: per-worker cap in samples (<= 1: no sample shuffling); shuffle_bytes: per-worker
    cap in payload bytes (0 = none); shuffle_initial: samples buffered before the first one leaves.
    The run's values come from DataConfig (:mod:`engine.data.builders`); the defaults here are the
    neutral ones (one process, no shard shuffling, no byte cap).
    """

    urls: list[str]
    counts: list[int | None]
    batch_size: int
    resampled: bool
    shuffle_buffer: int
    max_skip_rate: float
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    steps_per_epoch: int = 0
    shuffle_shards: bool = False
    shuffle_bytes: int = 0
    shuffle_initial: int = 1
    drop_last: bool = True
    num_bands: int | None = None


@dataclass
class Assignment:
    """A logical worker's share of an epoch: shard indices in read order, and the sample-level
    splits ``(offset, stride)`` applied (in order) to the raw samples of those shards."""

    shards: list[int]
    sample_splits: list[tuple[int, int]]


def merge_counts(totals: Sequence[int | None], k: int) -> tuple[list[int], int]:
    """Consume ``k`` batches from workers in DataLoader order (round-robin, exhausted workers drop
    out; ``None`` = endless). Returns (batches taken per worker, worker that supplies the next)."""
    nw = len(totals)
    taken = [0] * nw
    remaining = k
    j = 0
    while True:
        live = [w for w, t in enumerate(totals) if t is None or t > j]
        if not live:
            return taken, 0
        for w in live:
            if remaining == 0:
                return taken, w
            taken[w] += 1
            remaining -= 1
        j += 1


def seed_rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(e) for e in entropy])))


def _control_field(name: str) -> property:
    """A ShardStream attribute stored in its shared ``control`` block."""
    return property(
        lambda self: getattr(self.control, name),
        lambda self, v: setattr(self.control, name, v),
        doc=f"``control.{name}`` (see :class:`~engine.data.epoch.EpochControl`)",
    )


class ShardStream(IterableDataset):
    """Per-worker batch stream. ``view(arr, rng) -> item`` and ``view.collate(items, rng) -> dict``
    (see :mod:`engine.data.multicrop`); ``label_fn(meta) -> int`` (or a float32 (C,) multi-hot
    array) adds ``item["label"]``.

    Before each epoch the loader sets ``epoch``, ``resume`` (per logical worker ``(batches, raw)``
    already consumed), ``rotation`` (physical worker p plays logical worker (p + rotation) % nw) and
    ``quotas`` (per logical worker batch limit, None = until the data ends). They live in
    ``control`` (:class:`~engine.data.epoch.EpochControl`, shared memory), so persistent workers see
    each epoch's values; the loader gives it one slot per logical worker.
    """

    def __init__(
        self,
        plan: StreamPlan,
        view,
        label_fn: Callable[[dict], int] | None = None,
        opener: Callable | None = None,
        num_workers: int = 1,
    ):
        super().__init__()
        self.plan, self.view, self.label_fn = plan, view, label_fn
        self.opener = opener or ShardOpener()
        self.control = EpochControl(num_workers)

    epoch = _control_field("epoch")
    rotation = _control_field("rotation")
    resume = _control_field("resume")
    quotas = _control_field("quotas")

    # ----------------------------------------------------------------------------------- plan
    def _order(self, epoch: int) -> list[int]:
        n = len(self.plan.urls)
        if self.plan.shuffle_shards:
            return [int(i) for i in seed_rng(self.plan.seed, epoch, 7).permutation(n)]
        return list(range(n))

    def _split(self, order: list[int], rank: int, worker: int, num_workers: int) -> Assignment:
        world = self.plan.world_size
        splits: list[tuple[int, int]] = []
        if len(order) >= world:
            order = order[rank::world]
        elif world > 1:
            splits.append((rank, world))
        if len(order) >= num_workers:
            order = order[worker::num_workers]
        elif num_workers > 1:
            splits.append((worker, num_workers))
        return Assignment(order, splits)

    def assignment(self, epoch: int, worker: int, num_workers: int, rank: int | None = None) -> Assignment:
        """Exact-mode share of logical ``worker`` of ``rank`` (default: this rank); module docstring step 1."""
        return self._split(self._order(epoch), self.plan.rank if rank is None else rank, worker, num_workers)

    def _samples_of(self, a: Assignment) -> int | None:
        n = known_sum([self.plan.counts[i] for i in a.shards])
        if n is None:
            return None
        for offset, stride in a.sample_splits:
            n = len(range(offset, n, stride))
        return n

    def expected_samples(self, epoch: int, worker: int, num_workers: int, rank: int | None = None) -> int | None:
        """Samples logical ``worker`` yields in an exact epoch per the manifest (None if unknown)."""
        return self._samples_of(self.assignment(epoch, worker, num_workers, rank))

    def expected_batches(self, epoch: int, num_workers: int, rank: int | None = None) -> list[int | None]:
        """Per logical worker batch count of an epoch (resampled: its share of steps_per_epoch)."""
        p = self.plan
        if p.resampled:
            return [
                p.steps_per_epoch // num_workers + (w < p.steps_per_epoch % num_workers) for w in range(num_workers)
            ]
        order = self._order(epoch)
        rank = p.rank if rank is None else rank
        out: list[int | None] = []
        for w in range(num_workers):
            n = self._samples_of(self._split(order, rank, w, num_workers))
            out.append(None if n is None else (n // p.batch_size if p.drop_last else -(-n // p.batch_size)))
        return out

    def min_rank_batches(self, epoch: int, num_workers: int) -> int | None:
        """Fewest batches any rank yields in an exact epoch (None if counts are unknown)."""
        order = self._order(epoch)
        best: int | None = None
        for r in range(self.plan.world_size):
            b = 0
            for w in range(num_workers):
                n = self._samples_of(self._split(order, r, w, num_workers))
                if n is None:
                    return None
                b += n // self.plan.batch_size if self.plan.drop_last else -(-n // self.plan.batch_size)
            best = b if best is None else min(best, b)
        return best

    # ---------------------------------------------------------------------------- streaming
    def _shard_indices(self, epoch: int, worker: int, num_workers: int) -> tuple[Iterator[int], list[tuple[int, int]]]:
        p = self.plan
        if not p.resampled:
            a = self.assignment(epoch, worker, num_workers)
            return iter(a.shards), a.sample_splits
        rng = seed_rng(p.seed, epoch, p.rank, worker, _SHARD_STREAM)
        known = all(c is not None for c in p.counts)
        weights = np.asarray(p.counts, dtype=np.float64) if known else np.ones(len(p.urls))
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(p.urls), 1.0 / len(p.urls))

        def endless() -> Iterator[int]:
            while True:
                yield int(rng.choice(len(p.urls), p=weights))

        return endless(), []

    def _raw_samples(self, worker: int, num_workers: int, counter: SkipCounter, epoch: int) -> Iterator[dict]:
        """Raw samples of this worker's shards in ``epoch`` after the sample-level splits."""
        p = self.plan
        shard_iter, splits = self._shard_indices(epoch, worker, num_workers)
        share = 1
        for _, stride in splits:
            share *= stride
        index = 0
        empty: set[int] = set()  # shards read whole without a sample since the last sample
        for si in shard_iter:
            url, expected = p.urls[si], p.counts[si]
            read = 0
            try:
                for sample in iter_shard(url, self.opener):
                    read += 1
                    keep = True
                    rel = index
                    for offset, stride in splits:
                        if rel % stride != offset:
                            keep = False
                            break
                        rel //= stride
                    index += 1
                    if keep:
                        yield sample
            except Exception as e:  # noqa: BLE001 - any read failure of a shard is a bad shard
                lost = (expected - read) if expected is not None and expected > read else 1
                counter.bad_shard(url, e, -(-lost // share))
                check_skip_rate(
                    counter.seen, counter.skipped, p.max_skip_rate, f"worker {worker}", (counter.pending or [""])[-1]
                )
                continue
            if expected is not None and read < expected:
                counter.bad_shard(
                    url, EOFError(f"shard ended after {read} of {expected} samples"), -(-(expected - read) // share)
                )
                check_skip_rate(
                    counter.seen, counter.skipped, p.max_skip_rate, f"worker {worker}", (counter.pending or [""])[-1]
                )
            if read:
                empty.clear()
            elif p.resampled:
                empty.add(si)
                if len(empty) == len(p.urls):
                    raise UserError(
                        f"--data.shards: none of the {len(p.urls)} shard(s) holds a sample "
                        f"(e.g. '{url}' is an empty tar); re-run the converter or point at other shards"
                    )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        phys, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (phys + self.rotation) % nw
        yield from self.worker_batches(worker, nw)

    def worker_batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Batches of logical ``worker``, starting after its ``resume`` position."""
        p = self.plan
        counter = SkipCounter()
        epoch = self.epoch  # read the shared control block once: the stream's epoch never changes
        batches_done, raw_done = self.resume[worker]
        quotas = self.quotas
        quota = quotas[worker] if quotas else None
        if quota is not None and batches_done >= quota:
            return
        raw = shuffled(
            self._raw_samples(worker, num_workers, counter, epoch),
            seed_rng(p.seed, epoch, p.rank, worker, _SHUFFLE_STREAM),
            p.shuffle_buffer,
            p.shuffle_bytes,
            p.shuffle_initial,
        )
        for _ in range(raw_done):  # replay without decoding: reads bytes, skips all transforms
            if next(raw, None) is None:
                return
        counter.drain()  # the replayed part's messages were logged by the original run
        base = counter.as_tuple()
        self._reported = base
        index, raw_pos = batches_done, raw_done
        items: list[dict] = []
        rng = seed_rng(p.seed, epoch, p.rank, worker, _AUG_STREAM, index)
        for sample in raw:
            raw_pos += 1
            try:
                arr = decode_image(sample, p.num_bands)
                item = self.view(arr, rng)
                if self.label_fn is not None:
                    item["label"] = self.label_fn(decode_meta(sample))
            except UserError:
                raise  # a configuration problem (e.g. photometric statistics missing), not bad data
            except Exception as e:  # noqa: BLE001 - the handler policy: log, count, skip, bounded rate
                counter.bad_sample(sample.get("__key__", "?"), sample.get("__url__", "?"), e)
                check_skip_rate(
                    counter.seen, counter.skipped, p.max_skip_rate, f"worker {worker}", (counter.pending or [""])[-1]
                )
                continue
            counter.ok()
            items.append(item)
            if len(items) == p.batch_size:
                yield self._emit(items, rng, worker, index, raw_pos, counter, base)
                items = []
                index += 1
                if quota is not None and index >= quota:
                    return
                rng = seed_rng(p.seed, epoch, p.rank, worker, _AUG_STREAM, index)
        if items and not p.drop_last:
            yield self._emit(items, rng, worker, index, raw_pos, counter, base)
        elif counter.as_tuple() != self._reported:
            # Skips after the last batch (e.g. a shard that broke off at the end) would otherwise
            # never reach the loader's counters: send them in a data-less trailer it swallows.
            yield {POSITION_KEY: self._position(worker, index - 1, raw_pos, 0, counter, base, trailer=True)}

    def _position(self, worker, index, raw_pos, size, counter, base, trailer=False) -> dict:
        self._reported = counter.as_tuple()
        seen, skipped, bad = self._reported
        return {
            "worker": worker,
            "index": index,
            "raw": raw_pos,
            "size": size,
            "trailer": trailer,
            "events": counter.drain(),
            "seen": seen - base[0],
            "skipped": skipped - base[1],
            "bad_shards": bad - base[2],
        }

    def _emit(self, items, rng, worker, index, raw_pos, counter, base) -> dict:
        batch = self.view.collate(items, rng)
        batch[POSITION_KEY] = self._position(worker, index, raw_pos, len(items), counter, base)
        return batch
