// Kernels of the GPU cache tier: set probe, victim choice, slot claims, row
// copies and fused optimizer steps. Compiled at run time through
// cupy.RawModule (NVRTC); no headers beyond what NVRTC provides.
//
// Layout shared with kvstore/cache.py and kvstore/rows.py: slot = set * ways + way;
// keys int64, occupied/dirty bool (1 byte), locks int32, last_used/uses int64;
// slab rows of row_bytes: 16-byte header | weights | float32 state.
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

__device__ __forceinline__ i64 set_of(i64 id, i64 num_sets) {
    u64 h = (u64)id * GOLDEN;
    h ^= h >> 32;
    h *= MIX;
    h ^= h >> 32;
    return (i64)(((h >> 32) * (u64)num_sets) >> 32);   // top 32 bits scaled: sets grow with h
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
//        4 = treat every id as new (choose_slots on ids known to be uncached).
// Per-set lists: head[set] = (epoch << 32) | (position + 1) of the last miss
// linked; a head with another epoch is empty, so heads need no clearing.

template <int G, int WPL>
__global__ void probe(const i64* __restrict__ keys, const bool* __restrict__ occupied,
                      const i64* __restrict__ ids, i64 n, i64 num_sets, int ways,
                      i64* __restrict__ slots_out, bool* __restrict__ hit_out,
                      i64* last_used, i64* uses, i64 tick, int flags,
                      u64* heads, int* next, u64 epoch, char* slab, i64 row_bytes, unsigned now) {
    const int lane = threadIdx.x & 31;
    const int group = lane / G;
    const int sub = lane % G;
    const int per_warp = 32 / G;
    for (i64 base = warp_id_global() * per_warp; base < n; base += warps_total() * per_warp) {
        const i64 i = base + group;
        const bool valid = i < n;
        const i64 id = valid ? ids[i] : 0;
        const i64 set = set_of(id, num_sets);
        const i64 first = set * ways;
        int local = WPL;    // first matching way of this lane's ways
        if (valid && !(flags & 4)) {
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
        }
        const unsigned ballot = __ballot_sync(FULL, local < WPL);
        const unsigned mine = (ballot >> (group * G)) & (G == 32 ? FULL : ((1u << G) - 1));
        const int src = mine ? __ffs(mine) - 1 : 0;
        const int src_local = __shfl_sync(FULL, local, group * G + src);
        if (!valid || sub != 0) continue;
        if (mine) {
            const i64 slot = first + src * WPL + src_local;
            slots_out[i] = slot;
            if (hit_out) hit_out[i] = true;
            if (flags & (8 | 16)) {   // once per slot per tick: the first toucher sees another tick
                const i64 old = (i64)atomicExch((u64*)(last_used + slot), (u64)tick);
                if (old != tick && (flags & 8)) uses[slot] += 1;
                if (old != tick && (flags & 16)) {
                    unsigned* header = reinterpret_cast<unsigned*>(slab + slot * row_bytes);
                    header[1] = min(header[1], MAX_COUNT) + 1u;   // count
                    header[2] = now;                              // last_access
                }
            } else if (flags & 1) {
                last_used[slot] = tick;
            }
        } else {
            slots_out[i] = -1;
            if (hit_out) hit_out[i] = false;
            if (flags & 2) {
                const u64 prev = atomicExch(heads + set, (epoch << 32) | (u64)(i + 1));
                next[i] = (prev >> 32) == epoch ? (int)(prev & 0xffffffffu) - 1 : -1;
            }
        }
    }
}

// --- victim choice -----------------------------------------------------------
//
// One warp per missed id (hits skip). Its rank among the batch's new ids of its set is the
// number of earlier batch positions in the set's list (the host ranks new ids
// of a set in batch order). Ways are ordered by (key, way): empty first, then
// the policy's key; locked slots and slots this batch used are never victims.
// The id of rank r takes the way of rank r, so no slot goes to two ids.
// Reads only: claims happen in claim_slots, after every warp has chosen.

extern "C" __global__ void choose_victims(const i64* __restrict__ ids, const i64* __restrict__ keys,
                               const bool* __restrict__ occupied, const int* __restrict__ locks,
                               const i64* __restrict__ last_used, const i64* __restrict__ uses,
                               i64 num_sets, int ways, int lfu, i64 tick,
                               const u64* __restrict__ heads, const int* __restrict__ next,
                               const bool* __restrict__ hit, i64 n, u64 epoch, i64* __restrict__ slots_out) {
    const int lane = threadIdx.x & 31;
    for (i64 i = warp_id_global(); i < n; i += warps_total()) {
        if (hit[i]) continue;   // warp-uniform
        const i64 set = set_of(ids[i], num_sets);
        i64 key = NEVER;             // this lane's way: its eviction key (loads issued before the walk)
        if (lane < ways) {
            const i64 slot = set * ways + lane;
            const bool occ = occupied[slot];
            const i64 lu = last_used[slot];
            if (!occ) key = EMPTY;
            else if (lfu) key = (min(uses[slot], LFU_CAP) << 32) | (lu & 0xffffffffll);
            else key = lu;
            if (locks[slot] > 0 || (occ && lu == tick)) key = NEVER;
        }
        int rank = 0;
        if (lane == 0) {
            const u64 h = heads[set];
            int node = (h >> 32) == epoch ? (int)(h & 0xffffffffu) - 1 : -1;
            while (node >= 0 && rank < ways) {
                rank += node < i;
                node = next[node];
            }
        }
        rank = __shfl_sync(FULL, rank, 0);
        // The way of rank `rank` in (key, way) order: take the smallest rank + 1 times.
        i64 slot = -1;
        if (rank < ways) {
            bool taken = false;
            i64 best_key = NEVER;
            int best_way = 0;
            for (int step = 0; step <= rank; ++step) {
                best_key = taken ? NEVER : key;
                best_way = (taken || lane >= ways) ? 64 + lane : lane;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    const i64 other_key = __shfl_xor_sync(FULL, best_key, o);
                    const int other_way = __shfl_xor_sync(FULL, best_way, o);
                    if (other_key < best_key || (other_key == best_key && other_way < best_way)) {
                        best_key = other_key;
                        best_way = other_way;
                    }
                }
                taken |= lane == best_way;
            }
            if (best_key != NEVER && best_way < ways) slot = set * ways + best_way;
        }
        if (lane == 0) slots_out[i] = slot;
    }
}

