"""The export directory format: round trips, and every kind of damage is a clear error."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import zlib

import ml_dtypes
import numpy as np
import pytest
from kvstore_proto import direct_files
from kvstore_proto.export_format import ExportFormatError, ExportReader, ExportWriter

from kvstore import CacheConfig, OptimizerConfig, Store, TableConfig

WEIGHT_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": ml_dtypes.bfloat16}


def write_export(path: str, dtype: str = "float32", chunks: int = 3, rows: int = 100, file_bytes: int = 4096):
    writer = ExportWriter(path, {"name": "t"}, dim=4, dtype=dtype, state_dim=2, file_bytes=file_bytes)
    rng = np.random.default_rng(0)
    written = []
    for c in range(chunks):
        ids = np.arange(c * rows, (c + 1) * rows) * 3 - 50
        weights = rng.standard_normal((rows, 4)).astype(WEIGHT_DTYPES[dtype])
        state = rng.random((rows, 2)).astype(np.float32)
        meta = rng.integers(0, 2**32, (rows, 3), dtype=np.uint64).astype(np.uint32)
        writer.write(ids, weights, state, meta)
        written.append((ids, weights, state, meta))
    writer.close()
    return [np.concatenate([w[i] for w in written]) for i in range(4)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_round_trip_is_bit_exact_across_several_files(tmp_path, dtype):
    path = str(tmp_path / "exp")
    expected = write_export(path, dtype)
    reader = ExportReader(path)
    assert reader.rows == 300 and reader.dtype == dtype and reader.manifest["sorted"]
    assert len(reader.manifest["chunks"]) > 1
    chunks = list(reader)
    for i, field in enumerate(("ids", "weights", "state", "meta")):
        got = np.concatenate([getattr(c, field) for c in chunks])
        assert got.dtype == expected[i].dtype and got.tobytes() == expected[i].tobytes(), field


def test_corrupt_chunk_is_a_checksum_error(tmp_path):
    path = str(tmp_path / "exp")
    write_export(path)
    chunk = os.path.join(path, "chunk-000001.npz")
    with open(chunk, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ExportFormatError, match="chunk-000001.npz: checksum"):
        list(ExportReader(path))


def damage(path: str, name: str, at: int = 200) -> None:
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(at)
        f.write(b"\x00\x01\x02")


def test_streamed_chunks_are_the_chunks_of_iter(tmp_path):
    path = str(tmp_path / "exp")
    expected = write_export(path)
    chunks = list(ExportReader(path).streamed())
    for i, field in enumerate(("ids", "weights", "state", "meta")):
        assert np.concatenate([getattr(c, field) for c in chunks]).tobytes() == expected[i].tobytes(), field


@pytest.mark.parametrize("damaged", [0, 2])
def test_streamed_damage_is_a_checksum_error_before_the_iteration_ends(tmp_path, damaged):
    path = str(tmp_path / "exp")
    write_export(path)
    names = [entry["file"] for entry in ExportReader(path).manifest["chunks"]]
    damage(path, names[damaged])
    given = []
    with pytest.raises(ExportFormatError, match=f"{names[damaged]}: checksum"):
        for chunk in ExportReader(path).streamed():
            given.append(chunk)
    assert len(given) == damaged + 1            # found when the next chunk, or the end, is asked for


def test_streamed_damaged_layout_is_a_format_error_before_the_chunk_is_given(tmp_path):
    path = str(tmp_path / "exp")
    write_export(path)
    name = ExportReader(path).manifest["chunks"][1]["file"]
    damage(path, name, at=0)                     # the first member's local header
    given = []
    with pytest.raises(ExportFormatError, match=name):
        for chunk in ExportReader(path).streamed():
            given.append(chunk)
    assert len(given) == 1


def as_version_1(path: str) -> None:
    """Rewrite an export's manifest as format version 1 wrote it: the same chunk files, each
    checked by SHA-256 instead of CRC-32."""
    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path) as src:
        manifest = json.load(src)
    manifest["format_version"] = 1
    for entry in manifest["chunks"]:
        del entry["crc32"]
        with open(os.path.join(path, entry["file"]), "rb") as chunk:
            entry["sha256"] = hashlib.sha256(chunk.read()).hexdigest()
    with open(manifest_path, "w") as out:
        json.dump(manifest, out)


def test_export_is_version_2_with_a_crc32_per_chunk_file(tmp_path):
    path = str(tmp_path / "exp")
    write_export(path)
    manifest = ExportReader(path).manifest
    assert manifest["format_version"] == 2
    for entry in manifest["chunks"]:
        with open(os.path.join(path, entry["file"]), "rb") as chunk:
            data = chunk.read()
        assert entry["crc32"] == f"{zlib.crc32(data):08x}" and entry["bytes"] == len(data)


def test_version_1_exports_are_still_read_and_their_damage_found(tmp_path):
    path = str(tmp_path / "exp")
    expected = write_export(path)
    as_version_1(path)
    chunks = list(ExportReader(path))
    assert np.concatenate([c.weights for c in chunks]).tobytes() == expected[1].tobytes()
    with open(os.path.join(path, "chunk-000000.npz"), "r+b") as f:
        f.seek(300)
        byte = f.read(1)[0]
        f.seek(300)
        f.write(bytes([byte ^ 1]))
    with pytest.raises(ExportFormatError, match="chunk-000000.npz: checksum"):
        list(ExportReader(path))


def test_incomplete_or_foreign_directories_are_rejected(tmp_path):
    with pytest.raises(ExportFormatError, match="manifest.json"):
        ExportReader(str(tmp_path))
    path = str(tmp_path / "exp")
    write_export(path)
    manifest_path = tmp_path / "exp" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ExportFormatError, match="format_version"):
        ExportReader(path)
    with pytest.raises(FileExistsError):
        ExportWriter(path, {}, 4, "float32", 2)


def test_unsorted_writes_are_marked_unsorted(tmp_path):
    writer = ExportWriter(str(tmp_path / "exp"), {}, 1, "float32", 0)
    writer.write([5, 6], np.ones((2, 1)), np.ones((2, 0)), np.zeros((2, 3)))
    writer.write([1], np.ones((1, 1)), np.ones((1, 0)), np.zeros((1, 3)))
    assert writer.close()["sorted"] is False


def test_store_to_directory_to_another_store_is_bit_exact(tmp_path):
    config = TableConfig(name="t", dim=8, dtype="bfloat16", optimizer=OptimizerConfig(name="adam"),
                         cache=CacheConfig(rows=64, ways=4))
    ids = np.arange(3000) * 11
    with Store(str(tmp_path / "a")) as a:
        a.create_table(config)
        a.update("t", ids, np.random.default_rng(1).standard_normal((3000, 8)), np.ones((3000, 16)))
        export = a.export_table("t", chunk_rows=700)
        writer = ExportWriter(str(tmp_path / "exp"), config.to_dict(), 8, "bfloat16", 16, file_bytes=50_000)
        for chunk in export:
            writer.write(chunk.ids, chunk.weights, chunk.state, chunk.meta)
        writer.close()
        original = a.lookup("t", ids, on_miss="error", with_state=True)
    with Store(str(tmp_path / "b")) as b:
        reader = ExportReader(str(tmp_path / "exp"))
        b.create_table(TableConfig.from_dict(reader.table))
        b.import_table("t", ((c.ids, c.weights, c.state, c.meta) for c in reader), mode="replace")
        copy = b.lookup("t", ids, on_miss="error", with_state=True)
    assert copy.weights.tobytes() == original.weights.tobytes()
    assert copy.state.tobytes() == original.state.tobytes()


def chunk_files(path: str) -> dict[str, bytes]:
    names = sorted(n for n in os.listdir(path) if n.startswith("chunk-"))
    return {n: open(os.path.join(path, n), "rb").read() for n in names}


def test_files_written_past_the_page_cache_hold_the_bytes_of_buffered_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_files, "BUFFER_BYTES", 8192)       # files of several buffers and a part one
    write_export(str(tmp_path / "direct"), rows=700, file_bytes=20_000)
    monkeypatch.setattr(direct_files, "_O_DIRECT", 0)
    write_export(str(tmp_path / "buffered"), rows=700, file_bytes=20_000)
    direct, buffered = chunk_files(str(tmp_path / "direct")), chunk_files(str(tmp_path / "buffered"))
    assert len(direct) > 1 and direct == buffered
    assert any(len(data) % direct_files.ALIGN for data in direct.values())     # the tails were cut back
    assert ExportReader(str(tmp_path / "direct")).manifest["chunks"] == \
        ExportReader(str(tmp_path / "buffered")).manifest["chunks"]


def test_a_file_system_refusing_direct_writes_gets_the_same_bytes_through_the_page_cache(tmp_path, monkeypatch):
    write_export(str(tmp_path / "expected"), rows=700, file_bytes=20_000)
    write = os.write
    refused = []

    def refuse_direct(fd, data):
        if direct_files._O_DIRECT and os.get_blocking(fd) and \
                direct_files.fcntl.fcntl(fd, direct_files.fcntl.F_GETFL) & direct_files._O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return write(fd, data)

    monkeypatch.setattr(direct_files.os, "write", refuse_direct)
    write_export(str(tmp_path / "refused"), rows=700, file_bytes=20_000)
    assert refused or not direct_files._O_DIRECT
    assert chunk_files(str(tmp_path / "refused")) == chunk_files(str(tmp_path / "expected"))
    assert len(list(ExportReader(str(tmp_path / "refused")))) == len(chunk_files(str(tmp_path / "expected")))
