// Kernels of the GPU cache tier: set probe, victim choice, slot claims, row
// copies and fused optimizer steps. Compiled at run time through
// cupy.RawModule (NVRTC); no headers beyond what NVRTC provides.
//
// Layout shared with kvstore/cache.py and kvstore/rows.py: slot = set * ways + way;
// keys int64, occupied/dirty bool (1 byte), locks int32, last_used/uses int64;
// slab rows: weights | float32 state | 16-byte header, each row's start `pitch` bytes after the
// one before (kvstore/gpu_cache.py: the stored row, 16-byte header first, rotated so the weights
// lead). Kernels that touch headers take the address of row 0's header and the pitch.
// The set of an id: two multiply-xorshift rounds of uint64(id) (a bijection), whose top
// 32 bits are scaled to [0, num_sets).

#define GOLDEN 0x9E3779B97F4A7C15ull
#define MIX 0xD6E8FEB86659FD93ull
#define FULL 0xffffffffu
#define NEVER 0x7fffffffffffffffll   // sort key of a way that may not be a victim
#define EMPTY (-1ll)                 // sort key of an empty way: taken first
#define LFU_CAP ((1ll << 30) - 1)
#define MAX_COUNT 0xfffffffeu        // a header count saturates here (rows.py MAX_COUNT)

typedef long long i64;
typedef unsigned long long u64;

__device__ __forceinline__ u64 mix_of(i64 id) {   // the host cache's mix
    u64 h = (u64)id * GOLDEN;
    h ^= h >> 32;
    h *= MIX;
    h ^= h >> 32;
    return h;
}

__device__ __forceinline__ i64 set_of(i64 id, i64 num_sets) {
    return (i64)(((mix_of(id) >> 32) * (u64)num_sets) >> 32);   // top 32 bits scaled: sets grow with the mix
}

// The set of each id (the host cache's set_of; a test keeps the two equal).
extern "C" __global__ void sets_of(const i64* __restrict__ ids, i64 n, i64 num_sets, i64* __restrict__ out) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = set_of(ids[i], num_sets);
}

__device__ __forceinline__ i64 warp_id_global() {
    return ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
}

__device__ __forceinline__ i64 warps_total() {
    return ((i64)gridDim.x * blockDim.x) >> 5;
}

// --- probe -------------------------------------------------------------------
//
// G lanes per id, each looking at WPL consecutive ways (G * WPL >= ways; lanes
// past `ways` look at nothing). The hit is the lowest matching way, as on the host.
// flags: 1 = touch hits (last_used = tick), 8 = touch and count uses (LFU: uses += 1
//        once per slot per tick), 16 = touch and record the access in the row header
//        (count + 1, saturating; last_access = now; once per slot per tick),
//        2 = link misses into per-set lists (for victim choice),
//        4 = treat every id as new (choose_slots on ids known to be uncached),
//        32 = mark each hit's slot with `epoch` (marks[slot]) and set repeated[0] when a slot
//        was already marked with it (a batch whose cached ids are unique needs no grouping).
// repeated (may be null): [1] set when an id is not cached (with or without flag 32).
// skip (may be null): when *skip is set by earlier work, the launch does nothing (a touch
// that is to happen only if an earlier pure probe found every id).
// cleared (may be null): set to false for every id.
// spilled (may be null): a set marked there has rows in the next set (the host cache's
// spill), so an id not found in its own set is looked for there too.
// Per-set lists: head[set] = (epoch << 32) | (position + 1) of the last miss
// linked; a head with another epoch is empty, so heads need no clearing.

// This lane's first way (of its WPL ways of the set at `first`) holding `id`; WPL if none.
template <int G, int WPL>
__device__ __forceinline__ int first_match(const i64* __restrict__ keys, const bool* __restrict__ occupied,
                                           i64 first, int sub, int ways, i64 id) {
    int local = WPL;
    if (WPL == 4) {
        const longlong2* k2 = reinterpret_cast<const longlong2*>(keys + first + sub * 4);
        const longlong2 a = k2[0], b = k2[1];
        const unsigned occ = *reinterpret_cast<const unsigned*>(occupied + first + sub * 4);
        const i64 k[4] = {a.x, a.y, b.x, b.y};
#pragma unroll
        for (int j = 3; j >= 0; --j)
            if (k[j] == id && ((occ >> (8 * j)) & 0xff)) local = j;
    } else {
#pragma unroll
        for (int j = WPL - 1; j >= 0; --j) {
            const int way = sub * WPL + j;
            if (way < ways && keys[first + way] == id && occupied[first + way]) local = j;
        }
    }
    return local;
}

