"""GPU cache tier: each figure beside its ceiling, measured in the same run on the same GPU.

    python bench/gpu_cache.py [--slots 10000000] [--batch 1048576] [--reps 30] [--align 16|32|64]
                               [--skip-e2e] [--skip-optimizers]

Ceilings: a large device-to-device copy (bytes read + written) for the memory-
bound kernels; for the fused steps also their own traffic with nothing computed
(native/bench_kernels.cu), the access pattern's ceiling on the same slots;
torch.index_select on the same slab for the gather; RocksDB
multi-get and the all-hit device path for the end-to-end lookup. Kernels are
timed with CUDA events after a warm-up, median of many reps, rotating among
several input sets so L2 does not flatter.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time

import cupy
import numpy as np
from kvstore_native import SOURCE_DIR

from kvstore import CacheConfig, OptimizerConfig, Store, TableConfig
from kvstore.gpu_cache import GpuCache, sum_duplicates
from kvstore.gpu_kernels import COPY_ROWS_IN_FLIGHT, OPTIMIZER_CODES
from kvstore.gpu_sources import OPTIONS
from kvstore.rows import RowLayout, encode_keys

ROTATE = 4
DIM = 128


def median_ms(fn, inputs, reps: int, warmup: int = 3, before=None, queued: bool = False) -> float:
    """Median time of fn(inputs[i % len(inputs)]) with CUDA events; `before` runs untimed.
    `queued`: each timed call waits behind about 1 ms of other device work, so its launches run
    back to back: its device time alone, without the wait for its first launch (what a caller
    whose host runs ahead of the device sees)."""
    for i in range(warmup):
        if before:
            before(i)
        fn(inputs[i % len(inputs)])
    times = []
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    for i in range(reps):
        if before:
            before(i)
        if queued:
            cupy.cuda.get_current_stream().synchronize()
            _spin(2_000_000)
        start.record()
        fn(inputs[i % len(inputs)])
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


_SPIN = None


def in_turns(call, caches: tuple, inputs, reps: int, rounds: int = 3) -> list[float]:
    """Best of `rounds` median_ms of call(cache, input) for each cache, the caches taking turns:
    the GPU's clocks and memory state change over a run, and turns spread that over all of them."""
    times = [[] for _ in caches]
    for _ in range(rounds):
        for cache, each in zip(caches, times, strict=True):
            each.append(median_ms(lambda x, c=cache: call(c, x), inputs, reps))
    return [min(each) for each in times]


def _spin(cycles: int) -> None:
    """Keep the device busy for `cycles` clock cycles (one thread), so the host can queue work behind it."""
    global _SPIN
    if _SPIN is None:
        _SPIN = cupy.RawKernel(r"""extern "C" __global__ void spin(long long cycles) {
            const long long start = clock64(); while (clock64() - start < cycles) {} }""", "spin")
    _SPIN((1,), (1,), (np.int64(cycles),))


class Marked:
    """Wraps a cache's kernel launchers: CUDA events around each launch, for a breakdown."""

    def __init__(self, kernels):
        self.kernels = kernels
        self.marks: list = []

    def __getattr__(self, name):
        fn = getattr(self.kernels, name)

        def launch(*args, **kwargs):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn(*args, **kwargs)
            stop.record()
            self.marks.append((name, start, stop))
        return launch


def breakdown(cache: GpuCache, call, inputs, prepare, reps: int = 5) -> str:
    """Per-kernel device time, host time of the call, and its device span (medians)."""
    original, marked = cache.kernels, Marked(cache.kernels)
    cache.kernels = marked
    host, span = [], []
    for i in range(reps):
        prepare(i)
        cupy.cuda.get_current_stream().synchronize()
        first, last = cupy.cuda.Event(), cupy.cuda.Event()
        t0 = time.perf_counter()
        first.record()
        call(inputs[i % len(inputs)])
        last.record()
        host.append((time.perf_counter() - t0) * 1e3)
        last.synchronize()
        span.append(cupy.cuda.get_elapsed_time(first, last))
    cache.kernels = original
    per: dict = {}
    for name, start, stop in marked.marks:
        per.setdefault(name, []).append(cupy.cuda.get_elapsed_time(start, stop))
    kernels = ", ".join(f"{k} {np.median(v) * len(v) / reps:.3f}" for k, v in per.items())
    return f"kernels {kernels}; host {np.median(host):.3f}, span {np.median(span):.3f} ms"


