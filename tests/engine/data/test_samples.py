"""Shard reading: the tar reader (ustar, pax, GNU long names), zero-copy decode, pipe: URLs."""

import io
import tarfile

import numpy as np
import pytest
from fake_shards import npy_bytes

from engine.config import DataConfig
from engine.data import build_eval_loader
from engine.data.samples import CorruptSample, ShardOpener, TarFormatError, decode_npy, iter_shard


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_long_names_and_grouping(tmp_path, fmt):
    deep = "region_" + "x" * 60 + "/" + "tile_" + "y" * (150 if fmt != tarfile.USTAR_FORMAT else 40)
    names = [f"{deep}_{i}" for i in range(3)]
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        tf.addfile(tarfile.TarInfo("somedir"))  # size-0 entry without a dot: ignored
        for i, key in enumerate(names):
            for ext, data in (("img.npy", npy_bytes(np.full((2, 3, 3), i, np.uint16))), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    samples = list(iter_shard(str(path), ShardOpener()))
    assert [s["__key__"] for s in samples] == names
    assert [int(decode_npy(s["img.npy"])[0, 0, 0]) for s in samples] == [0, 1, 2]
    assert all(bytes(s["json"]) == b"{}" for s in samples)


def test_tar_reader_rejects_garbage_truncation_and_gzip(tmp_path, shard_dir):
    root = shard_dir(per_shard=[2], size=8)
    good = (root / "shard-000000.tar").read_bytes()
    for name, data, needle in (
        ("garbage.tar", b"\1" * 2048, "checksum"),
        ("cut.tar", good[:1500], "end"),
        ("gz.tar", b"\x1f\x8b" + b"\0" * 1022, "gzip"),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TarFormatError, match=needle):
            list(iter_shard(str(tmp_path / name), ShardOpener()))


def test_decode_npy_is_zero_copy_and_rejects_garbage():
    arr = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    buf = bytearray(npy_bytes(arr))
    out = decode_npy(buf)
    assert np.array_equal(out, arr) and out.flags.writeable
    buf[-1] ^= 0xFF
    assert out[-1, -1, -1] != arr[-1, -1, -1]  # the array views the member buffer
    with pytest.raises(CorruptSample, match="bad magic"):
        decode_npy(bytearray(b"garbage payload"))
    with pytest.raises(CorruptSample, match="header says"):
        decode_npy(bytearray(npy_bytes(arr))[:-2])


def test_pipe_url_shards_stream(shard_dir):
    root = shard_dir(per_shard=[3, 2], size=8, classes=["a", "b"])
    spec = f"pipe:cat {root}/shard-{{000000..000001}}.tar"
    cfg = DataConfig(shards=spec, manifest=str(root / "manifest.json"), batch_size=4, num_workers=0)
    loader = build_eval_loader(cfg, 8, rank=0, world_size=1)
    got = sorted(int(v) for b in loader for v in b["images"][:, 0, 0, 0])
    assert got == [0, 1, 2, 3, 4] and loader.totals["skipped"] == 0
