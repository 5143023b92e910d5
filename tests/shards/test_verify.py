"""verify re-reads everything and fails (exit 1) on any mismatch with the manifest."""

import json
import tarfile

import numpy as np
import pytest

from shards.convert import main
from shards.synthetic import generate_archive
from shards.verify import verify
from shards.writer import ShardWriter, npy_header


@pytest.fixture
def converted(tmp_path, run_convert):
    generate_archive(tmp_path / "in", 4, 16, kind="s2")
    run_convert(tmp_path / "in", tmp_path / "out", "--max-samples-per-shard", "2")
    return tmp_path / "out"


def test_clean_output_verifies(converted, capsys):
    assert main(["verify", str(converted)]) == 0
    assert "2 shards, 4 samples: OK" in capsys.readouterr().out


def test_tampered_shard_fails(converted, capsys):
    path = converted / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[1200] ^= 0xFF  # one flipped byte inside the pixel data
    path.write_bytes(bytes(data))
    assert main(["verify", str(converted)]) == 1
    out = capsys.readouterr()
    assert "shard-000001.tar: sha256 does not match" in out.err and "1 problem(s)" in out.out


def test_missing_extra_and_miscounted_shards_fail(converted):
    m = json.loads((converted / "manifest.json").read_text())
    m["shards"][0]["count"] = 3
    m["total_samples"] = 5
    (converted / "manifest.json").write_text(json.dumps(m))
    (converted / "shard-000001.tar").rename(converted / "shard-000009.tar")
    probs = verify(str(converted)).problems
    assert any("shard-000009.tar: shard file not listed" in p for p in probs)
    assert any("shard-000001.tar: listed in the manifest but missing" in p for p in probs)
    assert any("shard-000000.tar: 2 samples, manifest says 3" in p for p in probs)


def test_undecodable_sample_is_reported_even_with_matching_checksum(converted):
    # rebuild shard 0 with a wrong-dtype array and re-sign the manifest, so only decoding can tell
    with ShardWriter(converted, "shard-000000.tar") as w:
        w.write("x", np.zeros((13, 4, 4), np.float32), {"source": "x"})
        w.write(
            "y",
            np.zeros((13, 4, 4), np.uint16),
            dict.fromkeys(("source", "window", "crs", "transform", "band_names", "nodata", "dtype", "label")),
        )
    m = json.loads((converted / "manifest.json").read_text())
    m["shards"][0].update(bytes=w.bytes, sha256=w.sha256)
    (converted / "manifest.json").write_text(json.dumps(m))
    probs = verify(str(converted)).problems
    assert any("sample 'x': array (13, 4, 4) float32" in p for p in probs)
    assert any("sample 'x': json lacks" in p for p in probs)
    assert not any("sample 'y'" in p for p in probs)


def test_no_manifest_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", str(tmp_path)])
    assert e.value.code == 2 and "no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "dtype,shape", [("uint8", (3, 1, 7)), ("int16", (1, 33, 2)), ("float32", (13, 5, 5)), ("uint16", (2, 0, 3))]
)
def test_writer_npy_and_tar_are_standard(tmp_path, dtype, shape):
    import io

    arr = (np.arange(int(np.prod(shape))) % 97).astype(dtype).reshape(shape)
    assert len(npy_header(arr.dtype, arr.shape)) % 64 == 0
    key = "deep/" * 30 + "k"  # > 100 characters: GNU long-name members
    with ShardWriter(tmp_path, "t.tar") as w:
        w.write(key, arr[:, :, ::-1], {"a": 1})  # non-contiguous input is written contiguously
    data = (tmp_path / "t.tar").read_bytes()
    assert len(data) % tarfile.RECORDSIZE == 0 and len(data) == w.bytes
    import hashlib

    assert hashlib.sha256(data).hexdigest() == w.sha256
    with tarfile.open(tmp_path / "t.tar") as tar:
        names = tar.getnames()
        got = np.load(io.BytesIO(tar.extractfile(f"{key}.img.npy").read()))
        meta = json.loads(tar.extractfile(f"{key}.json").read())
    assert names == [f"{key}.img.npy", f"{key}.json"] and meta == {"a": 1}
    np.testing.assert_array_equal(got, arr[:, :, ::-1])
    assert got.dtype == np.dtype(dtype)
