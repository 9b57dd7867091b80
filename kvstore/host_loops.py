"""The Numba loops behind `host_kernels` (imported on first use: Numba's import and the
set-up of its compiler cost about a second of CPU per process, which a process that never
touches a host cache, such as a command-line tool, should not pay)."""
from __future__ import annotations

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cache import HINT_WAYS, MIX
from .host_kernels import CACHE_LINE
from .initializer import GOLDEN, MIX1, MIX2

PREFETCH_ROWS = 8          # rows asked for ahead of the one being copied (4-16 measured alike)
PROBE_AHEAD = 32           # ids whose hint bucket (one line) is asked for ahead: 1.15x of 8 with cold caches
OPAQUE_POINTERS = llvmlite.binding.llvm_version_info >= (16,)      # the intrinsic's name follows the pointer model
_PREFETCH = "llvm.prefetch.p0" if OPAQUE_POINTERS else "llvm.prefetch.p0i8"


def _prefetch_code(write: int):
    """The code of a prefetch of the cache line holding array[index] into every cache level
    (locality 3, `prefetcht0`). The non-temporal hint (locality 0) it gave before made a gather
    of 4,096 random rows take 0.42 ms instead of 0.22 on a 2-core VM, where no prefetch at
    all took 0.22-0.25 ms; on a 16-core host the three were alike (docs/benchmarks.md, stop 42)."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]], wraparound=False)
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), _PREFETCH)
        builder.call(function, [builder.bitcast(pointer, byte_pointer), i32(write), i32(3), i32(1)])
        return context.get_dummy_value()
    return codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask for the cache line holding array[index], to read it."""
    return types.void(array, index), _prefetch_code(0)


@intrinsic
def _prefetch_write(typingctx, array, index):
    """Ask for the cache line holding array[index], to write it."""
    return types.void(array, index), _prefetch_code(1)


@intrinsic
def _copy(typingctx, dst, dst_index, src, src_index, nbytes):
    """memcpy(&dst[dst_index], &src[src_index], nbytes) on flat uint8 arrays."""
    def codegen(context, builder, signature, args):
        dst_type, _, src_type, _, _ = signature.args
        to = cgutils.get_item_pointer(context, builder, dst_type, context.make_array(dst_type)(
            context, builder, args[0]), [args[1]], wraparound=False)
        of = cgutils.get_item_pointer(context, builder, src_type, context.make_array(src_type)(
            context, builder, args[2]), [args[3]], wraparound=False)
        cgutils.raw_memcpy(builder, to, of, args[4], 1)
        return context.get_dummy_value()
    return types.void(dst, dst_index, src, src_index, nbytes), codegen


@njit(nogil=True, cache=True, boundscheck=False)
def gather(slab, row_bytes, offset, nbytes, slots, out):
    n, capacity = len(slots), len(slab) // row_bytes
    for i in range(n):
        if slots[i] >= capacity:
            return i                                     # the caller raises, naming the slot
    for i in range(n):
        ahead = i + PREFETCH_ROWS
        if ahead < n and slots[ahead] >= 0:
            start = slots[ahead] * row_bytes + offset
            for line in range(start, start + nbytes, CACHE_LINE):
                _prefetch(slab, line)
        if slots[i] >= 0:
            _copy(out, i * nbytes, slab, slots[i] * row_bytes + offset, nbytes)
    return -1


@njit(nogil=True, cache=True, boundscheck=False)
def scatter(slab, row_bytes, slots, rows, part, parts):
    """Row i of `rows` (row_bytes each) into row slots[i] of `slab`, for the slots that are `part`
    modulo `parts` (a power of two): a repeated slot is one part's, so its last row wins."""
    n, capacity, own = len(slots), len(slab) // row_bytes, parts - 1
    for i in range(n):
        if slots[i] < 0 or slots[i] >= capacity:
            return i                                     # the caller raises, naming the slot
    for i in range(n):
        ahead = i + PREFETCH_ROWS * parts
        if ahead < n and (slots[ahead] & own) == part:
            start = slots[ahead] * row_bytes
            for line in range(start, start + row_bytes, CACHE_LINE):
                _prefetch_write(slab, line)
        if (slots[i] & own) == part:
            _copy(slab, slots[i] * row_bytes, rows, i * row_bytes, row_bytes)
    return -1


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _find_in_set(keys, occupied, fingerprints, ways, which, key, fingerprint):
    """The way of set `which` holding `key`: its fingerprint matches, verified; -1 if none."""
    first = which * ways
    for way in range(first, first + ways):
        if fingerprints[way] == fingerprint and keys[way] == key and occupied[way]:
            return way
    return -1


