"""engine.atomic: crash-safe writes land with the permissions a plain open()/mkdir() would give."""

import contextlib
import os
import stat

import pytest

from engine.atomic import atomic_dir, atomic_write, atomic_write_text, current_umask


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_write_gets_the_mode_of_a_plain_open(tmp_path, mask):
    with _umask(mask):
        assert current_umask() == mask
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"x")
        with atomic_write(tmp_path / "atomic.bin") as f:
            f.write(b"x")
        atomic_write_text(tmp_path / "atomic.txt", "x")
    expected = 0o666 & ~mask
    assert _mode(tmp_path / "plain.bin") == expected
    assert _mode(tmp_path / "atomic.bin") == expected
    assert _mode(tmp_path / "atomic.txt") == expected
    assert (tmp_path / "atomic.txt").read_text() == "x"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_dir_gets_the_mode_of_a_plain_mkdir(tmp_path, mask):
    with _umask(mask):
        os.mkdir(tmp_path / "plain")
        with atomic_dir(tmp_path / "ckpt") as d:
            (d / "a.txt").write_text("a")
    assert _mode(tmp_path / "plain") == 0o777 & ~mask
    assert _mode(tmp_path / "ckpt") == 0o777 & ~mask
    assert (tmp_path / "ckpt" / "a.txt").read_text() == "a"


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("new")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]
