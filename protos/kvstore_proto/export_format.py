"""The on-disk format of a table export: a directory of chunk files and a manifest.

    <dir>/manifest.json          written last: a directory without it is incomplete
    <dir>/chunk-000000.npz       uncompressed .npz: ids, weights, state, meta
    <dir>/chunk-000001.npz       ...

See docs/export-format.md for every field. It lives beside the wire codec
because both sides use it: the client CLI writes and reads exports, and the
store never needs to. Only numpy and ml_dtypes (for bfloat16) are required.
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import numpy.lib.format as npy

from .direct_files import HashedFile, StagingBuffer

FORMAT = "kvstore-table-export"
FORMAT_VERSION = 2             # 2: chunk files checked by CRC-32; 1 (SHA-256) is still read
READ_VERSIONS = {1: "sha256", 2: "crc32"}    # the checksum field of a chunk entry, by format version
MANIFEST = "manifest.json"
META_FIELDS = ("count", "last_access", "step")
FILE_BYTES = 64 << 20          # target size of one chunk file
_WEIGHT_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
                  "float64": np.dtype("<f8"), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_STORED_AS = {"bfloat16": np.dtype("<u2")}    # npy cannot name bfloat16: its bits go as uint16


class ExportFormatError(ValueError):
    """An export directory is missing, incomplete, corrupt or of another version; names the file or field."""


@dataclass
class ExportChunk:
    ids: np.ndarray        # [n] int64
    weights: np.ndarray    # [n, dim] in `dtype`
    state: np.ndarray      # [n, state_dim] float32
    meta: np.ndarray       # [n, 3] uint32: count, last_access, step


def _sha256(path: str) -> str:
    """The file's SHA-256, hashed from the page cache in place (mmap: no copy into Python)."""
    with open(path, "rb") as src:
        if os.fstat(src.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def _map(path: str) -> mmap.mmap | bytes:
    """The file's bytes, mapped read-only (arrays viewing them keep the mapping alive)."""
    with open(path, "rb") as src:
        if os.fstat(src.fileno()).st_size == 0:
            return b""
        return mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)


_LOCAL_HEADER = struct.Struct("<4s22xHH")   # signature ... file name length, extra field length


def _npz_views(mapped, name: str) -> dict[str, np.ndarray]:
    """Read-only arrays viewing the members of an uncompressed .npz in place: no read into a
    buffer, no copy out of it, as np.load makes. Damage in its layout is an ExportFormatError
    (`ExportReader.streamed` reads the layout before the checksum is checked)."""
    try:
        with zipfile.ZipFile(io.BytesIO(mapped) if isinstance(mapped, bytes) else _MappedFile(mapped)) as archive:
            members = archive.infolist()
        arrays = {}
        for info in members:
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ExportFormatError(f"{name}: member {info.filename!r} is not an uncompressed .npy")
            signature, name_len, extra_len = _LOCAL_HEADER.unpack_from(mapped, info.header_offset)
            if signature != b"PK\x03\x04":
                raise ExportFormatError(f"{name}: member {info.filename!r} has no local header")
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            member = io.BytesIO(mapped[start:start + min(info.file_size, 1 << 16)])
            version = npy.read_magic(member)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, fortran, dtype = read_header(member)
            if fortran or dtype.hasobject:
                raise ExportFormatError(f"{name}: member {info.filename!r} is not a C-ordered numeric array")
            count = int(np.prod(shape))
            if member.tell() + count * dtype.itemsize > info.file_size:
                raise ExportFormatError(f"{name}: member {info.filename!r} is shorter than its shape {shape}")
            arrays[info.filename[:-4]] = np.frombuffer(mapped, dtype, count, start + member.tell()).reshape(shape)
    except (zipfile.BadZipFile, struct.error, ValueError) as exc:
        if isinstance(exc, ExportFormatError):
            raise
        raise ExportFormatError(f"{name}: not a valid .npz: {exc}") from None
    missing = {"ids", "weights", "state", "meta"} - set(arrays)
    if missing:
        raise ExportFormatError(f"{name}: missing member {sorted(missing)[0]}.npy")
    return arrays


class _MappedFile(io.RawIOBase):
    """A seekable read-only file over a mapping, for zipfile's central-directory read."""

    def __init__(self, mapped: mmap.mmap):
        self.mapped, self.position = mapped, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = offset + (0, self.position, len(self.mapped))[whence]
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        data = self.mapped[self.position:self.position + len(buffer)]
        memoryview(buffer)[:len(data)] = data
        self.position += len(data)
        return len(data)