// The slot the lanes of each group found (the lowest matching way), or -1; every lane takes part.
template <int G, int WPL>
__device__ __forceinline__ i64 group_slot(int local, i64 first, int group) {
    const unsigned ballot = __ballot_sync(FULL, local < WPL);
    const unsigned mine = (ballot >> (group * G)) & (G == 32 ? FULL : ((1u << G) - 1));
    const int src = mine ? __ffs(mine) - 1 : 0;
    const int src_local = __shfl_sync(FULL, local, group * G + src);
    return mine ? first + src * WPL + src_local : -1;
}

template <int G, int WPL>
__global__ void probe(const i64* __restrict__ keys, const bool* __restrict__ occupied,
                      const i64* __restrict__ ids, i64 n, i64 num_sets, int ways,
                      i64* __restrict__ slots_out, bool* __restrict__ hit_out,
                      i64* last_used, i64* uses, i64 tick, int flags,
                      u64* heads, int* next, u64 epoch, char* headers, i64 row_bytes, unsigned now,
                      bool* __restrict__ cleared, unsigned* marks, int* repeated,
                      const bool* __restrict__ spilled, const int* __restrict__ skip) {
    if (skip && *skip) return;
    const int lane = threadIdx.x & 31;
    const int group = lane / G;
    const int sub = lane % G;
    const int per_warp = 32 / G;
    const i64 step = warps_total() * per_warp;
    i64 base = warp_id_global() * per_warp;
    i64 coming = base + group < n ? ids[base + group] : 0;   // the next round's id, loaded a round ahead
    for (; base < n; base += step) {
        const i64 i = base + group;
        const bool valid = i < n;
        const i64 id = valid ? coming : 0;
        coming = i + step < n ? ids[i + step] : 0;
        const i64 set = set_of(id, num_sets);
        const i64 first = set * ways;
        const bool probing = valid && !(flags & 4);
        i64 found = group_slot<G, WPL>(probing ? first_match<G, WPL>(keys, occupied, first, sub, ways, id) : WPL,
                                       first, group);
        const bool again = probing && found < 0 && spilled != nullptr && spilled[set];   // the same for a group
        if (__any_sync(FULL, again)) {
            const i64 next_first = ((set + 1) % num_sets) * ways;
            found = max(found, group_slot<G, WPL>(
                again ? first_match<G, WPL>(keys, occupied, next_first, sub, ways, id) : WPL, next_first, group));
        }
        if (!valid || sub != 0) continue;
        if (cleared) cleared[i] = false;   // a per-id flag a later kernel sets (no memset launch)
        if (found >= 0) {
            const i64 slot = found;
            slots_out[i] = slot;
            if (hit_out) hit_out[i] = true;
            if (flags & (8 | 16)) {   // once per slot per tick: the first toucher sees another tick
                const i64 old = (i64)atomicExch((u64*)(last_used + slot), (u64)tick);
                if (old != tick && (flags & 8)) uses[slot] += 1;
                if (old != tick && (flags & 16)) {
                    unsigned* header = reinterpret_cast<unsigned*>(headers + slot * row_bytes);
                    header[1] = min(header[1], MAX_COUNT) + 1u;   // count
                    header[2] = now;                              // last_access
                }
            } else if (flags & 1) {
                last_used[slot] = tick;
            }
            if ((flags & 32) && atomicExch(marks + slot, (unsigned)epoch) == (unsigned)epoch) *repeated = 1;
        } else {
            slots_out[i] = -1;
            if (hit_out) hit_out[i] = false;
            if (repeated) repeated[1] = 1;
            if (flags & 2) {
                const u64 prev = atomicExch(heads + set, (epoch << 32) | (u64)(i + 1));
                next[i] = (prev >> 32) == epoch ? (int)(prev & 0xffffffffu) - 1 : -1;
            }
        }
    }
}

// --- victim choice and slot claims ---------------------------------------------
//
// One warp per set with new ids: the warp of the set's list head (the last new id the
// probe linked) ranks the set's new ids in batch order and its ways in (key, way) order:
// empty first, then the policy's key; locked slots and slots this batch used are never
// victims. The id of rank r takes the way of rank r, so no slot goes to two ids; ids
// left without a way keep the probe's -1. Only this warp touches the set, so with
// `claim` it also records what each slot held (for write-back) and gives it to its id.

// The list's 32 smallest batch positions, ascending across the warp (INT_MAX: none); the
// list is head, then hop (= next[head], loaded ahead), then on through next.
__device__ __forceinline__ int first_positions(int head, int hop, const int* __restrict__ next, int lane) {
    int pos = lane == 0 ? head : 0x7fffffff;
    for (int node = hop; node >= 0; node = next[node]) {   // warp-uniform: every lane follows the list
        const int below = __popc(__ballot_sync(FULL, pos < node));
        const int up = __shfl_up_sync(FULL, pos, 1);
        if (lane > below) pos = up;
        else if (lane == below) pos = node;
    }
    return pos;
}

