"""The RocksDB tier: multi-get, write batches, column families, key order, errors."""
from __future__ import annotations

import os

import numpy as np
import pytest

from kvstore import InvalidArgument, RocksConfig, StorageError
from kvstore.rocks_tier import PARALLEL_GET_MIN, RocksTier
from kvstore.rows import decode_keys, encode_keys


@pytest.fixture
def tier(tmp_path):
    opened = RocksTier(str(tmp_path / "db"))
    opened.create_family("rows")
    yield opened
    opened.close()


def test_multi_get_returns_none_for_absent_keys_in_request_order(tier):
    tier.write("rows", [b"a", b"c"], [b"1", b"3"])
    assert tier.get("rows", [b"c", b"b", b"a", b"zz", b"c"]) == [b"3", None, b"1", None, b"3"]


def test_write_batch_applies_puts_and_deletes_together(tier):
    tier.write("rows", [b"a", b"b", b"c"], [b"1", b"2", b"3"])
    tier.write("rows", [b"d", b"e"], [b"4", b"5"], delete=[b"a", b"e"])   # deletes follow puts
    assert tier.get("rows", [b"a", b"b", b"c", b"d", b"e"]) == [None, b"2", b"3", b"4", None]


def test_failed_write_batch_changes_nothing(tier):
    tier.write("rows", [b"a"], [b"1"])
    with pytest.raises(StorageError):
        tier.write("rows", [b"b", b"c"], [b"2", "not bytes"], delete=[b"a"])
    assert tier.get("rows", [b"a", b"b", b"c"]) == [b"1", None, None]


def test_column_families_and_their_rows_survive_reopen(tmp_path):
    path = str(tmp_path / "db")
    tier = RocksTier(path)
    for name in ("alpha", "beta"):
        tier.create_family(name)
        tier.write(name, [b"k"], [name.encode()])
    tier.save_config("alpha", b"{}")
    tier.close()
    tier = RocksTier(path)
    try:
        assert tier.families() == ["alpha", "beta"]
        assert tier.get("alpha", [b"k"]) == [b"alpha"]
        assert tier.get("beta", [b"k"]) == [b"beta"]
        assert tier.load_configs() == {"alpha": b"{}"}
    finally:
        tier.close()


def test_dropped_family_is_gone_after_reopen(tmp_path):
    path = str(tmp_path / "db")
    tier = RocksTier(path)
    tier.create_family("gone")
    tier.write("gone", [b"k"], [b"v"])
    tier.drop_family("gone")
    tier.close()
    tier = RocksTier(path)
    try:
        assert tier.families() == []
    finally:
        tier.close()


@pytest.mark.parametrize("threads", [1, 4])
def test_parallel_multi_get_matches_serial(tmp_path, threads):
    tier = RocksTier(str(tmp_path / "db"), RocksConfig(read_threads=threads))
    try:
        tier.create_family("rows")
        ids = np.arange(PARALLEL_GET_MIN * 2, dtype=np.int64)
        stored = ids[ids % 3 != 0]                     # every third key absent
        keys = encode_keys(stored)
        tier.write("rows", keys, [k * 4 for k in keys])
        request = encode_keys(np.random.default_rng(0).permutation(ids))
        assert len(request) > PARALLEL_GET_MIN
        parallel = tier.get("rows", request)
        serial = []
        for i in range(0, len(request), 1000):         # below the parallel threshold
            serial.extend(tier.get("rows", request[i:i + 1000]))
        assert parallel == serial
        assert sum(v is None for v in parallel) == len(ids) - len(stored)
        assert all(v is None or v == k * 4 for k, v in zip(request, parallel, strict=True))
    finally:
        tier.close()


