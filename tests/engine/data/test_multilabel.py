"""Multi-label archives (BigEarthNet-style CSV cells "a;b") from the converter through the loaders:
MultiLabelIndex, (B, C) float32 multi-hot batches, skip accounting for unknown labels."""

import csv
import json

import numpy as np
import pytest
import torch

from engine.config import CropConfig, DataConfig
from engine.data import ClassIndex, MultiLabelIndex, build_eval_loader, build_finetune_loader
from engine.data.samples import CorruptSample
from engine.errors import UserError
from shards.convert import convert_parser, options_from_args
from shards.pipeline import convert
from shards.synthetic import generate_archive

CLASSES = ["Forest", "Pastures", "Sea and ocean", "Urban"]
# file i -> its class names; the CSV cell joins them with ';'
NAMES = [
    ["Pastures", "Sea and ocean"],
    ["Forest"],
    ["Urban", "Forest", "Pastures"],
    ["Sea and ocean"],
    ["Pastures"],
    ["Forest", "Sea and ocean"],
    ["Urban"],
]


def multi_hot(names, classes=CLASSES):
    v = np.zeros(len(classes), np.float32)
    v[[classes.index(n) for n in names]] = 1
    return v


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Converted multi-label archive: (shard dir, {source relpath: class names})."""
    tmp = tmp_path_factory.mktemp("ml")
    arc = generate_archive(tmp / "in", len(NAMES), 16, kind="rgb", layout="flat")
    truth = {f.relpath: names for f, names in zip(arc.files, NAMES)}
    with open(tmp / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["path", "label"])
        wr.writerows((rel, ";".join(names)) for rel, names in truth.items())
    argv = [
        str(tmp / "in"),
        "--out",
        str(tmp / "out"),
        "--labels",
        str(tmp / "labels.csv"),
        "--max-samples-per-shard",
        "3",
    ]
    convert(options_from_args(convert_parser().parse_args(argv)))
    return tmp / "out", truth


def cfg(root, **kw):
    base = dict(shards=str(root), batch_size=3, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def test_manifest_is_multilabel(archive):
    m = json.loads((archive[0] / "manifest.json").read_text())
    assert m["classes"] == CLASSES and m["multilabel"] is True and len(m["shards"]) == 3


def test_multilabel_index():
    idx = MultiLabelIndex(CLASSES)
    both = {"label": "a;b", "labels": ["Urban", "Forest"]}  # "labels" wins over "label"
    np.testing.assert_array_equal(idx(both), multi_hot(["Urban", "Forest"]))
    got = idx({"label": "Pastures;Sea and ocean"})  # no "labels": split the label string
    assert got.dtype == np.float32 and got.shape == (4,)
    np.testing.assert_array_equal(got, multi_hot(["Pastures", "Sea and ocean"]))
    np.testing.assert_array_equal(idx({"label": "Urban"}), multi_hot(["Urban"]))
    for bad in (
        {"label": None},
        {},
        {"label": ""},
        {"labels": []},
        {"label": "Urban;Glacier"},
        {"labels": ["Forest", "Glacier"]},
    ):
        with pytest.raises(CorruptSample):
            idx(bad)
    assert isinstance(MultiLabelIndex.from_manifest({"classes": CLASSES}), MultiLabelIndex)
    assert MultiLabelIndex.from_manifest({"classes": CLASSES}, ["Urban", "Forest"]).classes == ["Urban", "Forest"]
    with pytest.raises(UserError):
        MultiLabelIndex.from_manifest({"classes": None})


@pytest.mark.parametrize("workers", [0, 1])
def test_eval_loader_yields_multi_hot(archive, workers):
    root, truth = archive
    loader = build_eval_loader(cfg(root, num_workers=workers), 16, rank=0, world_size=1)
    assert loader.multilabel and isinstance(loader.classes, MultiLabelIndex) and loader.classes.classes == CLASSES
    batches = list(loader)
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.dtype == torch.float32 and labels.shape == (len(NAMES), len(CLASSES))
    assert [tuple(b["labels"].shape) for b in batches] == [(3, 4), (3, 4), (1, 4)]
    # eval order is shard order = sorted relpath order, the CSV's order here
    want = np.stack([multi_hot(truth[rel]) for rel in sorted(truth)])
    np.testing.assert_array_equal(labels.numpy(), want)
    assert loader.totals["skipped"] == 0


def test_unknown_label_is_skipped_and_counted(archive):
    root, truth = archive
    kept = ["Forest", "Pastures", "Sea and ocean"]  # 'Urban' unknown: files 2 and 6 are data errors
    loader = build_eval_loader(cfg(root, classes=kept), 16, rank=0, world_size=1)
    labels = torch.cat([b["labels"] for b in loader])
    want = np.stack([multi_hot(truth[rel], kept) for rel in sorted(truth) if "Urban" not in truth[rel]])
    np.testing.assert_array_equal(labels.numpy(), want)
    assert loader.totals["skipped"] == 2 and loader.totals["seen"] == len(NAMES) - 2


def test_override_and_finetune_loader(archive, shard_dir):
    root, truth = archive
    # multilabel=False on a multi-label archive: single-label samples only, (B,) long
    single = build_eval_loader(cfg(root), 16, rank=0, world_size=1, multilabel=False)
    assert not single.multilabel and type(single.classes) is ClassIndex
    labels = torch.cat([b["labels"] for b in single])
    assert labels.dtype == torch.long
    assert labels.tolist() == [CLASSES.index(truth[r][0]) for r in sorted(truth) if len(truth[r]) == 1]
    assert single.totals["skipped"] == 3
    # multilabel=True on a single-label archive: one-hot rows
    plain = shard_dir("plain", per_shard=3, n_shards=1, classes=["a", "b"])
    hot = build_eval_loader(cfg(plain), 8, rank=0, world_size=1, multilabel=True)
    np.testing.assert_array_equal(next(iter(hot))["labels"].numpy(), [[1, 0], [0, 1], [1, 0]])
    assert not build_eval_loader(cfg(plain), 8, rank=0, world_size=1).multilabel
    # fine-tune loader follows the manifest
    ft = build_finetune_loader(cfg(root, steps_per_epoch=2), CropConfig(), 16, rank=0, world_size=1)
    assert ft.multilabel
    batch = next(iter(ft))
    assert batch["labels"].shape == (3, 4) and batch["labels"].dtype == torch.float32
    rows = {tuple(multi_hot(n)) for n in NAMES}
    assert all(tuple(r) in rows for r in batch["labels"].numpy())