struct SetMeta {
    i64* keys;
    bool* occupied;
    bool* dirty;
    const int* locks;
    i64* last_used;
    i64* uses;
};

// One way of a set as read before the choice: loads issued together, the key computed later.
struct Way {
    bool occ, dirty;
    int lock, hop;   // hop: the set's second new id (next[head]), the same in every lane
    i64 lu, uses, key_held;

    __device__ __forceinline__ void load(const SetMeta& m, i64 slot, bool valid, int lfu, int claim,
                                         const int* __restrict__ next, int head) {
        occ = dirty = false; lock = 0; lu = uses = key_held = 0;
        hop = next[head];
        if (!valid) return;
        occ = m.occupied[slot];
        lu = m.last_used[slot];
        lock = m.locks[slot];
        if (lfu) uses = m.uses[slot];
        if (claim) {   // what a claim records, read with the rest
            key_held = m.keys[slot];
            dirty = m.dirty[slot];
        }
    }

    // Eviction key: empty first, then the policy's; locked slots and slots this batch used never.
    __device__ __forceinline__ i64 key(bool valid, int lfu, i64 tick) const {
        if (!valid || lock > 0 || (occ && lu == tick)) return NEVER;
        if (!occ) return EMPTY;
        return lfu ? (min(uses, LFU_CAP) << 32) | (lu & 0xffffffffll) : lu;
    }
};

struct Choice {
    int ways, lfu, claim;
    i64 tick;
    bool mark_dirty;
    const i64* ids;
    const int* next;
    i64* slots_out;
    i64* victim_keys;
    bool* victim_dirty;
};

#define SMALL 4   // sets with at most this many new ids are chosen by one thread or eight lanes

// Gives `slot` to the new id at batch position id_at, recording what the slot held.
__device__ __forceinline__ void claim_slot(const SetMeta& m, const Choice& c, i64 slot, int id_at, i64 held_key,
                                           bool held_dirty) {
    c.victim_keys[id_at] = held_key;
    c.victim_dirty[id_at] = held_dirty;
    m.keys[slot] = c.ids[id_at];
    m.occupied[slot] = true;
    m.dirty[slot] = c.mark_dirty;
    m.last_used[slot] = c.tick;
    m.uses[slot] = 1;
}

// Batch-order ranks of a set's new ids node[0..count) (at most SMALL, any order).
__device__ __forceinline__ void ranks_of(const int* node, int count, int* rank) {
#pragma unroll
    for (int k = 0; k < SMALL; ++k) {
        rank[k] = 0;
#pragma unroll
        for (int j = 0; j < SMALL; ++j) rank[k] += j < count && node[j] < node[k];
    }
}

__device__ __forceinline__ int node_of_rank(const int* node, const int* rank, int count, int r) {
    int id_at = node[0];
#pragma unroll
    for (int k = 1; k < SMALL; ++k)
        if (k < count && rank[k] == r) id_at = node[k];
    return id_at;
}

// The new id of rank r takes the way of rank r in (key, way) order: r + 1 rounds of taking
// the smallest (most sets get one or two new ids a batch).
__device__ __forceinline__ void choose_in_set(const SetMeta& m, const Choice& c, i64 set, const Way& way,
                                              int head, int lane) {
    const i64 slot = set * c.ways + lane;
    const i64 key = way.key(lane < c.ways, c.lfu, c.tick);
    const int pos = first_positions(head, way.hop, c.next, lane);
    const int count = min(__popc(__ballot_sync(FULL, pos != 0x7fffffff)), c.ways);
    bool taken = false;
    for (int r = 0; r < count; ++r) {
        i64 best_key = taken ? NEVER : key;
        int best_way = taken ? 64 + lane : lane;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const i64 other_key = __shfl_xor_sync(FULL, best_key, o);
            const int other_way = __shfl_xor_sync(FULL, best_way, o);
            if (other_key < best_key || (other_key == best_key && other_way < best_way)) {
                best_key = other_key;
                best_way = other_way;
            }
        }
        if (best_key == NEVER) break;   // warp-uniform: no usable way left
        const int node = __shfl_sync(FULL, pos, r);
        if (lane != best_way) continue;
        taken = true;
        c.slots_out[node] = slot;
        if (c.claim) claim_slot(m, c, slot, node, way.key_held, way.occ && way.dirty);
    }
}