def test_key_encoding_preserves_numeric_order_including_negative_ids(tier):
    info = np.iinfo(np.int64)
    ids = np.array([info.min, -(1 << 40), -256, -1, 0, 1, 255, 256, 1 << 40, info.max], dtype=np.int64)
    keys = encode_keys(ids)
    assert all(len(k) == 8 for k in keys)
    assert sorted(keys) == keys
    np.testing.assert_array_equal(decode_keys(keys), ids)
    shuffled = np.random.default_rng(1).permutation(ids)
    tier.write("rows", encode_keys(shuffled), [b"v"] * len(ids))
    np.testing.assert_array_equal(decode_keys([k for k, _ in tier.iter_items("rows")]), ids)


def test_open_on_a_regular_file_raises_storage_error(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_bytes(b"x")
    with pytest.raises(StorageError):
        RocksTier(str(path))


def test_open_on_a_corrupt_database_raises_storage_error(tmp_path):
    path = tmp_path / "db"
    path.mkdir()
    (path / "CURRENT").write_bytes(b"garbage")
    with pytest.raises(StorageError):
        RocksTier(str(path))


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("absent_every", [0, 3])
def test_read_rows_writes_found_values_in_request_order_and_leaves_absent_rows(tmp_path, threads, absent_every):
    tier = RocksTier(str(tmp_path / "db"), RocksConfig(read_threads=threads))
    try:
        tier.create_family("rows")
        ids = np.arange(PARALLEL_GET_MIN * 3, dtype=np.int64)
        stored = ids[ids % absent_every != 0] if absent_every else ids
        values = np.random.default_rng(0).integers(0, 256, (len(ids), 24), dtype=np.uint8)
        tier.write("rows", encode_keys(stored), [values[i].tobytes() for i in stored])
        for request in (np.random.default_rng(1).permutation(ids), ids[:100]):   # parallel, then one call
            out = np.full((len(request), 24), 7, dtype=np.uint8)
            found = tier.read_rows("rows", encode_keys(request), out)
            expected = np.isin(request, stored)
            np.testing.assert_array_equal(found, expected)
            np.testing.assert_array_equal(out[found], values[request[found]])
            assert (out[~found] == 7).all()
    finally:
        tier.close()


def test_read_rows_of_the_wrong_width_is_a_storage_error(tier):
    tier.write("rows", [b"a", b"b"], [b"12345678", b"1234567"])
    with pytest.raises(StorageError, match="unexpected size"):
        tier.read_rows("rows", [b"a", b"b"], np.zeros((2, 8), dtype=np.uint8))


def test_reads_through_a_row_cache_see_every_later_write_and_delete(tmp_path):
    tier = RocksTier(str(tmp_path / "db"), RocksConfig(row_cache_bytes=1 << 20))
    try:
        tier.create_family("rows")
        keys = encode_keys(np.arange(PARALLEL_GET_MIN * 2, dtype=np.int64))
        tier.write("rows", keys, [b"old-" + k for k in keys])
        tier.flush()                                   # rows in an SST file: the row cache applies
        out = np.zeros((len(keys), 12), dtype=np.uint8)
        assert tier.read_rows("rows", keys, out).all()
        assert tier.properties()[""]["row_cache_usage_bytes"] > 0
        tier.write("rows", keys[:10], [b"new-" + k for k in keys[:10]], delete=keys[10:20])
        assert tier.get("rows", keys[:20]) == [b"new-" + k for k in keys[:10]] + [None] * 10
        tier.flush()
        assert tier.get("rows", keys[:21]) == [b"new-" + k for k in keys[:10]] + [None] * 10 + [b"old-" + keys[20]]
    finally:
        tier.close()


@pytest.mark.parametrize("size", [-1, 1.5, "1"])
def test_row_cache_size_must_be_a_natural_number(size):
    with pytest.raises(InvalidArgument, match="rocksdb.row_cache_bytes"):
        RocksConfig(row_cache_bytes=size)


@pytest.mark.parametrize("compression", ["snappy", "lz4", "zstd"])
def test_compressed_files_are_smaller_than_uncompressed_ones_and_read_back_the_same(tmp_path, compression):
    keys = encode_keys(np.arange(20_000, dtype=np.int64))
    values = [bytes(512)] * len(keys)                  # zeros: any compression shrinks them
    sizes = {}
    for name in ("none", compression):
        tier = RocksTier(str(tmp_path / name), RocksConfig(compression=name))
        try:
            tier.create_family("rows")
            tier.write("rows", keys, values)
            tier.flush()
            sizes[name] = tier.properties()["rows"]["live_sst_bytes"]
            assert tier.get("rows", keys[::997]) == values[::997]
        finally:
            tier.close()
    assert sizes["none"] > len(keys) * 512 > 4 * sizes[compression]


@pytest.mark.parametrize("compression", ["", "gzip", None, 1])
def test_unknown_compression_is_invalid_argument_naming_it(compression):
    with pytest.raises(InvalidArgument, match="rocksdb.compression"):
        RocksConfig(compression=compression)


def _mapped_sst_files(path: str) -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[-1] for line in maps if line.rstrip().endswith(".sst") and path in line}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see mappings")
@pytest.mark.parametrize("mmap_reads", [True, False])
def test_mmap_reads_map_the_files_read_and_return_the_same_rows(tmp_path, mmap_reads):
    path = str(tmp_path / "db")
    keys = encode_keys(np.arange(PARALLEL_GET_MIN * 2, dtype=np.int64))
    tier = RocksTier(path, RocksConfig(mmap_reads=mmap_reads))
    try:
        tier.create_family("rows")
        tier.write("rows", keys, [b"row-" + k for k in keys])
        tier.flush()                                   # rows in an SST file, read from there
        out = np.zeros((len(keys), 12), dtype=np.uint8)
        assert tier.read_rows("rows", keys, out).all()
        assert [bytes(row) for row in out] == [b"row-" + k for k in keys]
        assert tier.get("rows", [keys[3], b"absent"]) == [b"row-" + keys[3], None]
        assert bool(_mapped_sst_files(path)) == mmap_reads
    finally:
        tier.close()


