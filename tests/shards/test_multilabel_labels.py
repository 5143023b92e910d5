"""Multi-label CSV cells ("a;b") through the converter: sample json and manifest classes."""

import csv

import pytest

from shards.inputs import canonical_label, label_names, read_label_csv
from shards.synthetic import generate_archive

# file index -> CSV cell (spaces, a repeat and a trailing ';' on purpose)
CELLS = ["Pastures;Sea and ocean", "Pastures", " Sea and ocean ; Pastures;Pastures ", "Forest;"]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["path", "label"])
        wr.writerows(rows)
    return path


@pytest.mark.parametrize(
    "cell,canon,names",
    [
        ("Pastures", "Pastures", ["Pastures"]),
        (" a b ", "a b", ["a b"]),
        ("a;b", "a;b", ["a", "b"]),
        (" b ; a;b;", "b;a", ["b", "a"]),
        ("a;", "a", ["a"]),
        ("", "", [""]),
    ],
)
def test_canonical_label_and_names(cell, canon, names):
    assert canonical_label(cell) == canon
    assert label_names(canon) == names
    assert label_names(None) == []


def test_csv_reader_canonicalises_cells(tmp_path):
    table = read_label_csv(
        str(write_csv(tmp_path / "l.csv", [("x.tif", c) for c in CELLS[:1]] + [("y.tif", CELLS[2])]))
    )
    assert table == {"x.tif": "Pastures;Sea and ocean", "y.tif": "Sea and ocean;Pastures"}


def test_multilabel_csv_to_json_and_manifest(tmp_path, run_convert, read_shards):
    arc = generate_archive(tmp_path / "in", len(CELLS), 16, kind="rgb", layout="flat")
    csv_path = write_csv(tmp_path / "labels.csv", [(f.relpath, c) for f, c in zip(arc.files, CELLS)])
    run_convert(tmp_path / "in", tmp_path / "out", "--labels", csv_path)
    samples, m = read_shards(tmp_path / "out")
    assert m["classes"] == ["Forest", "Pastures", "Sea and ocean"]
    assert m["multilabel"] is True
    want = {  # relpath -> (json "label", json "labels" or absent)
        arc.files[0].relpath: ("Pastures;Sea and ocean", ["Pastures", "Sea and ocean"]),
        arc.files[1].relpath: ("Pastures", None),
        arc.files[2].relpath: ("Sea and ocean;Pastures", ["Sea and ocean", "Pastures"]),
        arc.files[3].relpath: ("Forest", None),
    }
    assert len(samples) == len(CELLS)
    for _, meta in samples.values():
        label, labels = want[meta["source"]]
        assert meta["label"] == label
        assert meta.get("labels") == labels


def test_single_label_csv_unchanged(tmp_path, run_convert, read_shards):
    arc = generate_archive(tmp_path / "in", 3, 16, kind="rgb", classes=["farm", "port"], labels_csv=True, layout="flat")
    run_convert(tmp_path / "in", tmp_path / "out", "--labels", arc.labels_csv)
    samples, m = read_shards(tmp_path / "out")
    assert m["classes"] == ["farm", "port"] and "multilabel" not in m
    for _, meta in samples.values():
        assert "labels" not in meta and meta["label"] in ("farm", "port")
