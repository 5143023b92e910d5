"""The per-rank loader: persistent DataLoader workers over a :class:`ShardStream`, pinned memory,
skip-rate accounting, and a restorable position.

Iteration: ``for batch in loader`` yields the rest of the current epoch (``len(loader)``
batches per epoch in resampled mode, identical on every rank), then advances ``loader.epoch``.
Breaking out early keeps the position, so iterating again continues the same epoch.
:meth:`ShardLoader.infinite` chains epochs for a step-based trainer.

Workers. Training loaders keep their worker processes for the whole run (``persistent=True``):
each epoch the loader writes the epoch's settings into the stream's shared
:class:`~engine.data.epoch.EpochControl` and the workers restart their streams in place, so an
epoch boundary costs a shuffle-buffer warm-up, not process start-up. :meth:`ShardLoader.close`
(also ``with loader:``, garbage collection, and an exit hook) stops them with bounded waits and a
kill fallback (:mod:`engine.data.workers`). Non-persistent loaders (evaluation, iterated once)
stop their workers at the end of every pass.

Position / resume semantics (``state_dict()`` / ``load_state_dict()``):

- The state records the epoch, the batches this rank has *delivered* in it (prefetched batches
  do not count), and per logical worker the batches and raw samples it supplied; plus cumulative
  skip counters. Take it after the step that consumed the last batch you want counted.
- Restoring it on the same rank, with the same world size, num_workers, batch size, seed,
  resampling mode, shuffle buffer and shard list, continues *exactly*: the next batch is the one
  the uninterrupted run would have delivered next, with the same augmentations and masks (also
  when photometric augmentation moved between the workers and the device: its random parameters
  are drawn in the workers either way). Each worker replays its part of the epoch up to that point
  by reading (not decoding) the raw samples it consumed, so the cost is reading at most one epoch's
  share of bytes per worker; in resampled mode ``--data.steps_per_epoch`` bounds it.
- A state saved by another rank (e.g. only rank 0's state was checkpointed) restores the same
  epoch and batch count, assuming no samples were skipped before the checkpoint; exact when none
  were.
- If the topology or data changed (different world size, workers, batch size, seed, mode or
  shards), the position cannot be mapped: the loader logs a warning and starts the *next* epoch
  (a resampled epoch draws fresh shards, so nothing restarts from the beginning).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from engine.data import workers
from engine.data.epoch import EpochControl
from engine.data.shardspec import known_sum
from engine.data.skips import check_skip_rate, skip_rate
from engine.data.stream import POSITION_KEY, ShardStream, merge_counts
from engine.errors import UserError

if TYPE_CHECKING:
    from engine.data.labels import ClassIndex
    from engine.data.normalize import Normalizer
    from engine.data.photometric import Photometric
    from engine.data.shardspec import ShardSet

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _one_line(e: UserError) -> UserError:
    """A worker's UserError re-raised by torch carries the worker traceback; keep its message only."""
    msg, marker = str(e), f"{type(e).__name__}: "
    return type(e)(msg.rsplit(marker, 1)[-1].strip() if marker in msg else msg)


