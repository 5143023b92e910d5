"""Reading and writing tensor files, whatever they hold: safetensors (read, atomic write), torch
pickles (weights-only unless the file is our own), and a cached sha256 of a file.

Nothing here knows a state-dict layout; the formats in ``engine.model.formats`` do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from engine.atomic import atomic_write
from engine.errors import UserError

StateDict = dict[str, torch.Tensor]
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (cached per path, size and mtime: hashing ViT-g takes seconds)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def path_sha256(path: str | Path) -> str:
    """:func:`file_sha256` of a file; of a directory (a trainer checkpoint used as weights), the
    sha256 of its files' relative paths and digests, in sorted order."""
    p = Path(path)
    if not p.is_dir():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a safetensors file."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def safetensors_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """The safetensors file of ``tensors`` (copied to CPU, contiguous) with string metadata ``meta``,
    byte-identical for identical inputs.

    The safetensors library writes its JSON header from a hash map, so the order of the metadata
    keys -- and with it the file's bytes and sha256 -- changes from one process to the next. The
    header is rewritten here with sorted keys (padded to 8 bytes with spaces, as the library does);
    the tensor offsets are relative to the end of the header, so the data part is unchanged.
    """
    data = save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata=meta)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, meta: dict[str, str]) -> Path:
    """Write :func:`safetensors_bytes` of ``tensors`` and ``meta`` to ``path``, atomically."""
    data = safetensors_bytes(tensors, meta)
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def torch_load(path: Path, flag: str, trusted: bool = False) -> Any:
    """``torch.load`` on CPU, weights-only; UserError naming ``flag`` when that fails.

    trusted: the file is our trainer's own DeepSpeed checkpoint (written by this program in the run
    directory), so a full unpickle is allowed when weights-only cannot read it.
    """
    try:
        # MAE's training checkpoints pickle their argparse.Namespace next to the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is reported to the user below
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(
            f"{flag} '{path}': cannot be read as a weights-only torch checkpoint ({first}); "
            "re-save its state dict with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from None