// Eviction key of one way read on its own (the thread path below).
__device__ __forceinline__ i64 way_key(const SetMeta& m, i64 slot, int lfu, i64 tick) {
    Way way;
    way.occ = m.occupied[slot];
    way.lu = m.last_used[slot];
    way.lock = m.locks[slot];
    way.uses = lfu ? m.uses[slot] : 0;
    return way.key(true, lfu, tick);
}

// One thread for a set with L <= SMALL new ids (node[0..L), any order): the new id of rank r
// takes the way found by the r-th pass over the set's ways, each pass taking the smallest
// (key, way) not taken yet: the warp path's choice, with the sets of a warp in parallel.
__device__ void choose_small(const SetMeta& m, const Choice& c, i64 set, const int* node, int count) {
    int rank[SMALL];
    ranks_of(node, count, rank);
    unsigned taken = 0;
    for (int r = 0; r < count && r < c.ways; ++r) {
        i64 best = NEVER;
        int best_way = -1;
#pragma unroll 8
        for (int w = 0; w < c.ways; ++w) {
            const i64 key = (taken >> w) & 1 ? NEVER : way_key(m, set * c.ways + w, c.lfu, c.tick);
            if (key < best) {
                best = key;
                best_way = w;
            }
        }
        if (best_way < 0) return;   // no usable way left
        taken |= 1u << best_way;
        const int id_at = node_of_rank(node, rank, count, r);
        const i64 slot = set * c.ways + best_way;
        c.slots_out[id_at] = slot;
        if (!c.claim) continue;
        const bool occ = m.occupied[slot];
        claim_slot(m, c, slot, id_at, m.keys[slot], occ && m.dirty[slot]);
    }
}

// Eight lanes for a set of 32 ways with at most SMALL new ids (node[0..count), any order; count
// 0: an idle group), four ways a lane read as vectors; a warp serves four such sets at once.
// The same choice as the other paths: rank r takes the r-th smallest (key, way) not taken.
__device__ void choose_group(const SetMeta& m, const Choice& c, i64 set, const int* node, int count, int lane) {
    const int sub = lane & 7;
    const i64 first = set * 32 + sub * 4;
    i64 key[4], held[4];
    unsigned occ = 0, dirt = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) key[j] = held[j] = NEVER;
    if (count > 0) {
        const longlong2 lu0 = reinterpret_cast<const longlong2*>(m.last_used + first)[0];
        const longlong2 lu1 = reinterpret_cast<const longlong2*>(m.last_used + first)[1];
        const int4 lock = *reinterpret_cast<const int4*>(m.locks + first);
        occ = *reinterpret_cast<const unsigned*>(m.occupied + first);
        longlong2 u0 = {0, 0}, u1 = {0, 0};
        if (c.lfu) {
            u0 = reinterpret_cast<const longlong2*>(m.uses + first)[0];
            u1 = reinterpret_cast<const longlong2*>(m.uses + first)[1];
        }
        if (c.claim) {
            const longlong2 k0 = reinterpret_cast<const longlong2*>(m.keys + first)[0];
            const longlong2 k1 = reinterpret_cast<const longlong2*>(m.keys + first)[1];
            held[0] = k0.x; held[1] = k0.y; held[2] = k1.x; held[3] = k1.y;
            dirt = *reinterpret_cast<const unsigned*>(m.dirty + first);
        }
        const i64 lu[4] = {lu0.x, lu0.y, lu1.x, lu1.y}, uses[4] = {u0.x, u0.y, u1.x, u1.y};
        const int locks[4] = {lock.x, lock.y, lock.z, lock.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            Way way;
            way.occ = (occ >> (8 * j)) & 0xff;
            way.lu = lu[j];
            way.lock = locks[j];
            way.uses = uses[j];
            key[j] = way.key(true, c.lfu, c.tick);
        }
    }
    int rank[SMALL];
    ranks_of(node, count, rank);
    int rounds = count;
    rounds = max(rounds, __shfl_xor_sync(FULL, rounds, 8));
    rounds = max(rounds, __shfl_xor_sync(FULL, rounds, 16));
    unsigned taken = 0;
    bool done = count == 0;
    for (int r = 0; r < rounds; ++r) {   // warp-uniform: every lane takes part in the shuffles
        i64 best_key = NEVER;
        int best_way = 64 + lane;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (!((taken >> j) & 1) && key[j] < best_key) {
                best_key = key[j];
                best_way = sub * 4 + j;
            }
#pragma unroll
        for (int o = 4; o > 0; o >>= 1) {   // within the group of eight
            const i64 other_key = __shfl_xor_sync(FULL, best_key, o);
            const int other_way = __shfl_xor_sync(FULL, best_way, o);
            if (other_key < best_key || (other_key == best_key && other_way < best_way)) {
                best_key = other_key;
                best_way = other_way;
            }
        }
        done |= r >= count || best_key == NEVER;
        if (done || (best_way >> 2) != sub) continue;
        const int j = best_way & 3;
        taken |= 1u << j;
        const int id_at = node_of_rank(node, rank, count, r);
        const i64 slot = set * 32 + best_way;
        c.slots_out[id_at] = slot;
        if (!c.claim) continue;
        i64 was = 0;
#pragma unroll
        for (int q = 0; q < 4; ++q)
            if (q == j) was = held[q];
        claim_slot(m, c, slot, id_at, was, ((occ >> (8 * j)) & 0xff) && ((dirt >> (8 * j)) & 0xff));
    }
}

