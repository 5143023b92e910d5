"""Raw shard samples: stream a tar shard into per-key samples, decode ``.npy`` without copying.

A shard is read strictly sequentially (over ``webdataset.gopen``, so local paths, ``file:`` and
``pipe:``/HTTP URLs all work) by a small tar reader (:func:`iter_members`). Each member is read
straight into its own ``bytearray`` (``readinto``), so the image array that :func:`decode_npy`
returns is a writable ``np.frombuffer`` view of that buffer: no copy between the file and the
crop, and ``torch.from_numpy`` accepts it without the read-only warning.

A raw sample is ``{"__key__": str, "__url__": str, "<ext>": bytearray, ...}`` where ``<ext>`` is
the member name after the first dot (``img.npy``, ``json``).
"""

from __future__ import annotations

import functools
import io
import json
import time
from collections.abc import Callable, Iterator

import numpy as np
import webdataset as wds

IMAGE_EXT = "img.npy"
META_EXT = "json"
_NPY_MAGIC = b"\x93NUMPY"


class CorruptSample(ValueError):
    """A sample whose bytes cannot be decoded into the expected C×H×W array (or its json)."""


class ShardOpener:
    """Picklable opener: ``webdataset.gopen`` plus an optional simulated per-open latency.

    ``latency_s`` lets the benchmark model network storage (each open of a file or object costs
    milliseconds there); it is 0 in real runs.
    """

    def __init__(self, latency_s: float = 0.0):
        self.latency_s = float(latency_s)

    def __call__(self, url: str):
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        return wds.gopen(url, "rb")


_BLOCK = 512


class TarFormatError(ValueError):
    """The shard is not a readable (uncompressed) tar stream, or it breaks off."""


def _read_exact(f, n: int) -> bytearray:
    """Exactly ``n`` bytes from ``f`` into a fresh bytearray (``readinto``: no intermediate copy)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:]) if hasattr(f, "readinto") else None
        if k is None:
            chunk = f.read(n - got)
            k = len(chunk)
            view[got : got + k] = chunk
        if not k:
            raise TarFormatError(f"unexpected end of data after {got} of {n} bytes")
        got += k
    return buf


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError("bad tar header checksum/size field (not a tar file, or corrupt)") from None


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header (records are ``"<len> key=value\n"``)."""
    path = None
    pos = 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def iter_members(f) -> Iterator[tuple[str, bytearray]]:
    """(name, data) of each regular file in an uncompressed tar stream, read sequentially.

    A minimal ustar/pax/GNU reader: ``tarfile``'s stream mode copies every member through
    10 KiB records and joins them (~1 ms per 400 KB chip, 5x the read itself); this reads each
    member straight into its own buffer. Header checksums are verified so garbage is reported,
    not misparsed. Compressed shards are refused (use ``pipe:gunzip -c shard.tar.gz``).
    """
    long_name: str | None = None
    while True:
        try:
            header = _read_exact(f, _BLOCK)
        except TarFormatError:
            raise TarFormatError("tar stream ends without an end-of-archive marker") from None
        if not any(header):
            return
        if header[:2] == b"\x1f\x8b":
            raise TarFormatError("gzip-compressed shard; give it as 'pipe:gunzip -c <file>' or decompress it")
        stored = _octal(bytes(header[148:156]))
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise TarFormatError("bad tar header checksum (not a tar file, or corrupt)")
        size = _octal(bytes(header[124:136]))
        kind = bytes(header[156:157])
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = prefix + "/" + name
        data = _read_exact(f, size) if size else bytearray()
        pad = -size % _BLOCK
        if pad:
            _read_exact(f, pad)
        if kind in (b"x", b"L"):
            long_name = _pax_path(bytes(data)) if kind == b"x" else bytes(data).split(b"\0", 1)[0].decode("utf-8")
            continue
        if kind in (b"0", b"\0", b"7"):
            yield (long_name or name), data
        long_name = None


def iter_shard(url: str, opener: Callable[[str], io.RawIOBase]) -> Iterator[dict]:
    """Yield raw samples of one shard in file order; raises on an unreadable/truncated tar.

    Members are grouped by key (the file name up to its first dot, directories included), which
    the converter writes consecutively. Members without a dot and ``__meta__`` files are ignored.
    """
    fileobj = opener(url)
    try:
        current: dict | None = None
        for name, data in iter_members(fileobj):
            head, sep, tail = name.rpartition("/")
            dot = tail.find(".")
            if dot <= 0 or tail.startswith("__"):
                continue
            key = head + sep + tail[:dot]
            ext = tail[dot + 1 :].lower()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = data
        if current is not None:
            yield current
    finally:
        close = getattr(fileobj, "close", None)
        if close is not None:
            close()


@functools.lru_cache(maxsize=256)
def _parse_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy header; cached because the chips of a shard
    almost always share one header and numpy parses it with ``ast.literal_eval``."""
    f = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
        return reader(f)
    except ValueError as e:
        raise CorruptSample(f"bad .npy header ({e})") from None


def decode_npy(buf: bytearray) -> np.ndarray:
    """``.npy`` bytes -> array viewing ``buf`` (no copy). Raises CorruptSample on any mismatch."""
    mv = memoryview(buf)
    if len(mv) < 10 or bytes(mv[:6]) != _NPY_MAGIC:
        raise CorruptSample("not an .npy payload (bad magic)")
    major = mv[6]
    if major == 1:
        start, hlen = 10, int.from_bytes(mv[8:10], "little")
    elif major in (2, 3):
        start, hlen = 12, int.from_bytes(mv[8:12], "little")
    else:
        raise CorruptSample(f"unsupported .npy version {major}")
    shape, fortran, dtype = _parse_header(bytes(mv[: start + hlen]))
    if dtype.hasobject:
        raise CorruptSample("object arrays are not allowed in shards")
    count = int(np.prod(shape)) if shape else 1
    offset = start + hlen
    if len(mv) - offset != count * dtype.itemsize:
        raise CorruptSample(f".npy payload has {len(mv) - offset} bytes, header says {count * dtype.itemsize}")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def decode_image(sample: dict, num_bands: int | None) -> np.ndarray:
    """The sample's (C, H, W) image (a view of its buffer); CorruptSample if missing or malformed."""
    buf = sample.get(IMAGE_EXT)
    if buf is None:
        raise CorruptSample(f"no .{IMAGE_EXT} member")
    arr = decode_npy(buf)
    if arr.ndim != 3 or min(arr.shape) == 0:
        raise CorruptSample(f"image shape {arr.shape} is not C×H×W")
    if num_bands is not None and arr.shape[0] != num_bands:
        raise CorruptSample(f"image has {arr.shape[0]} bands, the manifest says {num_bands}")
    return arr


def decode_meta(sample: dict) -> dict:
    """The sample's json metadata; CorruptSample if missing or not a JSON object."""
    buf = sample.get(META_EXT)
    if buf is None:
        raise CorruptSample(f"no .{META_EXT} member")
    try:
        meta = json.loads(bytes(buf))
    except ValueError as e:
        raise CorruptSample(f"bad json ({e})") from None
    if not isinstance(meta, dict):
        raise CorruptSample("json metadata is not an object")
    return meta
