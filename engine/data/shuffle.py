"""The per-worker shuffle buffer of raw (undecoded) samples, capped in samples and in bytes.

A buffer that yields nothing until it is full stalls the start of every epoch (5,000 samples of a
ViT-L preset is minutes of reading on network storage), and a cap in samples says nothing about
memory: 5,000 raw samples are 1 GB of 256 px RGB chips but 34 GB of 512 px 13-band uint16 ones.
So the buffer here

- holds at most ``max_samples`` samples *and* at most ``max_bytes`` bytes of sample payload;
- starts yielding once it holds ``initial`` samples and, until it reaches a cap, takes in two
  samples for each one it yields, so it grows to its full size over the first ~2x its capacity
  reads (the warm-up webdataset's ``shuffle(bufsize, initial)`` uses); the first batches are
  drawn from a smaller pool, later ones from the full buffer.

The output is a deterministic function of the input order and ``rng``, which the loader's exact
resume relies on (it replays the shuffled stream by count).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def sample_bytes(sample: dict) -> int:
    """Payload bytes of a raw sample (its member buffers; keys and small strings are not counted)."""
    return sum(len(v) for v in sample.values() if isinstance(v, (bytes, bytearray, memoryview)))


def shuffled(
    samples: Iterator[dict], rng: np.random.Generator, max_samples: int, max_bytes: int, initial: int
) -> Iterator[dict]:
    """``samples`` in shuffled order through a buffer of at most ``max_samples`` samples and
    ``max_bytes`` payload bytes (0 = no byte cap); ``max_samples <= 1`` passes them through."""
    if max_samples <= 1:
        yield from samples
        return
    initial = max(1, min(initial, max_samples))
    buf: list[dict] = []
    held = 0
    absorb = True  # flipped before use: the first sample leaves as soon as `initial` are held
    for s in samples:
        buf.append(s)
        held += sample_bytes(s)
        full = len(buf) >= max_samples or (max_bytes > 0 and held >= max_bytes)
        if not full:
            if len(buf) < initial:
                continue
            absorb = not absorb  # warm-up: every other incoming sample only grows the buffer
            if absorb:
                continue
        out = _pop_random(buf, rng)
        held -= sample_bytes(out)
        yield out
    while buf:
        yield _pop_random(buf, rng)


def _pop_random(buf: list[dict], rng: np.random.Generator) -> dict:
    k = int(rng.integers(len(buf)))
    buf[k], buf[-1] = buf[-1], buf[k]
    return buf.pop()
