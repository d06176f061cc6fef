"""Adapter files a request names: where they may come from, and checks made before a byte of them is loaded.

A request names an adapter (a LoRA, a textual-inversion embedding); the name becomes a file under one root
folder (``TRIPTYCH_LORA_DIR``, ``TRIPTYCH_EMBEDDINGS_DIR``). Every way out of that folder is closed:

* a name must match ``[A-Za-z0-9][A-Za-z0-9._-]{0,99}`` (no separators, no ``..``, no leading dot) -> 422;
* the file is ``<root>/<name>.safetensors``, and its real path (symlinks resolved) must lie inside the root's
  real path, so a symlink pointing elsewhere is as absent as a missing file -> 404 listing what exists;
* pickle formats (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``) are never opened: they are not listed,
  and naming one is the same 404;
* the safetensors header is read and checked by hand before any library parses the file: its declared
  length against the file's size and a bound, JSON, dtypes, shapes, and data offsets that lie inside the
  file, match their shape and do not overlap -> 422 naming the adapter (never the server path).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import InvalidValue, NotFound
from shared.protocol import ADAPTER_NAME

NAME_PATTERN = re.compile(ADAPTER_NAME)
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
#: Largest safetensors header read (the JSON index of the tensors; real ones are a few hundred KB at most).
MAX_HEADER_BYTES = 16 * 1024 * 1024

# safetensors dtype -> item size in bytes.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class AdapterFile:
    """One adapter file found under its root: its name (the file stem) and its real path."""

    name: str
    path: Path

    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Its tensors' names, dtypes and shapes, from a header checked by ``check_safetensors``."""
        return check_safetensors(self.path, self.name)

    def fingerprint(self) -> str:
        """The first 16 hex digits of the file's SHA-256 (what ``/v1/models`` shows and cache keys hold)."""
        return file_fingerprint(self.path)


_fingerprints: dict[tuple[str, int, int, int], str] = {}
_fingerprints_lock = threading.Lock()


def file_fingerprint(path: Path) -> str:
    """SHA-256 of a file's bytes (16 hex digits), hashed once per (path, inode, size, mtime): listing a folder
    of LoRAs again costs a ``stat`` per file, and a file replaced in place is hashed again."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _fingerprints_lock:
        known = _fingerprints.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    value = digest.hexdigest()[:16]
    with _fingerprints_lock:
        _fingerprints[key] = value
    return value


def check_name(name: str, *, kind: str, param: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidValue(
            f"{kind} name {name!r} is not valid: letters, digits, '.', '_' and '-', at most 100 characters, "
            "starting with a letter or digit",
            param=param,
        )
    return name


class AdapterRoot:
    """The ``.safetensors`` files directly inside one folder, by stem. ``None`` as the folder: none at all."""

    def __init__(self, folder: str | Path | None, *, kind: str, param: str) -> None:
        self.folder = Path(folder) if folder else None
        self.kind = kind
        self.param = param

    def _real_root(self) -> Path | None:
        if self.folder is None or not self.folder.is_dir():
            return None
        return Path(os.path.realpath(self.folder))

    def names(self) -> list[str]:
        """Every adapter that can be named, sorted: safetensors files inside the root, links included only when
        they resolve inside it."""
        root = self._real_root()
        if root is None:
            return []
        found = []
        for entry in root.iterdir():
            if entry.suffix == SUFFIX and NAME_PATTERN.match(entry.stem) and self._inside(root, entry) is not None:
                found.append(entry.stem)
        return sorted(found)

    def catalog(self) -> list[dict[str, Any]]:
        """Every adapter with its fingerprint and size, sorted by name (``/v1/info`` → ``config.adapters``). A
        file that disappears while listed is left out."""
        entries = []
        for name in self.names():
            try:
                file = self.resolve(name)
                entries.append({"name": name, "fingerprint": file.fingerprint(), "bytes": file.path.stat().st_size})
            except (NotFound, OSError):
                continue
        return entries

    @staticmethod
    def _inside(root: Path, entry: Path) -> Path | None:
        real = Path(os.path.realpath(entry))
        if real.parent != root and root not in real.parents:
            return None
        return real if real.is_file() else None

    def resolve(self, name: str) -> AdapterFile:
        """The file for ``name``: 422 for a malformed name, 404 (listing what exists) when there is none."""
        check_name(name, kind=self.kind, param=self.param)
        root = self._real_root()
        real = self._inside(root, root / f"{name}{SUFFIX}") if root is not None else None
        if real is None:
            available = self.names()
            listing = ", ".join(available) if available else "none"
            where = "" if self.folder is not None else f" (no {self.kind} folder is configured)"
            raise NotFound(f"{self.kind} {name!r} not found{where}; available: {listing}", param=self.param)
        return AdapterFile(name, real)


def check_safetensors(path: Path, name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a safetensors file's header without trusting it; return ``{tensor: (dtype, shape)}``.

    Raises InvalidValue (422) naming ``name`` for anything a well-formed file would not have."""

    def bad(why: str) -> InvalidValue:
        return InvalidValue(f"{name!r} is not a valid safetensors file: {why}", param=None)

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"declares a {header_len}-byte header in a {size}-byte file")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data_len = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad(f"entry {key!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise bad(f"tensor {key!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(f"tensor {key!r} has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise bad(f"tensor {key!r} has data offsets outside the file")
        if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]:
            raise bad(f"tensor {key!r}: its data does not match its shape {shape} and dtype {dtype}")
        spans.append((offsets[0], offsets[1], key))
        out[key] = (dtype, tuple(shape))
    spans.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise bad(f"tensors {first!r} and {second!r} overlap")
    return out