// --- slot claims and fills ----------------------------------------------------

// One thread per missed id: record what its slot held (for write-back), then
// give the slot to the id. Runs after choose_victims, so every choice saw the
// set as it was before the batch's claims.
extern "C" __global__ void claim_slots(const i64* __restrict__ ids, const bool* __restrict__ hit, i64 n,
                            const i64* __restrict__ slots, i64* keys, bool* occupied, bool* dirty,
                            i64* last_used, i64* uses, i64 tick, bool mark_dirty,
                            i64* __restrict__ victim_keys, bool* __restrict__ victim_dirty) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 slot = slots[i];
        if (hit[i] || slot < 0) continue;
        victim_keys[i] = keys[slot];
        victim_dirty[i] = occupied[slot] && dirty[slot];
        keys[slot] = ids[i];
        occupied[slot] = true;
        dirty[slot] = mark_dirty;
        last_used[slot] = tick;
        uses[slot] = 1;
    }
}

// Metadata of filled slots (entries of -1 skipped); dirty_src may be null (then dirty_value).
extern "C" __global__ void fill_meta(const i64* __restrict__ slots, const i64* __restrict__ ids, i64 n,
                          i64* keys, bool* occupied, bool* dirty, const bool* __restrict__ dirty_src,
                          bool dirty_value, i64* last_used, i64* uses, i64 tick) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 slot = slots[i];
        if (slot < 0) continue;
        keys[slot] = ids[i];
        occupied[slot] = true;
        dirty[slot] = dirty_src ? dirty_src[i] : dirty_value;
        last_used[slot] = tick;
        uses[slot] = 1;
    }
}

// Header of written or accessed rows: count += 1 (saturating), last_access = now (unix seconds).
extern "C" __global__ void touch_headers(char* rows, i64 row_bytes, const i64* __restrict__ idx, i64 n, unsigned now) {
    for (i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x; r < n; r += (i64)gridDim.x * blockDim.x) {
        const i64 row = idx ? idx[r] : r;
        if (row < 0) continue;
        unsigned* header = reinterpret_cast<unsigned*>(rows + row * row_bytes);
        header[1] = min(header[1], MAX_COUNT) + 1u;
        header[2] = now;
    }
}

// --- row copies ---------------------------------------------------------------
//
// Copies `units` T-sized units from row src_idx[r] of src to row dst_idx[r] of
// dst (a null index means r; a negative index skips the row). Gather, scatter,
// write-back extraction and fills are all this one kernel. 2^lg threads per row,
// two rows in flight per group.

template <typename T>
__global__ void copy_rows(const char* __restrict__ src, const i64* __restrict__ src_idx, i64 src_stride,
                          i64 src_off, char* __restrict__ dst, const i64* __restrict__ dst_idx,
                          i64 dst_stride, i64 dst_off, int units, i64 n, int lg) {
    const int sub = threadIdx.x & ((1 << lg) - 1);
    const i64 groups = ((i64)gridDim.x * blockDim.x) >> lg;
    for (i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> lg; r < n; r += 2 * groups) {
        const i64 r2 = r + groups;
        const i64 s1 = src_idx ? src_idx[r] : r;
        const i64 d1 = dst_idx ? dst_idx[r] : r;
        const bool ok2 = r2 < n;
        const i64 s2 = ok2 ? (src_idx ? src_idx[r2] : r2) : -1;
        const i64 d2 = ok2 ? (dst_idx ? dst_idx[r2] : r2) : -1;
        const bool go1 = s1 >= 0 && d1 >= 0, go2 = s2 >= 0 && d2 >= 0;
        const T* from1 = reinterpret_cast<const T*>(src + s1 * src_stride + src_off);
        const T* from2 = reinterpret_cast<const T*>(src + s2 * src_stride + src_off);
        T* to1 = reinterpret_cast<T*>(dst + d1 * dst_stride + dst_off);
        T* to2 = reinterpret_cast<T*>(dst + d2 * dst_stride + dst_off);
        for (int u = sub; u < units; u += 1 << lg) {
            T a, b;
            if (go1) a = from1[u];
            if (go2) b = from2[u];
            if (go1) to1[u] = a;
            if (go2) to2[u] = b;
        }
    }
}