@njit(nogil=True, cache=True, inline="always")
def _mix(key):
    """`SetAssociativeCache.mix` of one id."""
    mixed = np.uint64(key) * GOLDEN
    mixed ^= mixed >> np.uint64(32)
    mixed *= MIX
    return mixed ^ (mixed >> np.uint64(32))


@njit(nogil=True, cache=True, inline="always")
def _home(mixed, num_sets):
    """`SetAssociativeCache._set_from`: the top 32 bits of the mix, scaled to the sets."""
    return np.int64(((mixed >> np.uint64(32)) * num_sets) >> np.uint64(32))


@njit(nogil=True, cache=True, inline="always")
def _hinted_slot(hints, at, key):
    """The slot of `key`'s live pair in the bucket at `at`, or -1."""
    for pair in range(at, at + 2 * HINT_WAYS, 2):
        if hints[pair] == key and hints[pair + 1] >= 0:
            return hints[pair + 1]
    return -1


@njit(nogil=True, cache=True, inline="always")
def _hint(hints, at, key, slot, mixed):
    """(key, slot) into the bucket at `at`: a retired pair's place, else one chosen by the mix."""
    pair = at + 2 * np.int64((mixed >> np.uint64(32)) & np.uint64(HINT_WAYS - 1))
    for free in range(at, at + 2 * HINT_WAYS, 2):
        if hints[free + 1] < 0:
            pair = free
            break
    hints[pair] = key
    hints[pair + 1] = slot


@njit(nogil=True, cache=True, inline="always")
def _unhint(hints, at, slot):
    """Retire the pair of `slot` in the bucket at `at`, if it has one there."""
    for pair in range(at, at + 2 * HINT_WAYS, 2):
        if hints[pair + 1] == slot:
            hints[pair + 1] = -1


@njit(nogil=True, cache=True, boundscheck=False)
def probe(hints, mask, keys, occupied, fingerprints, ways, num_sets, ids, spilled, slots, part, parts):
    """The set (`SetAssociativeCache._set_from`) and the fingerprint (its low 16 bits) come from
    the id's mix; a set marked `spilled` has rows in the next set too. Only ids whose hint
    bucket is `part` modulo `parts` (a power of two, at most the buckets): a part's threads
    write disjoint buckets."""
    n, own = len(ids), np.uint64(parts - 1)
    for i in range(n):
        ahead = i + PROBE_AHEAD * parts
        if ahead < n:
            later = _mix(ids[ahead]) & mask
            if (later & own) == part:
                _prefetch(hints, np.int64(later) * (2 * HINT_WAYS))
        mixed = _mix(ids[i])
        if (mixed & own) != part:
            continue
        at = np.int64(mixed & mask) * (2 * HINT_WAYS)
        slot = _hinted_slot(hints, at, ids[i])
        if slot >= 0:
            slots[i] = slot
            continue
        home = _home(mixed, num_sets)
        fingerprint = np.uint16(mixed & np.uint64(0xFFFF))
        slot = _find_in_set(keys, occupied, fingerprints, ways, home, ids[i], fingerprint)
        if slot < 0 and spilled[home]:
            slot = _find_in_set(keys, occupied, fingerprints, ways, (home + 1) % np.int64(num_sets), ids[i],
                                fingerprint)
        slots[i] = slot
        if slot >= 0:                                 # hinted again for the next probe
            _hint(hints, at, ids[i], slot, mixed)