def copy_ceiling(reps: int) -> float:
    """Device-to-device copy bandwidth, GB/s, counting bytes read + written."""
    n = 1 << 30
    src = [cupy.random.randint(0, 255, n, dtype=cupy.uint8) for _ in range(2)]
    dst = cupy.empty(n, dtype=cupy.uint8)
    ms = median_ms(lambda s: dst.__setitem__(Ellipsis, s), src, reps)
    return 2 * n / ms / 1e6


@functools.cache
def _bench_kernels() -> cupy.RawModule:
    """native/bench_kernels.cu: the bench's own ceilings, compiled here only."""
    return cupy.RawModule(code=(SOURCE_DIR / "bench_kernels.cu").read_text(), options=OPTIONS)


def step_traffic_ms(cache: GpuCache, layout: RowLayout, pairs: list, reps: int) -> float:
    """Median ms of the fused step's memory traffic with nothing computed (`step_traffic`: each
    (slots, grads) pair's gradient rows read, its rows read and written in place, dirty bytes set;
    one warp a row): the ceiling of the step on the same slots."""
    kernel = _bench_kernels().get_function("step_traffic")

    def run(pair):
        slots, grads = pair
        n = len(slots)
        kernel((-(-n * 32 // 256),), (256,), (cupy.uint64(cache.slab.data.ptr), np.int64(cache.pitch),
                                             np.int32(layout.row_bytes), slots, np.int64(n), grads,
                                             np.int32(grads.shape[1] * grads.itemsize), cache.dirty))

    return median_ms(run, pairs, reps)


def consecutive_slots(n: int, capacity: int) -> list[cupy.ndarray]:
    """ROTATE runs of n consecutive slots (wrapping at `capacity`): the step's best access pattern."""
    return [cupy.arange(k * n, (k + 1) * n, dtype=cupy.int64) % capacity for k in range(ROTATE)]


def fill_slab(cache: GpuCache, layout: RowLayout) -> GpuCache:
    """Random float32 weights, the state's first float 1.0 (rowwise Adagrad's G > 0), zeroed headers."""
    for start in range(0, cache.capacity, 1 << 20):
        count = min(1 << 20, cache.capacity - start)
        rows = cupy.zeros((count, layout.row_bytes), dtype=cupy.uint8)
        weights = cupy.random.standard_normal((count, DIM), dtype=cupy.float32)
        rows[:, layout.weight_offset:layout.weight_offset + DIM * 4] = weights.view(cupy.uint8)
        if layout.state_dim:
            rows[:, layout.state_offset:layout.state_offset + 4] = cupy.ones((count, 1), cupy.float32).view(cupy.uint8)
        cache.scatter_rows(cupy.arange(start, start + count), rows)
    return cache


def fill_cache(cache: GpuCache, load: float, batch: int, rng) -> np.ndarray:
    """Insert ids until about `load` of the slots are used; returns the resident ids."""
    target = int(cache.capacity * load)
    next_id = 0
    while int(cache.occupancy()) < target:
        n = min(batch, target - int(cache.occupancy()) + 1)
        ids = cupy.arange(next_id, next_id + n, dtype=cupy.int64) * 2654435761 + 12345
        next_id += n
        cache.begin_batch()
        cache.find_or_insert(ids)
    return cache.keys[cache.occupied]


def bench_kernels(args, copy_gbs: float, rows: list) -> None:
    rng = np.random.default_rng(0)
    layout = RowLayout.of(TableConfig(name="b", dim=DIM, optimizer=OptimizerConfig(name="rowwise_adagrad")))
    config = CacheConfig(rows=args.slots // 32 * 32, ways=32)
    cache = fill_slab(GpuCache(config, layout.row_bytes, align=args.align), layout)
    n = args.batch

    # gather of weights by slot
    slot_sets = [cupy.asarray(rng.integers(0, cache.capacity, n)) for _ in range(ROTATE)]
    out = cupy.empty((n, DIM), dtype=cupy.float32)
    packed = fill_slab(GpuCache(config, layout.row_bytes, align=16), layout)    # rows back to back
    ms, ms_packed = in_turns(lambda c, s: c.gather(s, 16, DIM * 4, out.view(cupy.uint8)), (cache, packed), slot_sets,
                             args.reps)
    packed_pitch = packed.pitch
    print("gather breakdown:", breakdown(
        cache, lambda s: cache.gather(s, 16, DIM * 4, out.view(cupy.uint8)), slot_sets, lambda i: None))
    gbs = 2 * n * DIM * 4 / ms / 1e6
    import torch

    first = cache.slab_offset(layout.weight_offset) // 4
    slab_t = torch.from_dlpack(cache.slab).view(torch.float32)[:, first:first + DIM]
    idx_t = [torch.from_dlpack(s) for s in slot_sets]
    ms_t = median_ms(lambda i: torch.index_select(slab_t, 0, i), idx_t, args.reps)
    cache.kernels.copy_rows_in_flight = 4                   # the same kernel with 4 rows a group in flight
    ms_4 = median_ms(lambda s: cache.gather(s, 16, DIM * 4, out.view(cupy.uint8)), slot_sets, args.reps)
    cache.kernels.copy_rows_in_flight = COPY_ROWS_IN_FLIGHT
    rows.append(("gather 1M x 128 f32 (GB/s)", gbs, copy_gbs, f"{gbs / copy_gbs:.3f} of copy; "
                 f"torch.index_select {2 * n * DIM * 4 / ms_t / 1e6:.0f} GB/s ({ms:.3f} vs {ms_t:.3f} ms); "
                 f"4 rows in flight {ms_4:.3f} ms; rows {cache.pitch} B apart; in turns with rows packed "
                 f"{packed_pitch} B apart: {2 * n * DIM * 4 / ms_packed / 1e6 / copy_gbs:.3f} of copy "
                 f"({ms / ms_packed:.3f} of the time)"))

    # probe at ~90% load
    t0 = time.perf_counter()
    resident = fill_cache(cache, 0.9, n, rng)
    load = int(cache.occupancy()) / cache.capacity
    fill_s = time.perf_counter() - t0
    queries = [resident[cupy.asarray(rng.integers(0, len(resident), n))] for _ in range(ROTATE)]
    ms = median_ms(cache.probe, queries, args.reps)
    rows.append((f"probe 1M ids, load {load:.2f} (ids/s)", n / ms * 1e3, 4e9,
                 f"target 4e9; all hits; fill of {len(resident)} ids took {fill_s:.1f} s"))

    # find-or-insert at 60% hits, LRU victims (the cache is full after the first few calls)
    fresh = [1 << 40]
    batches: list = [None] * ROTATE

    def prepare(i):
        now_resident = cache.keys[cache.occupied]
        hits = now_resident[cupy.random.permutation(len(now_resident))[:int(n * 0.6)]]
        new = cupy.arange(fresh[0], fresh[0] + n - len(hits), dtype=cupy.int64)
        fresh[0] += n
        batches[i % ROTATE] = cupy.concatenate([hits, new])[cupy.asarray(rng.permutation(n))]
        cache.begin_batch()

    claims = []
    ms = median_ms(lambda ids: claims.append(cache.find_or_insert(ids)), batches, args.reps, before=prepare)
    print("find_or_insert breakdown:", breakdown(cache, cache.find_or_insert, batches, prepare))
    queued_ms = median_ms(cache.find_or_insert, batches, args.reps, before=prepare, queued=True)

    def back_to_back(calls: int = 8) -> tuple[float, float]:
        """ms a call and hit rate of `calls` find_or_insert calls issued one after another, as a
        training loop issues them (batches made first; later calls may miss ids earlier ones evicted)."""
        queue = []
        for i in range(calls):
            prepare(i)
            queue.append(batches[i % ROTATE])
        cupy.cuda.get_current_stream().synchronize()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        made = []
        for ids in queue:
            cache.begin_batch()
            made.append(cache.find_or_insert(ids))
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / calls, float(cupy.concatenate([c.hit for c in made]).mean())

    loops = [back_to_back() for _ in range(5)]
    loop_ms, loop_hits = float(np.median([t for t, _ in loops])), float(np.mean([h for _, h in loops]))
    hit_rate = float(claims[-1].hit.mean())
    probe_ms = median_ms(cache.probe, batches, args.reps)
    choose_ms = median_ms(lambda ids: cache._link(ids, 0), batches, args.reps)   # probe + victim choice
    start = time.perf_counter()
    for claim in claims[-5:]:
        cache.displaced_rows(claim)
    cupy.cuda.get_current_stream().synchronize()
    extract_ms = (time.perf_counter() - start) / 5 * 1e3
    rows.append((f"find_or_insert, {hit_rate:.0%} hits (ids/s)", n / ms * 1e3, 1e9,
                 f"target 1e9; {ms:.3f} ms: pure probe {probe_ms:.3f}, probe + victim choice {choose_ms:.3f}; "
                 f"queued behind other work {queued_ms:.3f} ms ({n / queued_ms / 1e6:.2f}e9 ids/s); "
                 f"8 calls back to back {loop_ms:.3f} ms a call ({n / loop_ms / 1e6:.2f}e9 ids/s, "
                 f"{loop_hits:.0%} hits); "
                 f"dirty-victim extraction +{extract_ms:.2f} ms"))

    # fused rowwise Adagrad on 1M unique cached rows, in the cache's set order
    # (what `sum_duplicates` gives) (unique ids sorted by their mix: set order), and in random slot order
    resident = cache.keys[cache.occupied]
    id_sets = [resident[cupy.asarray(rng.permutation(len(resident))[:n])] for _ in range(ROTATE)]
    grads = [cupy.random.standard_normal((n, DIM), dtype=cupy.float32) for _ in range(ROTATE)]
    table_order = [sum_duplicates(cache, ids, g)[:2] for ids, g in zip(id_sets, grads, strict=True)]
    table_slots = [(cache.probe(ids), g) for ids, g in table_order]
    assert all(bool((slots >= 0).all()) for slots, _ in table_slots)
    random_slots = [(cache.probe(ids), g) for ids, g in zip(id_sets, grads, strict=True)]
    opt = OptimizerConfig(name="rowwise_adagrad", lr=0.01)

    def step(pair):
        cache.optimizer_step(pair[0], pair[1], opt, layout, now=1)

    ms = median_ms(step, table_slots, args.reps)
    random_ms = median_ms(step, random_slots, args.reps)
    step_ms, step_packed_ms = in_turns(lambda c, p: c.optimizer_step(p[0], p[1], opt, layout, now=1),
                                       (cache, packed), table_slots, args.reps)    # the same slots of both slabs
    packed = None
    cupy.get_default_memory_pool().free_all_blocks()
    front_ms = median_ms(lambda p: cache.probe_and_touch(sum_duplicates(cache, *p)[0]),
                         list(zip(id_sets, grads, strict=True)), args.reps)
    print("rowwise adagrad breakdown:", breakdown(cache, step, table_slots, lambda i: None))
    with_dups = [(ids[cupy.asarray(rng.integers(0, n, n))], g) for ids, g in zip(id_sets, grads, strict=True)]

    def apply(pair):   # the whole device apply_gradients: group by id, probe (+touch), steps summing as they read
        cache.apply_gradients(*pair, opt, layout, now=1)

    def composed(pair):   # the same from parts: summed gradients written out, then probe and step
        uniq, summed, _ = sum_duplicates(cache, *pair)
        cache.optimizer_step(cache.probe_and_touch(uniq), summed, opt, layout, now=1)

    apply_ms = median_ms(apply, list(zip(id_sets, grads, strict=True)), args.reps)
    dups_ms = median_ms(apply, with_dups, args.reps)
    composed_ms = median_ms(composed, with_dups, args.reps)
    print("apply_gradients breakdown:", breakdown(cache, apply, with_dups, lambda i: None))
    uniq_dups = int(len(cupy.unique(with_dups[0][0])))
    # what the call must move: ids and gradient rows in, each unique row read and written once
    row_io = DIM * 4 * 2 + 4 * 2 + 16 * 2 + 1 + 8
    apply_gbs = n * (8 + DIM * 4 + row_io) / apply_ms / 1e6
    dups_gbs = (n * (8 + DIM * 4) + uniq_dups * row_io) / dups_ms / 1e6
    rows.append(("apply_gradients 1M unique ids (GB/s)", apply_gbs, copy_gbs,
                 f"{apply_gbs / copy_gbs:.3f} of copy; {apply_ms:.3f} ms (group, probe, summing steps); "
                 f"1M rows over {uniq_dups} ids: {dups_gbs / copy_gbs:.3f} of copy ({dups_ms:.3f} ms; "
                 f"sum_duplicates + probe + step {composed_ms:.3f} ms)"))
    moved = n * (DIM * 4 * 3 + 4 * 2 + 16 * 2 + 1 + 8)   # grads + weights r/w + G r/w + header r/w + dirty + slot
    gbs, random_gbs = moved / ms / 1e6, moved / random_ms / 1e6
    dense = list(zip(consecutive_slots(n, cache.capacity), grads, strict=True))
    dense_ms = median_ms(step, dense, args.reps)
    # the step's own traffic with nothing computed: the access pattern's ceiling, bytes counted alike
    bare = {order: moved / step_traffic_ms(cache, layout, pairs, args.reps) / 1e6 / copy_gbs
            for order, pairs in (("random", random_slots), ("set order", table_slots), ("consecutive", dense))}
    rows.append(("rowwise adagrad 1M rows (GB/s)", gbs, copy_gbs, f"{gbs / copy_gbs:.3f} of copy; {ms:.3f} ms "
                 f"on rows in table (set) order; in random order {random_gbs / copy_gbs:.3f} of copy "
                 f"({random_ms:.3f} ms), on consecutive slots {moved / dense_ms / 1e6 / copy_gbs:.3f} "
                 f"({dense_ms:.3f} ms); the step's traffic with nothing computed (its ceiling): "
                 + ", ".join(f"{order} {r:.3f}" for order, r in bare.items()) + "; "
                 f"before the step, summing duplicates + probe take {front_ms:.3f} ms; in turns with rows packed "
                 f"{layout.row_bytes} B apart: {moved / step_ms / 1e6 / copy_gbs:.3f} / "
                 f"{moved / step_packed_ms / 1e6 / copy_gbs:.3f} of copy ({step_ms:.3f} / {step_packed_ms:.3f} ms)"))


def bench_each_optimizer(args, copy_gbs: float, rows: list, slots: int = 4 << 20) -> None:
    """Each optimizer's fused step (dim 128, float32 weights) on a slab of `slots` rows: rows in
    consecutive slots, a sorted random quarter of the slots (set order), and random order.
    Bytes counted: the gradient row read, the stored row read and written, slot and dirty flag."""
    rng = np.random.default_rng(2)
    n = args.batch
    grads = [cupy.random.standard_normal((n, DIM), dtype=cupy.float32) for _ in range(ROTATE)]
    picks = [rng.choice(slots, n, replace=False) for _ in range(ROTATE)]
    orders = {"consecutive": consecutive_slots(n, slots),
              "set order": [cupy.asarray(np.sort(p)) for p in picks],
              "random": [cupy.asarray(p) for p in picks]}
    for name in OPTIMIZER_CODES:
        layout = RowLayout.of(TableConfig(name="b", dim=DIM, optimizer=OptimizerConfig(name=name)))
        cache = fill_slab(GpuCache(CacheConfig(rows=slots, ways=32), layout.row_bytes), layout)
        opt = OptimizerConfig(name=name, lr=0.01)
        moved = n * (DIM * 4 + 2 * layout.row_bytes + 8 + 1)

        def step(pair, cache=cache, opt=opt, layout=layout):
            cache.optimizer_step(pair[0], pair[1], opt, layout, now=1)

        ratios, bare = {}, {}
        for order, idx in orders.items():
            pairs = list(zip(idx, grads, strict=True))
            ratios[order] = moved / median_ms(step, pairs, args.reps) / 1e6 / copy_gbs
            bare[order] = moved / step_traffic_ms(cache, layout, pairs, args.reps) / 1e6 / copy_gbs
        rows.append((f"{name} step, {layout.row_bytes} B rows (of copy)", ratios["set order"], 1.0,
                     ", ".join(f"{order} {r:.3f} (ceiling {bare[order]:.3f})" for order, r in ratios.items())))
        del cache
        cupy.get_default_memory_pool().free_all_blocks()


def bench_end_to_end(args, rows: list) -> None:
    rng = np.random.default_rng(1)
    batch, hot_n, cold_n = 65536, 1 << 20, 200_000
    cfg = TableConfig(name="e2e", dim=DIM, optimizer=OptimizerConfig(name="rowwise_adagrad"),
                      cache=CacheConfig(rows=1 << 21, ways=32, device="cuda:0"))
    with tempfile.TemporaryDirectory() as path, Store(path) as store:
        store.create_table(cfg)
        table = store.table("e2e")
        layout = table.layout
        hot = cupy.arange(hot_n, dtype=cupy.int64)                    # resident, clean
        gpu = table.cache.cache                                      # the tier's GpuCache
        gpu.begin_batch()
        claim = gpu.find_or_insert(hot)
        hot_rows = cupy.zeros((hot_n, layout.row_bytes), dtype=cupy.uint8)
        hot_rows.view(cupy.float32)[:, 4:4 + DIM] = cupy.random.standard_normal((hot_n, DIM), dtype=cupy.float32)
        gpu.scatter_rows(claim.slots, hot_rows)
        cold = np.arange(1 << 32, (1 << 32) + cold_n, dtype=np.int64)  # in RocksDB only
        cold_rows = layout.empty(cold_n)
        layout.weights(cold_rows)[:] = rng.standard_normal((cold_n, DIM)).astype(np.float32)
        t0 = time.perf_counter()
        for i in range(0, cold_n, 50_000):
            store.rocks.write(table.family, encode_keys(cold[i:i + 50_000]), layout.to_values(cold_rows[i:i + 50_000]))
        store.rocks.flush()
        load_s = time.perf_counter() - t0
        n_cold = int(batch * 0.05)
        batches = []
        for b in range(cold_n // n_cold):
            ids = np.concatenate([rng.integers(0, hot_n, batch - n_cold), cold[b * n_cold:(b + 1) * n_cold]])
            batches.append(cupy.asarray(rng.permutation(ids)))
        for ids in batches[:3]:
            store.lookup("e2e", ids)
        cupy.cuda.get_current_stream().synchronize()
        timed, profiled = batches[3:33], batches[33:]
        start = time.perf_counter()
        for ids in timed:
            store.lookup("e2e", ids)
        cupy.cuda.get_current_stream().synchronize()
        seconds = time.perf_counter() - start
        rate = len(timed) * batch / seconds
        start = time.perf_counter()
        for ids in profiled:
            store.lookup("e2e", ids.get())           # ids on the host, as the service has them
        host_rate = len(profiled) * batch / (time.perf_counter() - start)
        # ceilings: the same batches all hits (device path only), and RocksDB multi-get of the misses
        hit_only = [cupy.asarray(rng.integers(0, hot_n, batch)) for _ in range(ROTATE)]
        ms = median_ms(lambda ids: store.lookup("e2e", ids), hit_only, args.reps)
        probe_keys = encode_keys(cold[:n_cold])
        t0 = time.perf_counter()
        for _ in range(5):
            store.rocks.get(table.family, probe_keys)
        get_rate = 5 * n_cold / (time.perf_counter() - t0)
        rows.append(("e2e lookup 95% hits (rows/s)", rate, batch / ms * 1e3,
                     f"ceiling = all-hit lookup; RocksDB get {get_rate / 1e6:.2f} M rows/s alone; "
                     f"host ids and results {host_rate / 1e6:.2f} M rows/s; cold load {load_s:.1f} s"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slots", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=1 << 20)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-optimizers", action="store_true", help="leave out each optimizer's step")
    parser.add_argument("--align", type=int, default=None, help="slab rows' start alignment in bytes (16: rows "
                        "packed back to back; default: the cache's own choice)")
    args = parser.parse_args()
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()}, {props['multiProcessorCount']} SMs, CuPy {cupy.__version__}")
    rows: list = []
    copy_gbs = copy_ceiling(args.reps)
    rows.append(("device-to-device copy (GB/s)", copy_gbs, copy_gbs, "ceiling: bytes read + written"))
    bench_kernels(args, copy_gbs, rows)
    cupy.get_default_memory_pool().free_all_blocks()
    if not args.skip_optimizers:
        bench_each_optimizer(args, copy_gbs, rows)
    if not args.skip_e2e:
        bench_end_to_end(args, rows)
    print(f"{'figure':<40} {'measured':>12} {'ceiling':>12}  notes")
    for name, value, ceiling, note in rows:
        print(f"{name:<40} {value:>12.4g} {ceiling:>12.4g}  {note}")


if __name__ == "__main__":
    main()
