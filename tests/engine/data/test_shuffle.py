"""The shuffle buffer: a permutation, deterministic, warm start, capped in samples and in bytes."""

import itertools

import numpy as np

from engine.config import CropConfig, DataConfig
from engine.data import build_pretrain_loader
from engine.data.shuffle import sample_bytes, shuffled


def _samples(n, size=100, log=None):
    for i in range(n):
        if log is not None:
            log.append(i)
        yield {"__key__": f"k{i}", "img.npy": bytearray(size)}


def _keys(it):
    return [s["__key__"] for s in it]


def test_permutation_and_deterministic():
    a = _keys(shuffled(_samples(500), np.random.default_rng(1), 64, 0, 8))
    b = _keys(shuffled(_samples(500), np.random.default_rng(1), 64, 0, 8))
    assert a == b and sorted(a) == sorted(f"k{i}" for i in range(500)) and a != [f"k{i}" for i in range(500)]
    assert _keys(shuffled(_samples(5), np.random.default_rng(0), 0, 0, 8)) == [f"k{i}" for i in range(5)]


def test_first_sample_leaves_after_initial_not_after_a_full_buffer():
    read: list[int] = []
    it = shuffled(_samples(10_000, log=read), np.random.default_rng(0), 5000, 0, 32)
    next(it)
    assert len(read) == 32  # a full buffer would have read 5000
    assert len(list(itertools.islice(it, 99))) == 99
    assert len(read) < 32 + 2 * 100 + 1  # while warming up: two reads per sample out


def test_byte_cap_bounds_what_the_buffer_holds():
    read: list[int] = []
    out = 0
    cap = 10 * 1000
    for _ in shuffled(_samples(2000, size=1000, log=read), np.random.default_rng(0), 5000, cap, 4):
        out += 1
        assert (len(read) - out) * 1000 <= cap  # samples read but not yet out = held in the buffer
    assert out == 2000
    assert sample_bytes({"__key__": "x", "a": bytearray(3), "b": b"12"}) == 5


def test_loader_state_changes_with_the_byte_cap(shard_dir):
    """The byte cap is part of the stream's topology: a changed cap cannot resume exactly."""
    root = shard_dir(per_shard=[5, 4], size=8, dtype="uint8")
    crops = CropConfig(global_size=8, local_size=8, num_local=0)

    def make(buffer_bytes):
        data = DataConfig(
            shards=str(root), batch_size=2, num_workers=0, shuffle_buffer_bytes=buffer_bytes, steps_per_epoch=2
        )
        return build_pretrain_loader(data, crops, "dino", patch_size=8, rank=0, world_size=1)

    assert make(2**20).state_dict()["topology"] != make(2**21).state_dict()["topology"]