@njit(nogil=True, cache=True, boundscheck=False)
def probe_read_hits(hints, mask, keys, occupied, fingerprints, ways, num_sets, ids, spilled, slots, slab, words,
                    row_bytes, header_word, max_count, now, last_used, tick, uses, count_uses, weight_offset,
                    weight_bytes, weights, state_offset, state_bytes, state):
    """One thread's `probe` of every id, then, only if all are cached, its `read_hits` of their
    slots: -2 (nothing recorded or gathered) if some id is not, else read_hits' answer."""
    probe(hints, mask, keys, occupied, fingerprints, ways, num_sets, ids, spilled, slots, np.uint64(0), np.int64(1))
    for i in range(len(slots)):
        if slots[i] < 0:
            return -2
    return read_hits(slab, words, row_bytes, header_word, max_count, now, last_used, tick, uses, count_uses, slots,
                     weight_offset, weight_bytes, weights, state_offset, state_bytes, state, 0, 1)


@njit(nogil=True, cache=True, boundscheck=False)
def spill(occupied, locks, rows, near, ways, given, chosen):
    """`SetAssociativeCache._spill`, in batch order: id k takes the first free way of set
    `near[k]`, whose ways' occupied bits and lock counts are row `rows[k]` of `occupied` and
    `locks`: empty, unlocked, neither in `given` (sorted) nor taken here; -1 in `chosen` if none."""
    taken = set()
    for k in range(len(near)):
        chosen[k] = -1
        first, row = near[k] * ways, rows[k]
        for way in range(ways):
            if occupied[row, way] or locks[row, way] != 0:
                continue
            slot = first + way
            at = np.searchsorted(given, slot)
            if (at < len(given) and given[at] == slot) or slot in taken:
                continue
            taken.add(slot)
            chosen[k] = slot
            break


@njit(nogil=True, cache=True, boundscheck=False)
def read_hits(slab, words, row_bytes, header_word, max_count, now, last_used, tick, uses, count_uses,
              slots, weight_offset, weight_bytes, weights, state_offset, state_bytes, state, part, parts):
    """Only slots that are `part` modulo `parts` (a power of two): each slot, however often it
    repeats, is one part's, so its access is recorded once without atomics."""
    n, capacity, own = len(slots), len(last_used), parts - 1
    for i in range(n):
        if slots[i] >= capacity:
            return i
    row_words = row_bytes // 4
    for i in range(n):
        ahead = i + PREFETCH_ROWS * parts
        if ahead < n and slots[ahead] >= 0 and (slots[ahead] & own) == part:
            row = slots[ahead] * row_bytes
            _prefetch(last_used, slots[ahead])
            _prefetch(slab, row)
            for line in range(row + weight_offset, row + weight_offset + weight_bytes, CACHE_LINE):
                _prefetch(slab, line)
        slot = slots[i]
        if slot < 0 or (slot & own) != part:         # not cached (its rows are the caller's to fill), or not ours
            continue
        if last_used[slot] != tick:                  # the batch's first use of the slot: counts once
            last_used[slot] = tick
            if count_uses:
                uses[slot] += 1
            at = slot * row_words + header_word
            words[at] = min(words[at], max_count) + 1
            words[at + 1] = now
        _copy(weights, i * weight_bytes, slab, slot * row_bytes + weight_offset, weight_bytes)
        if state_bytes:
            _copy(state, i * state_bytes, slab, slot * row_bytes + state_offset, state_bytes)
    return -1


_UNIT = 1.0 / (1 << 53)


@njit(nogil=True, cache=True, inline="always")
def _splitmix64(x):
    """splitmix64 of one uint64 (`initializer.splitmix64`)."""
    z = x + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


@njit(nogil=True, cache=True, inline="always")
def _unit_value(base, column):
    """(0, 1) from splitmix64 of counter `base + column * golden`: its top 53 bits + 0.5, scaled."""
    z = _splitmix64(base + np.uint64(column) * GOLDEN)
    return (np.float64(np.int64(z >> np.uint64(11))) + 0.5) * _UNIT      # < 2^53: a signed convert is exact


@njit(nogil=True, cache=True, boundscheck=False)
def initial_uniform(ids, key, scale, out):
    """out[i, j] = (u * 2 - 1) * scale, u the (0, 1) value of column j of id i in the stream of `key`."""
    for i in range(out.shape[0]):
        base = _splitmix64(ids[i] ^ key)
        for j in range(out.shape[1]):
            out[i, j] = (_unit_value(base, j) * 2.0 - 1.0) * scale


