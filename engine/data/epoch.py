"""What the main process tells its persistent DataLoader workers at the start of each epoch.

Persistent workers receive the dataset once, when they start; later changes to the main process's
copy never reach them. Each epoch the loader therefore writes the epoch's settings into one small
int64 tensor in shared memory, *before* it asks the workers to restart their streams (torch sends
them a resume message through their queues, which orders the write before their read). The same
block carries the ``closing`` flag that lets a worker's SIGTERM handler tell the loader's own
shutdown (exit) from a scheduler's job-wide SIGTERM (ignore; see :mod:`engine.data.workers`).

Layout (``nw`` logical workers): ``[epoch, rotation, closing, resume_batches[nw], resume_raw[nw],
quota[nw]]``, quota -1 = unlimited.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_EPOCH, _ROTATION, _CLOSING, _HEAD = 0, 1, 2, 3


class _Slot:
    """One scalar of the block, read back as ``cast`` (int or bool)."""

    def __init__(self, index: int, cast: type):
        self.index, self.cast = index, cast

    def __get__(self, obj, owner=None):
        return self if obj is None else self.cast(obj.block[self.index])

    def __set__(self, obj, value) -> None:
        obj.block[self.index] = int(value)


class EpochControl:
    """Shared per-epoch settings for ``num_workers`` logical workers (see the module docstring)."""

    def __init__(self, num_workers: int = 1):
        self.num_workers = max(1, int(num_workers))
        self.block = torch.zeros(_HEAD + 3 * self.num_workers, dtype=torch.int64).share_memory_()
        self.quotas = None

    def _vec(self, k: int) -> torch.Tensor:
        start = _HEAD + k * self.num_workers
        return self.block[start : start + self.num_workers]

    epoch = _Slot(_EPOCH, int)
    rotation = _Slot(_ROTATION, int)
    closing = _Slot(_CLOSING, bool)

    @property
    def resume(self) -> list[tuple[int, int]]:
        """Per logical worker (batches, raw samples) already consumed this epoch."""
        return list(zip(self._vec(0).tolist(), self._vec(1).tolist()))

    @resume.setter
    def resume(self, value: Sequence[tuple[int, int]] | None) -> None:
        pairs = list(value) if value else [(0, 0)] * self.num_workers
        self._check(len(pairs))
        self._vec(0).copy_(torch.tensor([int(b) for b, _ in pairs], dtype=torch.int64))
        self._vec(1).copy_(torch.tensor([int(r) for _, r in pairs], dtype=torch.int64))

    @property
    def quotas(self) -> list[int | None] | None:
        """Per logical worker batch limit (None = until the data ends); None when no worker has one."""
        q = [None if v < 0 else int(v) for v in self._vec(2).tolist()]
        return None if all(v is None for v in q) else q

    @quotas.setter
    def quotas(self, value: Sequence[int | None] | None) -> None:
        q = list(value) if value is not None else [None] * self.num_workers
        self._check(len(q))
        self._vec(2).copy_(torch.tensor([-1 if v is None else int(v) for v in q], dtype=torch.int64))

    def _check(self, n: int) -> None:
        if n != self.num_workers:
            raise ValueError(f"{n} per-worker values for {self.num_workers} logical workers")
