"""The RocksDB tier: the source of truth, one column family per table.

rocksdict raises a bare `Exception` for RocksDB errors; every call here goes
through `_guard`, which turns them into `StorageError`, so nothing above this
module ever sees rocksdict's exceptions. Always raw mode: bytes in, bytes out.

After a write error (a full disk) RocksDB keeps refusing writes until the
database is opened again: `reopen` does that in place, once no call is using
the old handle; calls arriving meanwhile wait. Table configs and the column
family of each table are written with a synced WAL whatever `durability`
says, so a table never vanishes or comes back after a crash.
"""
from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import operator
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import rocksdict as rd

from .config import RocksConfig
from .errors import KVStoreError, NotFound, StorageError
from .thread_names import name_this_thread
from .transfer_worker import check_ended

META_FAMILY = "default"      # table configs live in the default column family
_TABLE_PREFIX = b"table/"
_FAMILY_PREFIX = b"family/"  # table name -> its column family (one per incarnation of the name)
_PROBE_KEY = b"probe"
_COUNT_PREFIX = b"rows/"     # column family -> its table's row count at the last flush
PARALLEL_GET_MIN = 2048      # batches at least this large are split across read threads
MIN_PART_KEYS = 1024         # smaller parts cost more in hand-off than they gain
GET_CHUNK = 4096             # keys per multi-get call for large batches: in bench/store_bench.py one
                             # call of 65,536 keys read about 5x slower per key than 4,096-key calls
REOPEN_SPARE_BYTES = 1 << 20   # room a reopen needs beyond one memtable's worth
MEMTABLE_BLOOM_RATIO = 0.01  # a whole-key bloom filter in each memtable, this share of its size (0.64 MiB
                             # at 64 MiB, about 24 bits a 288-byte row; allocated with a table's first
                             # write): a read of a key the memtable lacks skips its skip-list search.
                             # Reads of new ids (every lookup that creates rows) cost about 5x less and
                             # reads of older rows about a quarter less (docs/benchmarks.md)
_DB_PROPERTIES = {
    "block_cache_usage_bytes": "rocksdb.block-cache-usage",
    "block_cache_capacity_bytes": "rocksdb.block-cache-capacity",
}
_FAMILY_PROPERTIES = {
    "estimated_keys": "rocksdb.estimate-num-keys",
    "live_sst_bytes": "rocksdb.live-sst-files-size",
    "pending_compaction_bytes": "rocksdb.estimate-pending-compaction-bytes",
    "memtable_bytes": "rocksdb.size-all-mem-tables",
    "level0_files": "rocksdb.num-files-at-level0",          # many: RocksDB slows writes, then stops them
    "running_compactions": "rocksdb.num-running-compactions",
}


def _pack(cf: rd.Rdict, keys: list[bytes], out: np.ndarray) -> np.ndarray:
    """One multi-get into `out`'s rows: the found values joined once (a C loop, no list of them)
    and copied in with one assignment; returns the found mask."""
    values = cf.get(keys)
    found = np.fromiter(map(operator.is_not, values, itertools.repeat(None)), dtype=bool, count=len(values))
    count = int(np.count_nonzero(found))
    if not count:
        return found
    whole = count == len(values)
    packed = b"".join(values if whole else itertools.compress(values, found))
    if len(packed) != count * out.shape[1]:
        raise StorageError(f"stored rows have an unexpected size (expected {out.shape[1]} bytes each)")
    rows = np.frombuffer(packed, dtype=np.uint8).reshape(count, out.shape[1])
    if whole:
        out[:] = rows
    else:
        out[found] = rows
    return found


class FamilyNotFound(NotFound):
    """A write or read of a column family that was dropped (its table is gone)."""

    reason = "table_not_found"


_failures = 0                    # RocksDB calls that failed in this process (approximate under threads)


@contextlib.contextmanager
def _guard(what: str) -> Iterator[None]:
    try:
        yield
    except KVStoreError:
        raise
    except Exception as exc:  # rocksdict's only error type
        global _failures
        _failures += 1
        raise StorageError(f"rocksdb {what} failed: {exc}") from exc


def _scan_options() -> rd.ReadOptions:
    """Options of an iterator over a table: blocks checked (whatever `verify_checksums` says of
    point reads), and not put in the block cache, whose hot blocks a scan would push out."""
    options = rd.ReadOptions()
    options.fill_cache(False)
    return options


