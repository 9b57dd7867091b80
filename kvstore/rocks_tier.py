"""The RocksDB tier: the source of truth, one column family per table.

rocksdict raises a bare `Exception` for RocksDB errors; every call here goes
through `_guard`, which turns them into `StorageError`, so nothing above this
module ever sees rocksdict's exceptions. Always raw mode: bytes in, bytes out.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import rocksdict as rd

from .config import RocksConfig
from .errors import KVStoreError, StorageError

META_FAMILY = "default"      # table configs live in the default column family
_TABLE_PREFIX = b"table/"
PARALLEL_GET_MIN = 2048      # batches at least this large are split across read threads
MIN_PART_KEYS = 1024         # smaller parts cost more in hand-off than they gain
GET_CHUNK = 4096             # keys per multi-get call for large batches: in bench/store_bench.py one
                             # call of 65,536 keys read about 5x slower per key than 4,096-key calls
_DB_PROPERTIES = {
    "block_cache_usage_bytes": "rocksdb.block-cache-usage",
    "block_cache_capacity_bytes": "rocksdb.block-cache-capacity",
}
_FAMILY_PROPERTIES = {
    "estimated_keys": "rocksdb.estimate-num-keys",
    "live_sst_bytes": "rocksdb.live-sst-files-size",
    "pending_compaction_bytes": "rocksdb.estimate-pending-compaction-bytes",
    "memtable_bytes": "rocksdb.size-all-mem-tables",
}


@contextlib.contextmanager
def _guard(what: str) -> Iterator[None]:
    try:
        yield
    except KVStoreError:
        raise
    except Exception as exc:  # rocksdict's only error type
        raise StorageError(f"rocksdb {what} failed: {exc}") from exc


class RocksTier:
    """Multi-get, write batches and column families over one RocksDB database."""

    def __init__(self, path: str, config: RocksConfig | None = None):
        self.path = path
        self.config = config or RocksConfig()
        with _guard("open"):
            os.makedirs(path, exist_ok=True)   # a regular file here is a StorageError too
        self._block_cache = rd.Cache(self.config.block_cache_bytes)
        self._lock = threading.Lock()          # guards column-family creation and drop
        self._readers = ThreadPoolExecutor(self.config.read_threads, thread_name_prefix="rocks-read")
        self._write_opts = rd.WriteOptions()
        self._write_opts.disable_wal = self.config.durability == "none"
        self._write_opts.sync = self.config.durability == "sync"
        with _guard("open"):
            existing = rd.Rdict.list_cf(path, self._options()) if os.path.exists(
                os.path.join(path, "CURRENT")
            ) else [META_FAMILY]
            # Column-family options must be passed on reopen too, or RocksDB
            # silently falls back to a small default block cache.
            families = {name: self._options() for name in existing if name != META_FAMILY}
            self._db = rd.Rdict(path, self._options(), column_families=families)
            self._db.set_write_options(self._write_opts)
        self._families = {name: self._db.get_column_family(name) for name in families}
        self._handles = {name: self._db.get_column_family_handle(name) for name in families}
        self.closed = False

    def _options(self) -> rd.Options:
        opts = rd.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        opts.set_max_background_jobs(self.config.max_background_jobs)
        opts.set_write_buffer_size(self.config.write_buffer_bytes)
        table = rd.BlockBasedOptions()
        table.set_block_cache(self._block_cache)
        table.set_bloom_filter(self.config.bloom_bits_per_key, False)
        table.set_cache_index_and_filter_blocks(True)
        opts.set_block_based_table_factory(table)
        return opts

    # --- column families -------------------------------------------------

    def families(self) -> list[str]:
        return sorted(self._families)

    def create_family(self, name: str) -> None:
        with self._lock, _guard(f"create column family {name!r}"):
            if name not in self._families:
                self._families[name] = self._db.create_column_family(name, self._options())
                self._handles[name] = self._db.get_column_family_handle(name)

    def drop_family(self, name: str) -> None:
        with self._lock, _guard(f"drop column family {name!r}"):
            if name in self._families:
                del self._families[name], self._handles[name]
                self._db.drop_column_family(name)

    # --- rows --------------------------------------------------------------

    def get(self, family: str, keys: list[bytes]) -> list[bytes | None]:
        """Multi-get in key order of `keys`; None for absent keys. Large batches use several threads."""
        cf = self._families[family]
        with _guard(f"multi-get on {family!r}"):
            if len(keys) < PARALLEL_GET_MIN:
                return cf.get(keys)
            parts = max(1, min(self.config.read_threads, len(keys) // MIN_PART_KEYS))
            step = min(-(-len(keys) // parts), GET_CHUNK)
            parts = [keys[i:i + step] for i in range(0, len(keys), step)]
            out: list[bytes | None] = []
            for part in (self._readers.map if self.config.read_threads > 1 else map)(cf.get, parts):
                out.extend(part)
            return out

    def write(self, family: str, keys: list[bytes], values: list[bytes] | None = None,
              delete: list[bytes] = ()) -> None:
        """One atomic write batch: puts of keys/values, then deletes."""
        if not keys and not delete:
            return
        handle = self._handles[family]
        with _guard(f"write batch on {family!r}"):
            batch = rd.WriteBatch(raw_mode=True)
            batch.set_default_column_family(handle)
            for key, value in zip(keys, values or (), strict=True):
                batch.put(key, value)
            for key in delete:
                batch.delete(key)
            self._db.write(batch)

    def iter_items(self, family: str) -> Iterator[tuple[bytes, bytes]]:
        with _guard(f"iterate {family!r}"):
            yield from self._families[family].items()

    def scan(self, family: str, start: bytes | None, limit: int) -> tuple[list[bytes], list[bytes]]:
        """Up to `limit` items in key order from `start` (inclusive; None: the first key).
        Each call opens a fresh iterator, so a slow scan never pins old data."""
        cf = self._families[family]
        with _guard(f"scan {family!r}"):
            options = rd.ReadOptions()
            options.fill_cache(False)          # a scan must not push hot blocks out of the block cache
            items = cf.items(read_opt=options) if start is None else cf.items(from_key=start, read_opt=options)
            chunk = list(itertools.islice(items, limit))
        if not chunk:
            return [], []
        keys, values = zip(*chunk, strict=True)
        return list(keys), list(values)

    def count_keys(self, family: str) -> int:
        with _guard(f"count keys of {family!r}"):
            return sum(1 for _ in self._families[family].keys())

    def live_bytes(self, family: str) -> int:
        with _guard("read property"):
            return int(self._families[family].property_int_value("rocksdb.live-sst-files-size") or 0)

    def estimate_rows(self, family: str) -> int:
        with _guard("read property"):
            return int(self._families[family].property_int_value("rocksdb.estimate-num-keys") or 0)

    def properties(self) -> dict[str, dict[str, int]]:
        """RocksDB's own gauges, for monitoring: database-wide under "" (the block cache is
        shared by every table), and per table under its name. Empty once closed."""
        if self.closed:
            return {}
        with _guard("read properties"):
            out = {"": {key: int(self._db.property_int_value(prop) or 0) for key, prop in _DB_PROPERTIES.items()}}
            for name, cf in list(self._families.items()):
                out[name] = {key: int(cf.property_int_value(prop) or 0) for key, prop in _FAMILY_PROPERTIES.items()}
            return out

    # --- table configs -----------------------------------------------------

    def load_configs(self) -> dict[str, bytes]:
        with _guard("read table configs"):
            return {
                key[len(_TABLE_PREFIX):].decode(): value
                for key, value in self._db.items(from_key=_TABLE_PREFIX)
                if key.startswith(_TABLE_PREFIX)
            }

    def save_config(self, name: str, blob: bytes | None) -> None:
        with _guard("write table config"):
            key = _TABLE_PREFIX + name.encode()
            if blob is None:
                self._db.delete(key)
            else:
                self._db.put(key, blob)

    # --- snapshots and bulk loads -------------------------------------------

    def checkpoint(self, path: str) -> None:
        """A consistent copy of the whole database at `path` (hard links to SST files)."""
        with _guard(f"checkpoint to {path!r}"):
            rd.Checkpoint(self._db).create_checkpoint(path)

    def consistent_items(self, family: str):
        """An iterator over one table's (key, value) pairs in key order, as they are now: later
        writes and ingests do not show. The RocksDB iterator is created here and pins its own
        implicit snapshot (rocksdict's `Snapshot.items` does not honour the snapshot)."""
        opts = rd.ReadOptions()
        opts.fill_cache(False)                 # a full scan must not evict the hot blocks
        opts.set_readahead_size(2 << 20)
        with _guard(f"iterate {family!r}"):
            return self._families[family].items(read_opt=opts)

    @staticmethod
    def batches(items, rows: int) -> Iterator[list[tuple[bytes, bytes]]]:
        """Lists of up to `rows` (key, value) pairs from `consistent_items` (no Python loop per row)."""
        while True:
            with _guard("iterate"):
                batch = list(itertools.islice(items, rows))
            if not batch:
                return
            yield batch

    def put_sst(self, writer: rd.SstFileWriter, keys: list[bytes], values: list[bytes]) -> None:
        """Add sorted pairs to an SST file writer."""
        with _guard("write SST file"):
            collections.deque(map(writer.__setitem__, keys, values), maxlen=0)

    def sst_writer(self, path: str) -> rd.SstFileWriter:
        """An SST file writer for `ingest`; keys must be added in increasing order."""
        with _guard(f"open SST file {path!r}"):
            writer = rd.SstFileWriter(self._options())
            writer.open(path)
            return writer

    def ingest(self, family: str, paths: list[str]) -> None:
        """Atomically add SST files to a table (moved, not copied); later files win on overlap."""
        opts = rd.IngestExternalFileOptions()
        opts.set_move_files(True)
        with _guard(f"ingest into {family!r}"):
            self._families[family].ingest_external_file(paths, opts)

    def delete_all(self, family: str) -> None:
        """Remove every row of a table (one range tombstone)."""
        with _guard(f"delete range in {family!r}"):
            self._families[family].delete_range(b"", b"\xff" * 9)

    # --- lifecycle ---------------------------------------------------------

    def flush(self) -> None:
        """Flush the memtables of every column family (rocksdict's `flush` covers only one)."""
        with _guard("flush"):
            self._db.flush()
            for family in list(self._families.values()):
                family.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._readers.shutdown(wait=True)
        with _guard("close"):
            self._families.clear()
            self._handles.clear()
            self._db.close()