// Lane l of a warp checks id base + l. Sets it leads with few new ids are served by groups
// of eight lanes, four at once (32 ways), or by the lane alone (other way counts); the warp
// then serves the other sets together, the next set's ways loading while it chooses in this one.
extern "C" __global__ void choose_victims(const i64* __restrict__ ids, i64* keys, bool* occupied,
                                          const int* __restrict__ locks, i64* last_used, i64* uses,
                                          i64 num_sets, int ways, int lfu, i64 tick,
                                          const u64* __restrict__ heads, const int* __restrict__ next,
                                          const bool* __restrict__ hit, i64 n, u64 epoch,
                                          i64* __restrict__ slots_out, int claim, bool* dirty, bool mark_dirty,
                                          i64* __restrict__ victim_keys, bool* __restrict__ victim_dirty) {
    const int lane = threadIdx.x & 31;
    const SetMeta m = {keys, occupied, dirty, locks, last_used, uses};
    const Choice c = {ways, lfu, claim, tick, mark_dirty, ids, next, slots_out, victim_keys, victim_dirty};
    for (i64 base = warp_id_global() * 32; base < n; base += warps_total() * 32) {
        const i64 i = base + lane;
        i64 set = 0;
        bool lead = false;
        if (i < n && !hit[i]) {
            set = set_of(ids[i], num_sets);
            lead = heads[set] == ((epoch << 32) | (u64)(i + 1));
        }
        int node[SMALL] = {-1, -1, -1, -1}, count = 0, hop = lead ? (int)i : -1;
#pragma unroll
        for (int k = 0; k <= SMALL; ++k) {   // the set's list, up to one past SMALL
            if (hop < 0) break;
            if (k < SMALL) node[k] = hop;
            count = k + 1;
            hop = k < SMALL ? next[hop] : -1;
        }
        if (ways == 32) {
            for (unsigned small = __ballot_sync(FULL, lead && count <= SMALL); small;) {
                int src = -1;   // group g serves the g-th set of the round
#pragma unroll
                for (int g = 0; g < 4; ++g) {
                    if (g == (lane >> 3) && small) src = __ffs(small) - 1;
                    small &= small ? small - 1 : 0;
                }
                const int from = src < 0 ? 0 : src;
                const i64 s = __shfl_sync(FULL, set, from);
                const int cnt = __shfl_sync(FULL, count, from);
                int group_node[SMALL];
#pragma unroll
                for (int k = 0; k < SMALL; ++k) group_node[k] = __shfl_sync(FULL, node[k], from);
                choose_group(m, c, s, group_node, src < 0 ? 0 : cnt, lane);
            }
        } else if (lead && count <= SMALL) {
            choose_small(m, c, set, node, count);
        }
        unsigned todo = __ballot_sync(FULL, lead && count > SMALL);
        if (!todo) continue;
        int src = __ffs(todo) - 1;
        i64 s = __shfl_sync(FULL, set, src);
        Way way;
        way.load(m, s * ways + lane, lane < ways, lfu, claim, next, (int)(base + src));
        while (true) {
            todo &= todo - 1;
            const int cur_src = src;
            const i64 cur_set = s;
            const Way cur = way;
            if (todo) {
                src = __ffs(todo) - 1;
                s = __shfl_sync(FULL, set, src);
                way.load(m, s * ways + lane, lane < ways, lfu, claim, next, (int)(base + src));
            }
            choose_in_set(m, c, cur_set, cur, (int)(base + cur_src), lane);
            if (!todo) break;
        }
    }
}

// --- slot fills and header touches ---------------------------------------------