def _checksum(kind: str, mapped) -> str:
    """The hex checksum of a chunk file's bytes as its format version records it."""
    if kind == "crc32":
        return f"{zlib.crc32(mapped):08x}"
    return hashlib.sha256(mapped).hexdigest()


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file's content (side files of an export, e.g. a delta's tombstones)."""
    return _sha256(path)


def _write_npz(out: io.RawIOBase, columns: dict[str, list[np.ndarray]]) -> None:
    """What `np.savez` writes of the concatenation of each column's parts (an uncompressed zip of
    .npy members), without building it: the parts' bytes go to zipfile one after the other, as
    they lie in memory. (savez would need the concatenated arrays and copies each once more.)"""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, parts in columns.items():
            parts = [np.ascontiguousarray(part) for part in parts]
            shape = (sum(len(part) for part in parts), *parts[0].shape[1:])
            header = {"descr": npy.dtype_to_descr(parts[0].dtype), "fortran_order": False, "shape": shape}
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                npy.write_array_header_1_0(member, header)
                for part in parts:
                    member.write(memoryview(part.reshape(-1)).cast("B"))


class ExportWriter:
    """Writes chunks to a new directory; `close()` writes the manifest that makes it complete."""

    def __init__(self, path: str, table: dict[str, Any], dim: int, dtype: str, state_dim: int,
                 file_bytes: int = FILE_BYTES):
        if dtype not in _WEIGHT_DTYPES:
            raise ExportFormatError(f"dtype: unsupported weight dtype {dtype!r}")
        if os.path.exists(os.path.join(path, MANIFEST)):
            raise FileExistsError(f"{path}: already holds an export")
        os.makedirs(path, exist_ok=True)
        self.path, self.table, self.dim, self.dtype, self.state_dim = path, table, dim, dtype, state_dim
        self.row_bytes = 8 + dim * _WEIGHT_DTYPES[dtype].itemsize + state_dim * 4 + 12
        self.rows_per_file = max(1, file_bytes // self.row_bytes)
        self.rows = 0
        self.sorted = True
        self._chunks: list[dict[str, Any]] = []
        self._pending: list[ExportChunk] = []
        self._pending_rows = 0
        self._last_id: int | None = None
        self._buffer: StagingBuffer | None = None     # made at the first file, reused by the next ones

    def write(self, ids, weights, state, meta) -> None:
        chunk = ExportChunk(np.asarray(ids, dtype="<i8"), np.asarray(weights, dtype=_WEIGHT_DTYPES[self.dtype]),
                            np.asarray(state, dtype="<f4"), np.asarray(meta, dtype="<u4"))
        n = len(chunk.ids)
        for name, shape in (("weights", (n, self.dim)), ("state", (n, self.state_dim)), ("meta", (n, 3))):
            if getattr(chunk, name).shape != shape:
                raise ExportFormatError(f"{name}: expected shape {shape}, got {getattr(chunk, name).shape}")
        if not n:
            return
        if (self._last_id is not None and chunk.ids[0] <= self._last_id) or (np.diff(chunk.ids) <= 0).any():
            self.sorted = False
        self._last_id = int(chunk.ids[-1])
        self._pending.append(chunk)
        self._pending_rows += n
        self.rows += n
        if self._pending_rows >= self.rows_per_file:
            self._write_file()

    def _write_file(self) -> None:
        if not self._pending:
            return
        parts = self._pending
        self._pending, self._pending_rows = [], 0
        stored = _STORED_AS.get(self.dtype)
        name = f"chunk-{len(self._chunks):06d}.npz"
        columns = {"ids": [c.ids for c in parts],
                   "weights": [c.weights.view(stored) if stored is not None else c.weights for c in parts],
                   "state": [c.state for c in parts], "meta": [c.meta for c in parts]}
        if self._buffer is None:
            self._buffer = StagingBuffer()
        with HashedFile(os.path.join(self.path, name), self._buffer) as out:
            _write_npz(out, columns)
        self._chunks.append({"file": name, "rows": sum(len(c.ids) for c in parts), "first_id": int(parts[0].ids[0]),
                             "last_id": int(parts[-1].ids[-1]), "bytes": out.written,
                             "crc32": out.checksum})

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the manifest (with `extra` fields, e.g. a delta's sequences) that makes the export complete."""
        self._write_file()
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
        stored = _STORED_AS.get(self.dtype)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created_at": time.time(),
            "table": self.table, "rows": self.rows, "sorted": self.sorted,
            "columns": {
                "ids": {"dtype": "int64", "shape": ["rows"]},
                "weights": {"dtype": self.dtype, "stored_as": str(stored or self.dtype), "shape": ["rows", self.dim]},
                "state": {"dtype": "float32", "shape": ["rows", self.state_dim]},
                "meta": {"dtype": "uint32", "shape": ["rows", 3], "fields": list(META_FIELDS)},
            },
            "chunks": self._chunks,
            **(extra or {}),
        }
        tmp = os.path.join(self.path, MANIFEST + ".tmp")
        with open(tmp, "w") as out:
            json.dump(manifest, out, indent=2)
        os.replace(tmp, os.path.join(self.path, MANIFEST))
        return manifest