@pytest.mark.parametrize("value", [1, "yes", None])
def test_mmap_reads_must_be_a_boolean(value):
    with pytest.raises(InvalidArgument, match="rocksdb.mmap_reads"):
        RocksConfig(mmap_reads=value)


@pytest.mark.parametrize("value", [1, "no", None])
def test_verify_checksums_must_be_a_boolean(value):
    with pytest.raises(InvalidArgument, match="rocksdb.verify_checksums"):
        RocksConfig(verify_checksums=value)


@pytest.mark.parametrize("mmap_reads", [True, False])
def test_a_corrupted_row_fails_its_read_unless_checksums_are_off(tmp_path, mmap_reads):
    """What `rocksdb.verify_checksums` promises: on (the default), a point read of a block
    whose bytes changed on disk fails with a StorageError; off, it returns the changed bytes."""
    path, keys, changed = _one_corrupted_row(tmp_path)
    assert _reads_of(path, RocksConfig(mmap_reads=mmap_reads), keys[7]) == ("corrupt", "corrupt", "corrupt")
    # the same database again, in this process: a failed read must not keep it open (its LOCK).
    # Scans (export, sweeps) check the blocks whatever the option says of point reads
    assert _reads_of(path, RocksConfig(mmap_reads=mmap_reads, verify_checksums=False), keys[7]) == (
        changed, changed, "corrupt")


def test_a_tier_reopens_after_a_failed_read(tmp_path):
    """`reopen` (how the store recovers from RocksDB errors) works after a read failed: with
    Python 3.12 the failed call's frames held the database open until a garbage collection."""
    path, keys, _ = _one_corrupted_row(tmp_path)
    tier = RocksTier(path)
    try:
        assert _corrupt_or(lambda: tier.get("rows", [keys[7]])) == "corrupt"
        tier.reopen()
        assert tier.get("rows", [keys[63]]) == [bytes([63]) * 100]      # another block, after the reopen
    finally:
        tier.close()


