"""Class name -> index (or multi-hot vector) for supervised fine-tuning and evaluation.

The converter stores each chip's class name in its json (``"label"``) and the sorted list of all
names in ``manifest["classes"]``; the index of a class is its position in that list. A run may give
its own list instead (``--data.classes``), e.g. to evaluate a subset with the training set's
indices. A sample whose label is missing or not in the list is a data error: the loader skips and
counts it like any corrupt sample (see :mod:`engine.data.skips`).

Multi-label archives (BigEarthNet: a CSV cell ``"Pastures;Sea and ocean"``) keep the cell string
in ``"label"`` and add ``"labels": [names]``; ``classes`` then lists the individual names and the
manifest has ``"multilabel": true``. :class:`MultiLabelIndex` turns a sample into a multi-hot
vector over ``classes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from engine.data.samples import CorruptSample
from engine.errors import UserError


class ClassIndex:
    """Maps a sample's metadata to its class index (int in [0, num_classes))."""

    def __init__(self, classes: Sequence[str]):
        names = [str(c) for c in classes]
        if not names:
            raise UserError("--data.classes: the class list is empty")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[0]
            raise UserError(f"--data.classes: class {dup!r} is listed twice")
        self.classes = names
        self._index = {n: i for i, n in enumerate(names)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_manifest(
        cls, manifest: Mapping | None, classes: Sequence[str] | None = None, source: str = "--data.shards"
    ) -> ClassIndex:
        """``classes`` if given, else ``manifest["classes"]``; UserError when neither exists."""
        if classes:
            return cls(classes)
        listed = (manifest or {}).get("classes")
        if not listed:
            raise UserError(
                f"{source}: the manifest lists no classes (an unlabelled archive?); convert "
                "with labels or give --data.classes"
            )
        return cls(listed)

    def index(self, name: str) -> int:
        return self._index[name]

    def __call__(self, meta: Mapping) -> int:
        """Class index of a sample's json metadata; CorruptSample if unlabelled or unknown."""
        label = meta.get("label")
        if label is None:
            raise CorruptSample("sample has no label")
        try:
            return self._index[str(label)]
        except KeyError:
            raise CorruptSample(f"label {label!r} is not one of the {len(self.classes)} classes") from None


# separates the class names of a multi-label "label" string; same as shards.inputs.LABEL_SEP (not
# imported: the converter must not import engine.data, which pulls in torch)
LABEL_SEP = ";"


class MultiLabelIndex(ClassIndex):
    """Maps a sample's metadata to a multi-hot vector: float32 (num_classes,), 1.0 at each of its
    classes. Same constructor and :meth:`from_manifest` as :class:`ClassIndex`."""

    def names(self, meta: Mapping) -> list[str]:
        """The sample's class names: ``meta["labels"]`` if present, else ``meta["label"]`` split on ';'."""
        listed = meta.get("labels")
        if listed is None:
            label = meta.get("label")
            listed = [] if label is None else str(label).split(LABEL_SEP)
        elif isinstance(listed, str):
            listed = listed.split(LABEL_SEP)
        return [n for n in (str(x).strip() for x in listed) if n]

    # One label index type for both kinds of data; callers branch on the loader's ``multilabel``.
    def __call__(self, meta: Mapping) -> np.ndarray:  # type: ignore[override]
        """Multi-hot float32 (C,); CorruptSample if the sample has no label or an unknown one."""
        names = self.names(meta)
        if not names:
            raise CorruptSample("sample has no label")
        hot = np.zeros(len(self.classes), dtype=np.float32)
        for n in names:
            i = self._index.get(n)
            if i is None:
                raise CorruptSample(f"label {n!r} is not one of the {len(self.classes)} classes")
            hot[i] = 1.0
        return hot