class ShardLoader:
    """Iterable of dict batches for one rank; see the module docstring for epochs, workers and resume.

    dataset: the stream; num_workers: DataLoader workers (0 = in-process); pin_memory: None =
    when CUDA is available; prefetch_factor: batches buffered per worker; equalize: in exact
    mode, cut every rank's epoch to the fewest batches any rank has (per the manifest's counts), so
    data-parallel training never waits on a rank that ran out; persistent: keep the worker
    processes across epochs (until :meth:`close`).

    What the builders (:mod:`engine.data.builders`) attach: ``manifest`` (dict), ``shards``
    (:class:`~engine.data.shardspec.ShardSet`), ``normalizer`` and ``photometric`` (the device-side
    steps for :func:`~engine.data.normalize.to_device`; ``photometric`` is None when augmentation
    runs in the workers), ``classes`` (labelled loaders), ``num_samples`` (samples per rank of
    exact loaders).
    """

    def __init__(
        self,
        dataset: ShardStream,
        num_workers: int,
        pin_memory: bool | None,
        prefetch_factor: int,
        equalize: bool = False,
        persistent: bool = True,
        *,
        manifest: dict | None = None,
        shards: ShardSet | None = None,
        normalizer: Normalizer | None = None,
        photometric: Photometric | None = None,
        classes: ClassIndex | None = None,
        num_samples: int | None = None,
    ):
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = int(prefetch_factor)
        self.equalize = bool(equalize)
        self.persistent = bool(persistent)
        self.manifest, self.shards, self.num_samples = manifest, shards, num_samples
        self.normalizer, self.photometric, self.classes = normalizer, photometric, classes
        if dataset.control.num_workers != self.logical_workers:
            dataset.control = EpochControl(self.logical_workers)
        self.epoch = 0
        self._reset_position()
        self.totals = {"seen": 0, "skipped": 0, "bad_shards": 0}
        self._dl: DataLoader | None = None  # the persistent DataLoader, once its workers started

    @property
    def multilabel(self) -> bool:
        """Labels are (B, C) float32 multi-hot (a MultiLabelIndex) rather than (B,) long."""
        from engine.data.labels import MultiLabelIndex

        return isinstance(self.classes, MultiLabelIndex)

    @property
    def class_names(self) -> list[str]:
        """Class names in index order (labelled loaders)."""
        if self.classes is None:
            raise ValueError("this loader reads no labels, so it has no classes")
        return self.classes.classes

    # -------------------------------------------------------------------------------- sizing
    @property
    def logical_workers(self) -> int:
        return max(1, self.num_workers)

    def _worker_totals(self, epoch: int) -> list[int | None]:
        totals = self.dataset.expected_batches(epoch, self.logical_workers)
        total = known_sum(totals)
        if self.equalize and not self.dataset.plan.resampled and total is not None:
            cut = self.dataset.min_rank_batches(epoch, self.logical_workers)
            if cut is not None:
                return list(merge_counts(totals, min(cut, total))[0])
        return totals

    def __len__(self) -> int:
        """Batches this rank yields per epoch (exact mode: from the manifest's counts)."""
        total = known_sum(self._worker_totals(self.epoch))
        if total is None:
            raise TypeError("epoch length unknown: the shards have no manifest with per-shard counts")
        return total

    @property
    def skip_rate(self) -> float:
        return skip_rate(self.totals["seen"], self.totals["skipped"])

    # ----------------------------------------------------------------------------- iteration
    def _reset_position(self) -> None:
        self.batches = 0
        self.samples = 0
        self.worker_pos = [(0, 0)] * self.logical_workers
        self.next_worker = 0

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        ds.epoch = self.epoch
        ds.resume = list(self.worker_pos)
        ds.rotation = self.next_worker if self.num_workers > 0 else 0
        ds.quotas = None
        if ds.plan.resampled or self.equalize:
            # Fixed-length epochs: each logical worker stops at its share, so ranks stay in step.
            ds.quotas = self._worker_totals(self.epoch)
            if sum(q or 0 for q in ds.quotas) <= self.batches:
                self._finish_epoch()
                return
        last_seen = [(0, 0, 0)] * self.logical_workers
        max_rate = ds.plan.max_skip_rate
        for batch in self._batches():
            pos = batch.pop(POSITION_KEY)
            w = pos["worker"]
            for msg in pos["events"]:
                log.warning("rank %d worker %d: %s", ds.plan.rank, w, msg)
            seen, skipped, bad = pos["seen"], pos["skipped"], pos["bad_shards"]
            ls, lk, lb = last_seen[w]
            self.totals["seen"] += seen - ls
            self.totals["skipped"] += skipped - lk
            self.totals["bad_shards"] += bad - lb
            last_seen[w] = (seen, skipped, bad)
            check_skip_rate(self.totals["seen"], self.totals["skipped"], max_rate, f"rank {ds.plan.rank}")
            if pos["trailer"]:
                continue  # counters only: the worker's stream ended after its last batch
            self.worker_pos[w] = (pos["index"] + 1, pos["raw"])
            self.next_worker = (w + 1) % self.logical_workers
            self.batches += 1
            self.samples += pos["size"]
            yield batch
        self._finish_epoch()

    def _dataloader(self, persistent: bool) -> DataLoader:
        self.dataset.control.closing = False
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=persistent,
            worker_init_fn=workers.init_worker,
        )

    def _batches(self) -> Iterator[dict]:
        """This epoch's raw batches (the control block is already written): in-process, from the
        persistent workers (started on first use), or from workers started for this pass only."""
        stop: Callable[[], None] | None = None
        if self.num_workers == 0:
            it: Iterator[dict] = iter(self.dataset)
        elif self.persistent:
            first = self._dl is None
            dl = self._dl if self._dl is not None else self._dataloader(persistent=True)
            self._dl = dl
            it = iter(dl)  # first call starts the workers; later ones restart their streams
            if first:
                workers.track(self)
        else:
            it = iter(self._dataloader(persistent=False))
            stop = functools.partial(workers.stop_workers, it, self.dataset.control)
        try:
            yield from it
        except UserError as e:
            self.close()
            raise _one_line(e) from None
        except Exception:
            self.close()  # the run is ending: do not leave workers behind for the exit hook
            raise
        finally:
            if stop is not None:
                stop()

    def close(self) -> None:
        """Stop the persistent workers (bounded; see :mod:`engine.data.workers`). Iterating again
        starts new ones. Called at exit for every loader still open."""
        dl, self._dl = self._dl, None
        workers.untrack(self)
        it = getattr(dl, "_iterator", None)
        if it is not None:
            workers.stop_workers(it, self.dataset.control)

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing to report to at garbage collection
            pass

    def _finish_epoch(self) -> None:
        if self.totals["skipped"]:
            log.warning(
                "epoch %d: skipped %d corrupt sample(s) (%d bad shard(s)) so far, %.3f%% of %d read",
                self.epoch,
                self.totals["skipped"],
                self.totals["bad_shards"],
                100 * self.skip_rate,
                self.totals["seen"] + self.totals["skipped"],
            )
        self.epoch += 1
        self._reset_position()

    def infinite(self) -> Iterator[dict]:
        """Endless batches across epochs (a step-based trainer stops when it has enough)."""
        while True:
            n = 0
            for batch in self:
                n += 1
                yield batch
            if n == 0 and self.batches == 0:
                raise UserError(
                    "--data.shards: the data stream produced no batches in a whole epoch; "
                    "check the shards and --data.batch_size"
                )

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next iteration."""
        self.epoch = int(epoch)
        self._reset_position()

    # ---------------------------------------------------------------------------- position
    def _topology(self) -> dict:
        p = self.dataset.plan
        return {
            "world_size": p.world_size,
            "num_workers": self.logical_workers,
            "batch_size": p.batch_size,
            "seed": p.seed,
            "resampled": p.resampled,
            "shuffle_buffer": p.shuffle_buffer,
            "shuffle_bytes": p.shuffle_bytes,
            "shuffle_initial": p.shuffle_initial,
            "shuffle_shards": p.shuffle_shards,
            "steps_per_epoch": p.steps_per_epoch,
            "shards": [u.rsplit("/", 1)[-1] for u in p.urls],
        }

    def state_dict(self) -> dict:
        """This rank's position (plain ints/lists/strings: JSON- and torch.save-safe)."""
        return {
            "version": STATE_VERSION,
            "rank": self.dataset.plan.rank,
            "epoch": self.epoch,
            "batches": self.batches,
            "samples": self.samples,
            "workers": [list(p) for p in self.worker_pos],
            "next_worker": self.next_worker,
            "totals": dict(self.totals),
            "topology": self._topology(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position from :meth:`state_dict` (semantics in the module docstring)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else repr(state)
            raise UserError(
                f"--train.resume: data-loader state version {got} is not {STATE_VERSION}; this "
                "checkpoint was written by another version"
            )
        self.totals = {k: int(state.get("totals", {}).get(k, 0)) for k in ("seen", "skipped", "bad_shards")}
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if state.get("topology") != self._topology():
            changed = sorted(k for k, v in self._topology().items() if state.get("topology", {}).get(k) != v)
            log.warning(
                "data position of epoch %d cannot be restored (changed: %s); starting epoch %d",
                epoch,
                ", ".join(changed),
                epoch + (1 if batches else 0),
            )
            self.set_epoch(epoch + (1 if batches else 0))
            return
        self.epoch = epoch
        self.batches, self.samples = batches, int(state.get("samples", 0))
        if state.get("rank") == self.dataset.plan.rank:
            self.worker_pos = [(int(index), int(raw)) for index, raw in state["workers"]]
            self.next_worker = int(state["next_worker"])
            return
        taken, nxt = merge_counts(self._worker_totals(epoch), batches)
        b = self.dataset.plan.batch_size
        self.worker_pos = [(t, t * b) for t in taken]
        self.next_worker = nxt
        self.samples = batches * b
        log.info(
            "restored the data position from rank %s's state: epoch %d, %d batches in (exact unless "
            "samples were skipped before the checkpoint)",
            state.get("rank"),
            epoch,
            batches,
        )