def _one_corrupted_row(tmp_path) -> tuple[str, list[bytes], bytes]:
    """A database of 64 rows of 100 bytes (row i: byte i) in one SST file, one byte of row 7
    changed on disk: (its path, the keys, row 7 as it now reads)."""
    path = str(tmp_path / "db")
    keys = encode_keys(np.arange(64, dtype=np.int64))
    rows = [bytes([i]) * 100 for i in range(64)]
    _write_family(path, "rows", keys, rows)
    (sst,) = [os.path.join(path, name) for name in os.listdir(path) if name.endswith(".sst")]
    with open(sst, "r+b") as file:
        data = file.read()
        file.seek(data.index(rows[7]) + 50)
        file.write(b"\xff")
    return path, keys, rows[7][:50] + b"\xff" + rows[7][51:]


def _write_family(path: str, name: str, keys: list[bytes], values: list[bytes], compression: str = "none") -> None:
    """A database whose family `name` holds these rows in one SST file (compressed as rocksdict
    names it), written by rocksdict alone."""
    import rocksdict as rd

    options = rd.Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    options.set_compression_type(getattr(rd.DBCompressionType, compression)())
    db = rd.Rdict(path, options, column_families={name: options})
    family = db.get_column_family(name)
    for key, value in zip(keys, values, strict=True):
        family[key] = value
    family.flush()
    del family
    db.close()


def _reads_of(path: str, config: RocksConfig, key: bytes) -> tuple:
    """What `get`, `read_rows` and a scan give for `key` in a fresh tier: the row, or "corrupt"
    for a StorageError naming a corruption. The errors are not kept: a traceback holding a frame
    of the tier's would hold its database open."""
    tier = RocksTier(path, config)
    try:
        out = np.zeros((1, 100), dtype=np.uint8)
        # the scan first: it reads the block from the file (a point read may have cached it unchecked)
        scanned = _corrupt_or(lambda: dict(zip(*tier.scan("rows", None, 1000), strict=True))[key])
        return (_corrupt_or(lambda: tier.get("rows", [key])[0]),
                _corrupt_or(lambda: bytes(out[0]) if tier.read_rows("rows", [key], out).all() else None), scanned)
    finally:
        tier.close()


def _corrupt_or(read):
    try:
        return read()
    except StorageError as exc:
        message = str(exc).lower()
    return "corrupt" if "corrupt" in message or "checksum" in message else message


def test_rows_in_compressed_files_of_earlier_versions_still_read_and_take_writes(tmp_path):
    """Earlier versions wrote Snappy-compressed SST files; stored rows are now written
    uncompressed, and a database holding both kinds reads them all."""
    path = str(tmp_path / "db")
    keys = encode_keys(np.arange(-500, 500, dtype=np.int64))
    values = [bytes([i % 251]) * 64 for i in range(len(keys))]      # compressible: the files really are compressed
    _write_family(path, "rows", keys, values, compression="snappy")
    tier = RocksTier(path)
    try:
        assert tier.get("rows", keys) == values
        tier.write("rows", keys[:10], [b"new" * 20] * 10)
        tier.flush()
        assert tier.get("rows", keys[:12]) == [b"new" * 20] * 10 + values[10:12]
    finally:
        tier.close()
    reopened = RocksTier(path)
    try:
        assert reopened.get("rows", keys[8:]) == [b"new" * 20] * 2 + values[10:]
    finally:
        reopened.close()


def test_a_key_found_past_where_a_scan_stopped_is_not_an_error(tier):
    """A scan on a live table may stop before keys written meanwhile: the check of where it
    stopped raises only the iterator's error (a sweep racing writes failed when it raised more)."""
    import rocksdict as rd

    from kvstore.transfer_worker import check_ended

    tier.write("rows", [b"a", b"b"], [b"1", b"2"])
    check_ended(tier._family("rows"), rd.ReadOptions(), b"a")     # b came after a scan that ended at a
    check_ended(tier._family("rows"), rd.ReadOptions(), None, b"0")
    assert tier.scan("rows", b"a", 10) == ([b"a", b"b"], [b"1", b"2"])