class RocksTier:
    """Multi-get, write batches and column families over one RocksDB database."""

    def __init__(self, path: str, config: RocksConfig | None = None):
        self.path = path
        self.config = config or RocksConfig()
        with _guard("open"):
            os.makedirs(path, exist_ok=True)   # a regular file here is a StorageError too
        self._block_cache = rd.Cache(self.config.block_cache_bytes)
        # RocksDB fills the row cache on every point read, whatever ReadOptions.fill_cache says
        # (so `hold_above` cannot keep cached tables' reads out of it); iterators never use it
        self._row_cache = rd.Cache(self.config.row_cache_bytes) if self.config.row_cache_bytes else None
        self._lock = threading.Lock()          # guards column-family creation and drop
        self._readers = ThreadPoolExecutor(self.config.read_threads, thread_name_prefix="rocks-read",
                                           initializer=name_this_thread)
        self._write_opts = rd.WriteOptions()
        self._write_opts.disable_wal = self.config.durability == "none"
        self._write_opts.sync = self.config.durability == "sync"
        self._meta_opts = rd.WriteOptions()
        self._meta_opts.sync = True            # configs and families: always durable
        self._users = threading.Condition()    # calls using the handle; `reopen` waits for none
        self._active = 0
        self._reopening = False
        self.reopens = 0
        self.rows_read = 0                     # keys asked of `get` (approximate under concurrent calls)
        self.labels: dict[str, str] = {}      # column family -> the table name gauges are reported under
        self._held_above: dict[str, int] = {}  # column family -> rows of the cache above it (`hold_above`)
        self._skipping: dict[str, rd.Rdict] = {}  # column family -> a handle whose reads skip the block cache
        self._point_reads = rd.ReadOptions()  # the read options of `get` and `read_rows`
        self._point_reads.set_verify_checksums(self.config.verify_checksums)
        self._skip_block_cache = rd.ReadOptions()
        self._skip_block_cache.fill_cache(False)
        self._skip_block_cache.set_verify_checksums(self.config.verify_checksums)
        self.closed = False
        self._open()

    def _open(self) -> None:
        self._failures_at_open = _failures
        with _guard("open"):
            existing = rd.Rdict.list_cf(self.path, self._options()) if os.path.exists(
                os.path.join(self.path, "CURRENT")
            ) else [META_FAMILY]
            # Column-family options must be passed on reopen too, or RocksDB
            # silently falls back to a small default block cache.
            families = {name: self._options() for name in existing if name != META_FAMILY}
            self._db = rd.Rdict(self.path, self._options(), column_families=families)
            self._db.set_write_options(self._write_opts)
        self._families = {name: self._point_reader(name) for name in families}
        self._handles = {name: self._db.get_column_family_handle(name) for name in families}
        self._skipping = {name: self._skipping_handle(name) for name in self._held_above if name in families}

    @contextlib.contextmanager
    def _use(self) -> Iterator[None]:
        """Mark a call as using the database handle (a `reopen` waits until none is)."""
        with self._users:
            while self._reopening:
                self._users.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._users:
                self._active -= 1
                if not self._active:
                    self._users.notify_all()

    def has_room(self) -> bool:
        """Whether the disk has room to reopen the database (a new WAL and MANIFEST, and a flush
        of the memtable recovered from the WAL): reopening a database on a still-full disk would
        fail and leave nothing open to read from."""
        try:
            stat = os.statvfs(self.path)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize >= self.config.write_buffer_bytes + REOPEN_SPARE_BYTES

    def reopen(self) -> None:
        """Close and open the database again (RocksDB refuses writes after an I/O error until
        then). Raises StorageError while it still cannot open; the old handle is gone either way."""
        with self._users:
            self._reopening = True
            while self._active:
                self._users.wait()
        try:
            with self._lock:
                old, self._db = self._db, None
                self._families, self._handles, self._skipping = {}, {}, {}
                try:
                    old.close()
                except Exception:  # noqa: BLE001 - the error that made us reopen; nothing to save
                    pass
                del old
                self._let_go()
                self._open()
                self.reopens += 1
        finally:
            with self._users:
                self._reopening = False
                self._users.notify_all()

    def _let_go(self) -> None:
        """Free what failed calls left in reference cycles before the database closes. With
        Python 3.12 a failed call's frames (holding a column family handle, so the database and
        its LOCK file) stay in a cycle until the garbage collector runs: opening the database
        again in this process then failed with "lock hold by current process". Only after a
        failure since this opening: a collection costs time."""
        if _failures != self._failures_at_open:
            gc.collect()

    def _options(self) -> rd.Options:
        opts = rd.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        opts.set_max_background_jobs(self.config.max_background_jobs)
        opts.set_write_buffer_size(self.config.write_buffer_bytes)
        opts.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO)
        opts.set_memtable_whole_key_filtering(True)
        table = rd.BlockBasedOptions()
        table.set_block_cache(self._block_cache)
        table.set_bloom_filter(self.config.bloom_bits_per_key, False)
        table.set_cache_index_and_filter_blocks(True)
        opts.set_block_based_table_factory(table)
        opts.set_compression_type(getattr(rd.DBCompressionType, self.config.compression)())
        opts.set_allow_mmap_reads(self.config.mmap_reads)
        if self._row_cache is not None:
            opts.set_row_cache(self._row_cache)
        return opts

    # --- column families -------------------------------------------------

    def _family(self, name: str) -> rd.Rdict:
        try:
            return self._families[name]
        except KeyError:
            raise self._missing(name) from None

    def _handle(self, name: str):
        try:
            return self._handles[name]
        except KeyError:
            raise self._missing(name) from None

    def _missing(self, name: str) -> KVStoreError:
        if self._db is None:
            return StorageError("rocksdb: the database could not be reopened yet")
        return FamilyNotFound(f"table: column family {name!r} does not exist (dropped)")

    def has_family(self, name: str) -> bool:
        return name in self._families

    def families(self) -> list[str]:
        return sorted(self._families)

    def create_family(self, name: str) -> None:
        with self._use(), self._lock, _guard(f"create column family {name!r}"):
            if name not in self._families:
                self._db.create_column_family(name, self._options())
                self._families[name] = self._point_reader(name)
                self._handles[name] = self._db.get_column_family_handle(name)

    def drop_family(self, name: str) -> None:
        with self._use(), self._lock, _guard(f"drop column family {name!r}"):
            if name in self._families:
                del self._families[name], self._handles[name]
                self._held_above.pop(name, None)
                self._skipping.pop(name, None)
                self._db.drop_column_family(name)

    # --- rows --------------------------------------------------------------

    def hold_above(self, family: str, rows: int) -> None:
        """A cache of `rows` rows sits above `family`. While the family has no more rows than
        that, the rows read land in that cache (all but the few whose set is full), so reads
        skip the block cache: its blocks would be a second copy of the cache's rows in memory.
        Once the family outgrows its cache, reads fill the block cache again."""
        with self._use(), self._lock, _guard(f"read options of {family!r}"):
            self._held_above[family] = rows
            self._skipping.pop(family, None)
            if family in self._families:
                self._skipping[family] = self._skipping_handle(family)

    def _point_reader(self, family: str) -> rd.Rdict:
        handle = self._db.get_column_family(family)
        handle.set_read_options(self._point_reads)
        return handle

    def _skipping_handle(self, family: str) -> rd.Rdict:
        # rocksdict's multi-get ignores a `read_opt` argument but honours a handle's preset
        # options: reads that skip the block cache go through a second handle of the family.
        handle = self._db.get_column_family(family)
        handle.set_read_options(self._skip_block_cache)
        return handle

    def _reader(self, family: str) -> rd.Rdict:
        cf = self._family(family)
        skipping = self._skipping.get(family)
        held = self._held_above.get(family, 0)
        if skipping is not None and int(cf.property_int_value("rocksdb.estimate-num-keys") or 0) <= held:
            return skipping
        return cf

    def get(self, family: str, keys: list[bytes]) -> list[bytes | None]:
        """Multi-get in key order of `keys`; None for absent keys. Large batches use several threads."""
        with self._use(), _guard(f"multi-get on {family!r}"):
            cf = self._reader(family)
            self.rows_read += len(keys)
            if len(keys) < PARALLEL_GET_MIN:
                return cf.get(keys)
            out: list[bytes | None] = []
            for part in self._map(cf.get, self._parts(keys)):
                out.extend(part)
            return out

    def read_rows(self, family: str, keys: list[bytes], out: np.ndarray) -> np.ndarray:
        """Multi-get of fixed-width values straight into the rows of `out` ([len(keys), width]
        uint8; rows of absent keys are left as they are); returns the mask of keys found. Each
        read thread packs its own part (one join, one copy into `out`), so no list of all the
        values is ever built and the packing overlaps the other threads' reads."""
        if out.shape[0] != len(keys):
            raise ValueError(f"read_rows: {len(keys)} keys for {out.shape[0]} rows")
        with self._use(), _guard(f"multi-get on {family!r}"):
            cf = self._reader(family)
            self.rows_read += len(keys)
            if len(keys) < PARALLEL_GET_MIN:
                return _pack(cf, keys, out)
            step = self._step(len(keys))
            found = self._map(lambda lo: _pack(cf, keys[lo:lo + step], out[lo:lo + step]),
                              range(0, len(keys), step))
            return np.concatenate(list(found))

    def _step(self, n: int) -> int:
        """Keys per multi-get call when a batch of `n` keys is split across the read threads."""
        parts = max(1, min(self.config.read_threads, n // MIN_PART_KEYS))
        return min(-(-n // parts), GET_CHUNK)

    def _parts(self, keys: list[bytes]) -> list[list[bytes]]:
        step = self._step(len(keys))
        return [keys[i:i + step] for i in range(0, len(keys), step)]

    def _map(self, fn, parts):
        return (self._readers.map if self.config.read_threads > 1 else map)(fn, parts)

    def write(self, family: str, keys: list[bytes], values: list[bytes] | None = None,
              delete: list[bytes] = ()) -> None:
        """One atomic write batch: puts of keys/values, then deletes."""
        if not keys and not delete:
            return
        with self._use():
            error = self._write(family, keys, values, delete)
        if error is not None:      # raised out here: no frame of the error holds a database handle
            raise StorageError(f"rocksdb write batch on {family!r} failed: {error}")

    def _write(self, family, keys, values, delete) -> str | None:
        handle = self._handle(family)
        try:
            batch = rd.WriteBatch(raw_mode=True)
            batch.set_default_column_family(handle)
            # map/starmap drained by a zero-length deque: the puts run from C, no Python frame per row
            collections.deque(itertools.starmap(batch.put, zip(keys, values or (), strict=True)), maxlen=0)
            collections.deque(map(batch.delete, delete), maxlen=0)
            self._db.write(batch)
        except Exception as exc:  # noqa: BLE001 - rocksdict's only error type; a reopen needs the handle gone
            return str(exc)
        return None

    def iter_items(self, family: str) -> Iterator[tuple[bytes, bytes]]:
        with self._use(), _guard(f"iterate {family!r}"):
            cf, last = self._family(family), None
            for key, value in cf.items(read_opt=_scan_options()):
                yield key, value
                last = key
            check_ended(cf, _scan_options(), last)

    def scan(self, family: str, start: bytes | None, limit: int) -> tuple[list[bytes], list[bytes]]:
        """Up to `limit` items in key order from `start` (inclusive; None: the first key).
        Each call opens a fresh iterator, so a slow scan never pins old data."""
        with self._use(), _guard(f"scan {family!r}"):
            cf = self._family(family)
            options = _scan_options()
            items = cf.items(read_opt=options) if start is None else cf.items(from_key=start, read_opt=options)
            chunk = list(itertools.islice(items, limit))
            if len(chunk) < limit:                 # the end of the table, or an error rocksdict kept quiet
                check_ended(cf, options, chunk[-1][0] if chunk else None, start)
        if not chunk:
            return [], []
        keys, values = zip(*chunk, strict=True)
        return list(keys), list(values)

    def is_empty(self, family: str) -> bool:
        """Whether the family holds no key (memtables included): one iterator step."""
        with self._use(), _guard(f"look into {family!r}"):
            cf = self._family(family)
            if next(iter(cf.keys(read_opt=_scan_options())), None) is not None:
                return False
            check_ended(cf, _scan_options(), None)
            return True

    def count_keys(self, family: str) -> int:
        with self._use(), _guard(f"count keys of {family!r}"):
            cf, count, last = self._family(family), 0, None
            for key in cf.keys(read_opt=_scan_options()):
                count, last = count + 1, key
            check_ended(cf, _scan_options(), last)
            return count

    def count_keys_in(self, family: str, bounds: list[tuple[bytes, bytes]]) -> int:
        """Keys k with lo <= k <= hi for each (lo, hi) of `bounds` (disjoint): a scan of those key
        ranges only, not of the family."""
        with self._use(), _guard(f"count keys of {family!r}"):
            cf, total = self._family(family), 0
            for lo, hi in bounds:
                last = None
                for key in itertools.takewhile(lambda key, hi=hi: key <= hi,
                                               cf.keys(from_key=lo, read_opt=_scan_options())):
                    total, last = total + 1, key
                check_ended(cf, _scan_options(), last, lo)
            return total

    def live_bytes(self, family: str) -> int:
        with self._use(), _guard("read property"):
            return int(self._family(family).property_int_value("rocksdb.live-sst-files-size") or 0)

    def estimate_rows(self, family: str) -> int:
        with self._use(), _guard("read property"):
            return int(self._family(family).property_int_value("rocksdb.estimate-num-keys") or 0)

    def properties(self) -> dict[str, dict[str, int]]:
        """RocksDB's own gauges, for monitoring: database-wide under "" (the block cache is
        shared by every table), and per table under its name (`labels`). Empty once closed."""
        if self.closed:
            return {}
        with self._use(), _guard("read properties"):
            out = {"": {key: int(self._db.property_int_value(prop) or 0) for key, prop in _DB_PROPERTIES.items()}}
            if self._row_cache is not None:
                out[""]["row_cache_usage_bytes"] = int(self._row_cache.get_usage())
            for name, cf in list(self._families.items()):
                out[self.labels.get(name, name)] = {
                    key: int(cf.property_int_value(prop) or 0) for key, prop in _FAMILY_PROPERTIES.items()}
            return out

    # --- table configs -----------------------------------------------------

    def load_configs(self) -> dict[str, bytes]:
        return self._load_meta(_TABLE_PREFIX)

    def load_families(self) -> dict[str, str]:
        """Table name -> its column family (tables created before families had incarnations
        have none here: their family is their name)."""
        return {name: value.decode() for name, value in self._load_meta(_FAMILY_PREFIX).items()}

    def _load_meta(self, prefix: bytes) -> dict[str, bytes]:
        with self._use(), _guard("read table configs"):
            return {
                key[len(prefix):].decode(): value
                for key, value in self._db.items(from_key=prefix)
                if key.startswith(prefix)
            }

    def save_config(self, name: str, blob: bytes | None, family: str | None = None) -> None:
        """Write (or with None, remove) a table's config and its column family's name in one
        synced batch: after a crash the table exists with its family, or not at all."""
        with self._use(), _guard("write table config"):
            batch = rd.WriteBatch(raw_mode=True)
            key = _TABLE_PREFIX + name.encode()
            family_key = _FAMILY_PREFIX + name.encode()
            if blob is None:
                batch.delete(key)
                batch.delete(family_key)
            else:
                batch.put(key, blob)
                if family is not None:
                    batch.put(family_key, family.encode())
            self._db.write(batch, self._meta_opts)

    def save_row_count(self, family: str, rows: int) -> None:
        """Persist a table's row count (read back on open instead of counting keys)."""
        with self._use(), _guard("write row count"):
            self._db.put(_COUNT_PREFIX + family.encode(), str(int(rows)).encode())

    def load_row_count(self, family: str) -> int | None:
        with self._use(), _guard("read row count"):
            value = self._db.get(_COUNT_PREFIX + family.encode())
        return None if value is None else int(value)

    def probe_write(self) -> None:
        """One small synced write: proves the database takes writes again after a fault."""
        with self._use(), _guard("write"):
            self._db.put(_PROBE_KEY, b"1", self._meta_opts)

    # --- snapshots and bulk loads -------------------------------------------

    def checkpoint(self, path: str) -> None:
        """A consistent copy of the whole database at `path` (hard links to SST files)."""
        with self._use(), _guard(f"checkpoint to {path!r}"):
            rd.Checkpoint(self._db).create_checkpoint(path)

    def put_sst(self, writer: rd.SstFileWriter, keys: list[bytes], values: list[bytes]) -> None:
        """Add sorted pairs to an SST file writer."""
        with self._use(), _guard("write SST file"):
            collections.deque(map(writer.__setitem__, keys, values), maxlen=0)

    def sst_writer(self, path: str) -> rd.SstFileWriter:
        """An SST file writer for `ingest`; keys must be added in increasing order."""
        with self._use(), _guard(f"open SST file {path!r}"):
            writer = rd.SstFileWriter(self._options())
            writer.open(path)
            return writer

    def ingest(self, family: str, paths: list[str]) -> None:
        """Atomically add SST files to a table (moved, not copied); later files win on overlap."""
        opts = rd.IngestExternalFileOptions()
        opts.set_move_files(True)
        with self._use(), _guard(f"ingest into {family!r}"):
            self._family(family).ingest_external_file(paths, opts)

    def delete_all(self, family: str) -> None:
        """Remove every row of a table (one range tombstone)."""
        with self._use(), _guard(f"delete range in {family!r}"):
            self._family(family).delete_range(b"", b"\xff" * 9)

    # --- lifecycle ---------------------------------------------------------

    def flush(self) -> None:
        """Flush the memtables of every column family (rocksdict's `flush` covers only one). A family
        dropped meanwhile (its table dropped during a snapshot) has nothing left to flush."""
        with self._use(), _guard("flush"):
            self._db.flush()
            for family in list(self._families.values()):
                try:
                    family.flush()
                except Exception as exc:                 # rocksdict raises bare Exception
                    if "Column family dropped" not in str(exc):
                        raise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._readers.shutdown(wait=True)
        with self._use(), _guard("close"):
            self._families.clear()
            self._handles.clear()
            self._skipping.clear()
            self._let_go()
            self._db.close()