// Metadata of filled slots (entries of -1 skipped); dirty_src may be null (then dirty_value).
// A row placed outside its home set (a spill) marks that set `spilled`, so probes look next door.
extern "C" __global__ void fill_meta(const i64* __restrict__ slots, const i64* __restrict__ ids, i64 n,
                          i64* keys, bool* occupied, bool* dirty, const bool* __restrict__ dirty_src,
                          bool dirty_value, i64* last_used, i64* uses, i64 tick, i64 num_sets, int ways,
                          bool* spilled) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 slot = slots[i];
        if (slot < 0) continue;
        keys[slot] = ids[i];
        occupied[slot] = true;
        dirty[slot] = dirty_src ? dirty_src[i] : dirty_value;
        last_used[slot] = tick;
        uses[slot] = 1;
        const i64 home = set_of(ids[i], num_sets);
        if (slot / ways != home) spilled[home] = true;
    }
}

// Per-slot writes of one value (duplicates and slots of -1 allowed): the batch stamp of used
// slots, or the dirty flag. A kernel each, where CuPy's put and scatter cost 75-110 us of CPU a call.
extern "C" __global__ void stamp_slots(const i64* __restrict__ slots, i64 n, i64* __restrict__ stamps, i64 value) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        if (slots[i] >= 0) stamps[slots[i]] = value;
}

extern "C" __global__ void flag_slots(const i64* __restrict__ slots, i64 n, bool* __restrict__ flags, bool value) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        if (slots[i] >= 0) flags[slots[i]] = value;
}

// The slots of the dirty rows, then of the clean rows, that `slots` (chosen for new ids)
// displace, each kind in batch order, packed into out[0..); counts[0] = how many dirty,
// counts[1] = how many clean. One block of 1,024 threads scans 1,024 entries a round (ballots
// and a warp scan): no scan kernels and no wait between the passes.
extern "C" __global__ void __launch_bounds__(1024) pack_victims(const i64* __restrict__ slots, i64 n,
                                                                const bool* __restrict__ occupied,
                                                                const bool* __restrict__ dirty,
                                                                i64* __restrict__ out, i64* __restrict__ counts) {
    __shared__ int before[32];
    __shared__ int round_total;
    __shared__ i64 base;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (threadIdx.x == 0) base = 0;
    __syncthreads();
    for (int kind = 0; kind < 2; ++kind) {
        const i64 first = base;
        for (i64 start = 0; start < n; start += blockDim.x) {
            const i64 i = start + threadIdx.x;
            const i64 slot = i < n ? slots[i] : -1;
            const bool take = slot >= 0 && occupied[slot] && dirty[slot] == (kind == 0);
            const unsigned ballot = __ballot_sync(FULL, take);
            if (lane == 0) before[warp] = __popc(ballot);
            __syncthreads();
            if (warp == 0) {
                const int mine = lane < warps ? before[lane] : 0;
                int sum = mine;
                for (int d = 1; d < 32; d <<= 1) {
                    const int other = __shfl_up_sync(FULL, sum, d);
                    if (lane >= d) sum += other;
                }
                if (lane < warps) before[lane] = sum - mine;
                if (lane == 31) round_total = sum;
            }
            __syncthreads();
            if (take) out[base + before[warp] + __popc(ballot & ((1u << lane) - 1u))] = slot;
            __syncthreads();
            if (threadIdx.x == 0) base += round_total;
            __syncthreads();
        }
        if (threadIdx.x == 0) counts[kind] = base - first;
        __syncthreads();
    }
}

// How many of n slots are occupied (flags set) or locked (count > 0), for stats: a sum a
// thread, a warp's sum by shuffles, one atomic a warp. Kernels of this module, where CuPy's
// `.sum()` compiled a CUB reduction (2 s with NVRTC) on a fresh server's first Stats call.
__device__ __forceinline__ void add_warp_sum(unsigned long long mine, unsigned long long* count) {
    for (int d = 16; d > 0; d >>= 1) mine += __shfl_down_sync(FULL, mine, d);
    if ((threadIdx.x & 31) == 0 && mine) atomicAdd(count, mine);
}

extern "C" __global__ void count_set(const bool* __restrict__ flags, i64 n, unsigned long long* __restrict__ count) {
    unsigned long long mine = 0;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) mine += flags[i];
    add_warp_sum(mine, count);
}

extern "C" __global__ void count_locked(const int* __restrict__ locks, i64 n, unsigned long long* __restrict__ count) {
    unsigned long long mine = 0;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) mine += locks[i] > 0;
    add_warp_sum(mine, count);
}