class ExportReader:
    """Reads an export directory, checking its manifest, every checksum and every shape."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(os.path.join(path, MANIFEST)) as src:
                self.manifest = json.load(src)
        except FileNotFoundError:
            raise ExportFormatError(f"{path}: no {MANIFEST} (not an export, or an incomplete one)") from None
        except ValueError as exc:
            raise ExportFormatError(f"{MANIFEST}: not valid JSON: {exc}") from None
        m = self.manifest
        if m.get("format") != FORMAT:
            raise ExportFormatError(f"{MANIFEST}.format: expected {FORMAT!r}, got {m.get('format')!r}")
        if m.get("format_version") not in READ_VERSIONS:
            raise ExportFormatError(f"{MANIFEST}.format_version: this reader knows {sorted(READ_VERSIONS)}, "
                                    f"got {m.get('format_version')!r}")
        self.checksum = READ_VERSIONS[m["format_version"]]
        try:
            weights = m["columns"]["weights"]
            self.dtype = weights["dtype"]
            self.dim = int(weights["shape"][1])
            self.state_dim = int(m["columns"]["state"]["shape"][1])
            self.rows = int(m["rows"])
            self.table = m["table"]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ExportFormatError(f"{MANIFEST}: missing or malformed field {exc}") from None
        if self.dtype not in _WEIGHT_DTYPES:
            raise ExportFormatError(f"{MANIFEST}.columns.weights.dtype: unsupported {self.dtype!r}")

    def __iter__(self) -> Iterator[ExportChunk]:
        for entry in self.manifest["chunks"]:
            name, mapped = self._open(entry)
            self._check(entry, name, mapped)
            yield self._chunk(entry, name, mapped)

    def streamed(self) -> Iterator[ExportChunk]:
        """The chunks as `iter` gives them, but each checked against its checksum only when the
        next one is asked for (the last one before the iteration ends), so its bytes are read
        from disk while the consumer sends them, not twice before. Its layout and shapes are
        checked first. Only for consumers whose work takes effect after a clean end: an import,
        which the server applies only after its final message (sent once no chunk follows)."""
        unchecked = None
        for entry in self.manifest["chunks"]:
            name, mapped = self._open(entry)
            chunk = self._chunk(entry, name, mapped)
            if unchecked is not None:
                self._check(*unchecked)
            unchecked = (entry, name, mapped)
            yield chunk
        if unchecked is not None:
            self._check(*unchecked)

    def _open(self, entry: dict[str, Any]) -> tuple[str, Any]:
        name = entry.get("file", "")
        if os.path.basename(name) != name or not name.endswith(".npz"):
            raise ExportFormatError(f"{MANIFEST}.chunks.file: {name!r} is not a chunk file name")
        path = os.path.join(self.path, name)
        if not os.path.isfile(path):
            raise ExportFormatError(f"{name}: missing")
        return name, _map(path)

    def _check(self, entry: dict[str, Any], name: str, mapped) -> None:
        if _checksum(self.checksum, mapped) != entry.get(self.checksum):
            raise ExportFormatError(f"{name}: checksum mismatch (corrupt or changed)")

    def _chunk(self, entry: dict[str, Any], name: str, mapped) -> ExportChunk:
        arrays = _npz_views(mapped, name)
        stored = _STORED_AS.get(self.dtype)
        weights = arrays["weights"].view(_WEIGHT_DTYPES[self.dtype]) if stored is not None else arrays["weights"]
        n = int(entry["rows"])
        chunk = ExportChunk(arrays["ids"], weights, arrays["state"], arrays["meta"])
        for field, shape in (("ids", (n,)), ("weights", (n, self.dim)), ("state", (n, self.state_dim)),
                             ("meta", (n, 3))):
            if getattr(chunk, field).shape != shape:
                raise ExportFormatError(f"{name}.{field}: expected shape {shape}, got {getattr(chunk, field).shape}")
        return chunk