@njit(nogil=True, cache=True, boundscheck=False)
def initial_normal(ids, radius_key, angle_key, scale, out):
    """Box-Muller: out[i, j] = sqrt(log(u1) * -2) * cos(u2 * 2 pi) * scale, u1 and u2 from two streams."""
    for i in range(out.shape[0]):
        radius_base, angle_base = _splitmix64(ids[i] ^ radius_key), _splitmix64(ids[i] ^ angle_key)
        for j in range(out.shape[1]):
            radius = np.sqrt(np.log(_unit_value(radius_base, j)) * -2.0)
            out[i, j] = radius * np.cos(_unit_value(angle_base, j) * (2.0 * np.pi)) * scale


_NEVER = np.iinfo(np.int64).max      # a way's key when it may not be a victim
_AGE_BITS = np.int64(0xFFFFFFFF)
_MAX_USES = np.int64((1 << 30) - 1)


@njit(nogil=True, cache=True, boundscheck=False)
def choose_ways(occupied, last_used, locks, uses, lfu, tick, ways, sets, order, slots, displacing):
    """`SetAssociativeCache.choose_slots` before the spill: the new ids of each set, in batch
    order, take its ways in the order of their keys (an empty way -1, then LRU's `last_used`,
    or LFU's uses << 32 | age; ties by way), never a locked way or one this batch used
    (`tick`). slots[k] = -1 where none is left; `displacing[k]`: id k got no way or an
    occupied one (the spill looks for a free way of the next set for it). `order`: the ids
    by set, stable (each set's ids in batch order)."""
    n = len(sets)
    key = np.empty(ways, np.int64)
    ranked = np.empty(ways, np.int64)
    picked = np.empty(ways, np.bool_)
    start = 0
    while start < n:
        if start + PREFETCH_ROWS < n:                    # the ways of the set of the id that far ahead
            ahead = sets[order[start + PREFETCH_ROWS]] * ways
            _prefetch(occupied, ahead)
            for at in range(ahead, ahead + ways, CACHE_LINE // 8):
                _prefetch(last_used, at)
                if lfu:
                    _prefetch(uses, at)
            for at in range(ahead, ahead + ways, CACHE_LINE // 4):
                _prefetch(locks, at)
        home = sets[order[start]]
        stop = start + 1
        while stop < n and sets[order[stop]] == home:
            stop += 1
        first = home * ways
        for way in range(ways):
            slot = first + way
            if locks[slot] > 0 or (occupied[slot] and last_used[slot] == tick):
                key[way] = _NEVER
            elif not occupied[slot]:
                key[way] = -1
            elif lfu:
                key[way] = (min(uses[slot], _MAX_USES) << np.int64(32)) | (last_used[slot] & _AGE_BITS)
            else:
                key[way] = last_used[slot]
        picked[:] = False
        for r in range(min(stop - start, ways)):         # the smallest keys in order, ties by way (selection)
            best = -1
            for way in range(ways):
                if not picked[way] and (best < 0 or key[way] < key[best]):
                    best = way
            picked[best] = True
            ranked[r] = best
        for r in range(stop - start):
            k = order[start + r]
            way = ranked[min(r, ways - 1)]
            if r < ways and key[way] != _NEVER:
                slots[k] = first + way
                displacing[k] = key[way] != -1
            else:
                slots[k] = -1
                displacing[k] = True
        start = stop


@njit(nogil=True, cache=True, boundscheck=False)
def fill_slots(slots, ids, hints, mask, keys, occupied, fingerprints, spilled, dirty, dirty_value, dirty_flags,
               last_used, tick, uses, ways, num_sets):
    """`SetAssociativeCache.fill`'s bookkeeping of each placed id (slots >= 0), in batch order:
    the hint of the row it displaces retired, its key, fingerprint, hint, occupied, dirty and
    stamps written, its home set marked `spilled` when the slot is in the next set. Returns the
    slots that were empty before (the occupied count's gain)."""
    gained, n = 0, len(slots)
    for k in range(n):
        ahead = k + PREFETCH_ROWS
        if ahead < n and slots[ahead] >= 0:              # the places written for the id that far ahead
            _prefetch_write(keys, slots[ahead])
            _prefetch_write(last_used, slots[ahead])
            _prefetch_write(fingerprints, slots[ahead])
            _prefetch_write(hints, np.int64(_mix(ids[ahead]) & mask) * (2 * HINT_WAYS))
        slot = slots[k]
        if slot < 0:
            continue
        if occupied[slot]:                               # the displaced row's hint, if it still has one
            _unhint(hints, np.int64(_mix(keys[slot]) & mask) * (2 * HINT_WAYS), slot)
        else:
            gained += 1
        mixed = _mix(ids[k])
        keys[slot] = ids[k]
        home = _home(mixed, num_sets)
        if slot // ways != home:
            spilled[home] = True
        fingerprints[slot] = np.uint16(mixed & np.uint64(0xFFFF))
        _hint(hints, np.int64(mixed & mask) * (2 * HINT_WAYS), ids[k], slot, mixed)
        occupied[slot] = True
        dirty[slot] = dirty_flags[k] if len(dirty_flags) else dirty_value
        last_used[slot] = tick
        if len(uses):
            uses[slot] = 1
    return gained


@njit(nogil=True, cache=True, boundscheck=False)
def group_ids(ids, table_bits, groups, firsts):
    """Each id's group (its distinct value's number, in order of first appearance) into `groups`,
    and each group's first position into `firsts`; returns the number of groups. One pass over
    the ids through an open-addressed table of 2**table_bits entries (more than twice the ids)."""
    mask = np.int64((1 << table_bits) - 1)
    shift = np.uint64(64 - table_bits)
    at = np.full(1 << table_bits, -1, np.int64)          # table entry -> group
    count = 0
    for j in range(len(ids)):
        key = ids[j]
        entry = np.int64(_mix(key) >> shift)
        while True:
            group = at[entry]
            if group < 0:
                at[entry] = count
                firsts[count] = j
                groups[j] = count
                count += 1
                break
            if ids[firsts[group]] == key:
                groups[j] = group
                break
            entry = (entry + 1) & mask
    return count


@njit(nogil=True, cache=True, boundscheck=False)
def add_rows(grads, groups, rank, out):
    """out[rank[groups[j]]] = the float32 sum of grads[j] over j in request order, each row's
    first term added to zero (so the bits are those of any sum that starts at 0 in that order)."""
    n, dim = grads.shape
    seen = np.zeros(len(out), np.bool_)
    for j in range(n):
        row = rank[groups[j]]
        if seen[row]:
            for c in range(dim):
                out[row, c] += grads[j, c]
        else:
            seen[row] = True
            for c in range(dim):
                out[row, c] = np.float32(0.0) + grads[j, c]


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def adagrad(weights, state, grads, lr, eps, weight_decay):
    """`optimizers.Adagrad.step` in one pass per row: each value's accumulator, then its weight,
    with NumPy's float32 operations in NumPy's order (no fast-math: the bits of the whole-batch
    passes it replaces). `error_model="numpy"`: a division gives Inf or NaN, as NumPy's does."""
    for i in range(weights.shape[0]):
        w, s, g = weights[i], state[i], grads[i]
        for c in range(len(g)):
            gc = g[c] + weight_decay * w[c] if weight_decay != 0 else g[c]
            accumulated = s[c] + gc * gc
            s[c] = accumulated
            w[c] = w[c] - gc / (np.sqrt(accumulated) + eps) * lr


@njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "nsz", "arcp", "contract"})
def rowwise_adagrad(weights, state, grads, lr, eps, weight_decay):
    """`optimizers.RowwiseAdagrad.step` in one pass per row: the mean square of the row's gradient
    (summed in any order, so vectorized), its accumulator, then its weights. The gradient alone
    is read in the sums when there is no weight decay (the weights are a strided view)."""
    dim = np.float32(weights.shape[1])
    for i in range(weights.shape[0]):
        w, g = weights[i], grads[i]
        total = np.float32(0.0)
        if weight_decay == 0:
            for c in range(len(g)):
                total += g[c] * g[c]
        else:
            for c in range(len(g)):
                decayed = g[c] + weight_decay * w[c]
                total += decayed * decayed
        accumulated = state[i, 0] + total / dim
        state[i, 0] = accumulated
        scale = lr / (np.sqrt(accumulated) + eps)
        if weight_decay == 0:
            for c in range(len(g)):
                w[c] = w[c] - g[c] * scale
        else:
            for c in range(len(g)):
                w[c] = w[c] - (g[c] + weight_decay * w[c]) * scale