// How many ids want a way of the next set (their slot is -1 or would displace a row) while
// that set has a way neither occupied nor locked: when none, the spill has nothing to do.
extern "C" __global__ void spill_candidates(const i64* __restrict__ ids, const i64* __restrict__ slots, i64 n,
                                            const bool* __restrict__ occupied, const int* __restrict__ locks,
                                            i64 num_sets, int ways, unsigned long long* __restrict__ count) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 slot = slots[i];
        if (slot >= 0 && !occupied[slot]) continue;
        const i64 near = (set_of(ids[i], num_sets) + 1) % num_sets;
        for (int w = 0; w < ways; ++w) {
            const i64 at = near * ways + w;
            if (!occupied[at] && locks[at] == 0) {
                atomicAdd(count, 1ull);
                break;
            }
        }
    }
}

// Header of written or accessed rows: count += 1 (saturating), last_access = now (unix seconds).
extern "C" __global__ void touch_headers(char* headers, i64 row_bytes, const i64* __restrict__ idx, i64 n, unsigned now) {
    for (i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x; r < n; r += (i64)gridDim.x * blockDim.x) {
        const i64 row = idx ? idx[r] : r;
        if (row < 0) continue;
        unsigned* header = reinterpret_cast<unsigned*>(headers + row * row_bytes);
        header[1] = min(header[1], MAX_COUNT) + 1u;
        header[2] = now;
    }
}

// --- non-finite rows -------------------------------------------------------------

// Whether element e of p (`size`-byte floats) has an all-ones exponent (NaN or Inf): `exponent`
// is the format's exponent mask (float64, float32, float16 and bfloat16 differ).
__device__ __forceinline__ bool nonfinite_at(const char* p, int e, int size, u64 exponent) {
    u64 bits;
    if (size == 8) bits = reinterpret_cast<const u64*>(p)[e];
    else if (size == 4) bits = reinterpret_cast<const unsigned*>(p)[e];
    else bits = reinterpret_cast<const unsigned short*>(p)[e];
    return (bits & exponent) == exponent;
}

// out[r]: row r (rows `row_bytes` apart) holds NaN or Inf in its `dim` weights or its
// `state_dim` float32 state. One warp a row. A kernel of its own, compiled with the others,
// where CuPy's `isfinite().all(axis=1)` compiled a reduction per table shape on first use.
extern "C" __global__ void nonfinite_rows(const char* __restrict__ rows, i64 row_bytes, i64 n, i64 weight_off,
                                          int dim, int weight_size, u64 weight_exponent, i64 state_off,
                                          int state_dim, bool* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < n; r += warps) {
        const char* row = rows + r * row_bytes;
        bool bad = false;
        for (int e = lane; e < dim; e += 32) bad |= nonfinite_at(row + weight_off, e, weight_size, weight_exponent);
        for (int e = lane; e < state_dim; e += 32) bad |= nonfinite_at(row + state_off, e, 4, 0x7F800000ull);
        bad = __any_sync(FULL, bad);
        if (lane == 0) out[r] = bad;
    }
}

// --- row copies ---------------------------------------------------------------
//
// Copies `units` T-sized units from row src_idx[r] of src to row dst_idx[r] of dst (a
// null index means r; a negative index skips the row); unit u of the destination row takes
// unit (u + rot) mod units of the source row (0 <= rot < units: whole rows moved to or from
// the slab's rotated layout in one launch). Gather, scatter, write-back
// extraction and fills are all this one kernel. 2^lg threads per row, R rows in flight
// per group, and the next round's row indices loaded while this round's bytes move. Plain
// loads and stores: with evict-first hints (__ldcs/__stcs) a gather of 1M random 512-byte rows
// ran at 0.78 of copy bandwidth against 0.81 without (H200, same run).

template <int R>
__device__ __forceinline__ void row_indices(const i64* __restrict__ idx, i64 r, i64 groups, i64 n, i64* out) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
        const i64 row = r + k * groups;
        out[k] = row < n ? (idx ? idx[row] : row) : -1;
    }
}

template <typename T, int R>
__global__ void __launch_bounds__(256, 4) copy_rows(const char* __restrict__ src, const i64* __restrict__ src_idx, i64 src_stride,
                          i64 src_off, char* __restrict__ dst, const i64* __restrict__ dst_idx,
                          i64 dst_stride, i64 dst_off, int units, i64 n, int lg, int rot) {
    const int sub = threadIdx.x & ((1 << lg) - 1);
    const i64 groups = ((i64)gridDim.x * blockDim.x) >> lg;
    i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> lg;
    i64 s[R], d[R];
    row_indices<R>(src_idx, r, groups, n, s);
    row_indices<R>(dst_idx, r, groups, n, d);
    for (; r < n; r += R * groups) {
        const T* from[R];
        T* to[R];
        bool go[R];
#pragma unroll
        for (int k = 0; k < R; ++k) {
            go[k] = s[k] >= 0 && d[k] >= 0;
            from[k] = reinterpret_cast<const T*>(src + s[k] * src_stride + src_off);
            to[k] = reinterpret_cast<T*>(dst + d[k] * dst_stride + dst_off);
        }
        row_indices<R>(src_idx, r + R * groups, groups, n, s);
        row_indices<R>(dst_idx, r + R * groups, groups, n, d);
        for (int u = sub; u < units; u += 1 << lg) {
            const int at = u + rot < units ? u + rot : u + rot - units;
            T v[R];
#pragma unroll
            for (int k = 0; k < R; ++k)
                if (go[k]) v[k] = from[k][at];
#pragma unroll
            for (int k = 0; k < R; ++k)
                if (go[k]) to[k][u] = v[k];
        }
    }
}

