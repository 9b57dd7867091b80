// Ceilings for bench/gpu_cache.py: what an access pattern of the GPU tier allows with nothing
// computed. Compiled by the bench alone (never part of a server's modules).

typedef long long i64;

#define RMW_VECS 4   // 16-byte vectors a lane holds: rows of up to 32 * 4 * 16 = 2,048 bytes

// The fused optimizer step's memory traffic without its arithmetic: warp r reads gradient row r
// (`grad_bytes`, consecutive rows), reads the `row_bytes` row in slot idx[r] of a slab whose rows
// lie `pitch` bytes apart, adds a word of the gradient into each 16 bytes it read, writes the row
// back and sets the slot's dirty byte. Every load a lane makes is issued before its first store.
// row_bytes and grad_bytes are multiples of 16, at most 2,048; slab, pitch and grads 16-byte aligned.
extern "C" __global__ void step_traffic(char* slab, i64 pitch, int row_bytes, const i64* __restrict__ idx, i64 n,
                                        const char* __restrict__ grads, int grad_bytes, unsigned char* dirty) {
    const i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= n) return;
    const i64 slot = idx[r];
    uint4* row = reinterpret_cast<uint4*>(slab + slot * pitch);
    const uint4* grad = reinterpret_cast<const uint4*>(grads + r * grad_bytes);
    const int vecs = row_bytes / 16, grad_vecs = grad_bytes / 16;
    uint4 held[RMW_VECS], g[RMW_VECS];
#pragma unroll
    for (int k = 0; k < RMW_VECS; ++k) {
        const int v = lane + 32 * k;
        if (v < vecs) held[k] = row[v];
        if (v < grad_vecs) g[k] = grad[v];
    }
#pragma unroll
    for (int k = 0; k < RMW_VECS; ++k) {
        const int v = lane + 32 * k;
        if (v < vecs) {
            held[k].x += v < grad_vecs ? g[k].x : 1u;
            row[v] = held[k];
        }
    }
    if (lane == 0) dirty[slot] = 1;
}