// --- duplicate sums -------------------------------------------------------------
//
// Ids sorted by their mix (the cache's set order), then one segment per id: mix_ids,
// a radix sort, segment_heads (1 where a sorted id differs from the one before), a scan of
// the heads, segment_index, then sum_segments.

extern "C" __global__ void mix_ids(const i64* __restrict__ ids, i64 n, u64* __restrict__ out) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = mix_of(ids[i]);
}

extern "C" __global__ void segment_heads(const u64* __restrict__ mixed, const i64* __restrict__ order, i64 n,
                                         i64* __restrict__ heads) {
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x)
        heads[j] = j == 0 || mixed[order[j]] != mixed[order[j - 1]];
}

// ends[j] = heads[0] + ... + heads[j] (inclusive scan): sorted position j is in segment
// ends[j] - 1; a head records its segment's start and id (and, given `values`, the value
// at its position: the slot when grouping by slot). `inverse` may be null.
extern "C" __global__ void segment_index(const i64* __restrict__ ids, const i64* __restrict__ order,
                                         const i64* __restrict__ heads, const i64* __restrict__ ends, i64 n,
                                         i64* __restrict__ starts, i64* __restrict__ uniq,
                                         i64* __restrict__ inverse, const i64* __restrict__ values,
                                         i64* __restrict__ uniq_values) {
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        const i64 u = ends[j] - 1, at = order[j];
        if (inverse) inverse[at] = u;
        if (heads[j]) {
            starts[u] = j;
            uniq[u] = ids[at];
            if (values) uniq_values[u] = values[at];
        }
    }
}
//
// out[u] = the sum of gradient rows grads[order[j]], j in [starts[u], starts[u + 1]) (the
// last segment ends at n): rows sorted by id, one segment per id. One warp per segment,
// SEGS segments a warp in flight. VEC (dim % 4 == 0, dim <= 128, rows 16-byte aligned):
// lane l sums elements 4l..4l+3 as one vector.

__device__ __forceinline__ void add4(float4& acc, const float4 g) {
    acc.x += g.x; acc.y += g.y; acc.z += g.z; acc.w += g.w;
}

#define SEGS 4

extern "C" __global__ void __launch_bounds__(256, 4) sum_segments(const float* __restrict__ grads, const i64* __restrict__ order,
                                        const i64* __restrict__ starts, i64 segments, i64 n, int dim, int vec,
                                        float* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const i64 stride = warps_total();
    if (!vec) {
        for (i64 u = warp_id_global(); u < segments; u += stride) {
            const i64 begin = starts[u], end = u + 1 < segments ? starts[u + 1] : n;
            for (int d = lane; d < dim; d += 32) {
                float acc = 0.f;
                for (i64 j = begin; j < end; ++j) acc += grads[order[j] * dim + d];
                out[u * dim + d] = acc;
            }
        }
        return;
    }
    const int d = 4 * lane;
    for (i64 u = warp_id_global(); u < segments; u += SEGS * stride) {
        i64 begin[SEGS], end[SEGS];
        float4 acc[SEGS];
#pragma unroll
        for (int k = 0; k < SEGS; ++k) {
            const i64 s = u + k * stride;
            begin[k] = s < segments ? starts[s] : n;
            end[k] = s + 1 < segments ? starts[s + 1] : n;
        }
#pragma unroll
        for (int k = 0; k < SEGS; ++k) {
            acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (begin[k] < end[k] && d < dim)
                acc[k] = __ldcs(reinterpret_cast<const float4*>(grads + order[begin[k]] * dim + d));
        }
#pragma unroll
        for (int k = 0; k < SEGS; ++k) {
            if (begin[k] >= end[k]) continue;
            for (i64 j = begin[k] + 1; j < end[k]; ++j)
                if (d < dim) add4(acc[k], __ldcs(reinterpret_cast<const float4*>(grads + order[j] * dim + d)));
            if (d < dim) *reinterpret_cast<float4*>(out + (u + k * stride) * dim + d) = acc[k];
        }
    }
}
