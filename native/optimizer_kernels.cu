// Fused optimizer steps of the GPU cache tier. Compiled as one unit after
// cache_kernels.cu (kvstore/gpu_kernels.py joins the two), whose typedefs and
// warp helpers it uses.
//
// One warp per row: reads the row's summed gradient (float32), updates weights
// (table dtype, float32 math) and float32 state in place, bumps the header's
// step (and with `touch` its count and last_access), marks the slot dirty.
// OPT: 0 sgd, 1 adagrad, 2 rowwise_adagrad, 3 adam, 4 partial_rowwise_adam. State: adagrad G[dim]; rowwise G[1]; adam m[dim] v[dim];
// partial rowwise adam m[dim] v[1]. g' = g + weight_decay * w.

struct half_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

__device__ __forceinline__ float load_w(const float* p) { return *p; }
__device__ __forceinline__ float load_w(const double* p) { return (float)*p; }
__device__ __forceinline__ float load_w(const half_t* p) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));
    return f;
}
__device__ __forceinline__ float load_w(const bf16_t* p) { return __uint_as_float((unsigned)p->bits << 16); }

__device__ __forceinline__ void store_w(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_w(double* p, float v) { *p = (double)v; }
__device__ __forceinline__ void store_w(half_t* p, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p->bits = h;
}
__device__ __forceinline__ void store_w(bf16_t* p, float v) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p->bits = h;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

struct Coeffs {
    float lr, eps, beta1, beta2, one_minus_beta1, one_minus_beta2, wd;
    float step_size, bias2_sqrt;   // Adam's bias corrections for this row's step
    float row_state;               // rowwise Adagrad G, partial rowwise Adam v (new values)
};

// One element: weight w (float32 math), decayed gradient gp, its state s1 (G or m) and s2 (v).
template <int OPT>
__device__ __forceinline__ float step_element(float w, float gp, float& s1, float& s2, const Coeffs& c) {
    if (OPT == 0) return w - c.lr * gp;
    if (OPT == 1) {
        s1 = s1 + gp * gp;
        return w - c.lr * gp / (sqrtf(s1) + c.eps);
    }
    if (OPT == 2) return w - c.lr * gp / (sqrtf(c.row_state) + c.eps);
    s1 = c.beta1 * s1 + c.one_minus_beta1 * gp;
    if (OPT == 3) {
        s2 = c.beta2 * s2 + c.one_minus_beta2 * (gp * gp);
        return w - c.step_size * s1 / (sqrtf(s2) / c.bias2_sqrt + c.eps);
    }
    return w - c.step_size * s1 / (sqrtf(c.row_state) / c.bias2_sqrt + c.eps);
}

// Where an element's state lives: s1 at st[d] (G or m), s2 at st[dim + d] (Adam's v).
template <int OPT>
__device__ __forceinline__ void load_state(const float* st, int d, int dim, float& s1, float& s2) {
    if (OPT == 1 || OPT >= 3) s1 = st[d];
    if (OPT == 3) s2 = st[dim + d];
}

template <int OPT>
__device__ __forceinline__ void store_state(float* st, int d, int dim, float s1, float s2) {
    if (OPT == 1 || OPT >= 3) st[d] = s1;
    if (OPT == 3) st[dim + d] = s2;
}

#define REG_ELEMS 4   // rows of dim <= 32 * REG_ELEMS are held in registers: every load issued at once

// Four consecutive elements as one load or store: 16 bytes of float32 (two for float64), 8 of the
// 16-bit types. The caller guarantees the alignment (see VEC at RowStep).
__device__ __forceinline__ void load4(const float* p, float* o) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}
__device__ __forceinline__ void store4(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void load4(const double* p, float* o) {
    const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
    o[0] = (float)a.x; o[1] = (float)a.y; o[2] = (float)b.x; o[3] = (float)b.y;
}
__device__ __forceinline__ void store4(double* p, const float* v) {
    reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
    reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}
template <typename H>   // half_t, bf16_t
__device__ __forceinline__ void load4_16(const H* p, float* o) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const H h[4] = {{(unsigned short)(v.x & 0xffff)}, {(unsigned short)(v.x >> 16)},
                    {(unsigned short)(v.y & 0xffff)}, {(unsigned short)(v.y >> 16)}};
#pragma unroll
    for (int k = 0; k < 4; ++k) o[k] = load_w(&h[k]);
}
template <typename H>
__device__ __forceinline__ void store4_16(H* p, const float* v) {
    H h[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) store_w(&h[k], v[k]);
    *reinterpret_cast<uint2*>(p) = make_uint2(h[0].bits | ((unsigned)h[1].bits << 16),
                                              h[2].bits | ((unsigned)h[3].bits << 16));
}
__device__ __forceinline__ void load4(const half_t* p, float* o) { load4_16(p, o); }
__device__ __forceinline__ void load4(const bf16_t* p, float* o) { load4_16(p, o); }
__device__ __forceinline__ void store4(half_t* p, const float* v) { store4_16(p, v); }
__device__ __forceinline__ void store4(bf16_t* p, const float* v) { store4_16(p, v); }

struct StepArgs {
    char* rows;          // the header of row 0; weights and state lie weight_off and state_off from a header
    i64 row_bytes;       // from one row's header to the next
    i64 weight_off;
    const i64* idx;
    const float* grads;
    const i64* order;    // not null: row r's gradient is the sum of rows order[j], j in segment r
    const i64* starts;   // of the segments, each up to the next start (the last up to total)
    i64 total;
    i64 n;
    int dim;
    i64 state_off;
    double lr64, beta1_64, beta2_64;
    const float2* bias;  // not null: Adam's (step size, sqrt(1 - beta2^t)) at step count t, the last row for later t
    i64 bias_steps;      // its rows
    bool* dirty;
    unsigned now;
    int touch;
};

// Gradient rows of row r: itself, or the rows of its segment (duplicate ids summed in the step).
template <int SEG>
__device__ __forceinline__ void grad_rows(const StepArgs& a, i64 r, i64& begin, i64& end) {
    if (!SEG) {
        begin = r;
        end = r + 1;
        return;
    }
    begin = a.starts[r];
    end = r + 1 < a.n ? a.starts[r + 1] : a.total;
}

template <int SEG>
__device__ __forceinline__ const float* grad_row(const StepArgs& a, i64 j) {
    return a.grads + (SEG ? a.order[j] : j) * a.dim;
}

template <int SEG>
__device__ __forceinline__ float grad_at(const StepArgs& a, i64 r, int d) {
    i64 begin, end;
    grad_rows<SEG>(a, r, begin, end);
    float g = grad_row<SEG>(a, begin)[d];
    for (i64 j = begin + 1; j < end; ++j) g += grad_row<SEG>(a, j)[d];
    return g;
}

// Adam's bias corrections at step count t: the host's own float32 values from its table
// (kvstore/optimizers.py: bias_correction_table), else computed in float64 as the host does.
__device__ __forceinline__ void bias_corrections(const StepArgs& a, unsigned t, Coeffs& c) {
    if (a.bias) {
        const float2 b = a.bias[min((i64)t, a.bias_steps - 1)];
        c.step_size = b.x;
        c.bias2_sqrt = b.y;
        return;
    }
    c.step_size = (float)(a.lr64 / (1.0 - pow(a.beta1_64, (double)t)));
    c.bias2_sqrt = (float)sqrt(1.0 - pow(a.beta2_64, (double)t));
}

template <int OPT>
__device__ __forceinline__ void finish_header(const StepArgs& a, char* base, float* st, i64 row, unsigned t,
                                              unsigned count, float row_state) {
    unsigned* header = reinterpret_cast<unsigned*>(base);
    if (OPT == 2) st[0] = row_state;
    if (OPT == 4) st[a.dim] = row_state;
    header[3] = t;           // step
    if (a.touch) {
        header[1] = min(count, MAX_COUNT) + 1u;   // count, read with the row (no second trip)
        header[2] = a.now;   // last_access
    }
    if (a.dirty) a.dirty[row] = true;
}

// One row of one optimizer step, split in two (loads, then the step and stores) so a warp can have
// ROWS rows' loads in flight and the next round's slots load while a round steps.
// VEC (dim % 4 == 0, dim <= 128, buffers 16-byte aligned): lane l holds elements 4l..4l+3,
// moved as vectors. A template argument, not a flag: the vector kernels carry no code of the
// other paths, so they need fewer registers and keep more warps (more loads) in flight.
template <typename W, int OPT, int VEC, int SEG>
struct RowStep {
    bool active;
    char* base;
    i64 row;
    unsigned t, count;
    float old;
    float wv[REG_ELEMS], gp[REG_ELEMS], s1[REG_ELEMS], s2[REG_ELEMS];

    // Issue every load of row r (registers path: dim <= 32 * REG_ELEMS).
    // Row r of the batch is slot `slot` (-1: none); the caller reads every slot of a round
    // first, so no row's loads wait behind another row's index.
    __device__ __forceinline__ void load(const StepArgs& a, i64 r, i64 slot, int lane) {
        row = slot;
        active = row >= 0;
        if (!active) return;
        base = a.rows + row * a.row_bytes;
        const W* w = reinterpret_cast<const W*>(base + a.weight_off);
        const float* st = reinterpret_cast<const float*>(base + a.state_off);
        t = count = 0;
        old = 0.f;
        if (lane == 0) {
            t = reinterpret_cast<const unsigned*>(base)[3] + 1;
            if (a.touch) count = reinterpret_cast<const unsigned*>(base)[1];
            if (OPT == 2) old = st[0];
            if (OPT == 4) old = st[a.dim];
        }
#pragma unroll
        for (int k = 0; k < REG_ELEMS; ++k) wv[k] = gp[k] = s1[k] = s2[k] = 0.f;
        if (VEC) {
            const int d = 4 * lane;
            if (d < a.dim) {
                load4(w + d, wv);
                i64 begin, end;
                grad_rows<SEG>(a, r, begin, end);
                load4(grad_row<SEG>(a, begin) + d, gp);
                for (i64 j = begin + 1; j < end; ++j) {
                    float more[4];
                    load4(grad_row<SEG>(a, j) + d, more);
#pragma unroll
                    for (int q = 0; q < 4; ++q) gp[q] += more[q];
                }
                if (OPT == 1 || OPT >= 3) load4(st + d, s1);
                if (OPT == 3) load4(st + a.dim + d, s2);
            }
            return;
        }
#pragma unroll
        for (int k = 0; k < REG_ELEMS; ++k) {
            const int d = lane + 32 * k;
            if (d < a.dim) {
                wv[k] = load_w(w + d);
                gp[k] = grad_at<SEG>(a, r, d);
                load_state<OPT>(st, d, a.dim, s1[k], s2[k]);
            }
        }
    }

    __device__ __forceinline__ void finish(const StepArgs& a, Coeffs c, int lane) {
        if (!active) return;   // warp-uniform
        W* w = reinterpret_cast<W*>(base + a.weight_off);
        float* st = reinterpret_cast<float*>(base + a.state_off);
        if (c.wd != 0.f) {   // without decay the row's mean g^2 waits on the gradient alone, not the weights
#pragma unroll
            for (int k = 0; k < REG_ELEMS; ++k) gp[k] = gp[k] + c.wd * wv[k];
        }
        float sq = 0.f;
#pragma unroll
        for (int k = 0; k < REG_ELEMS; ++k) sq += gp[k] * gp[k];
        t = __shfl_sync(FULL, t, 0);
        if (OPT >= 3) bias_corrections(a, t, c);
        if (OPT == 2 || OPT == 4) {
            const float mean = warp_sum(sq) / (float)a.dim;
            old = __shfl_sync(FULL, old, 0);
            c.row_state = OPT == 2 ? old + mean : c.beta2 * old + c.one_minus_beta2 * mean;
        }
#pragma unroll
        for (int k = 0; k < REG_ELEMS; ++k) wv[k] = step_element<OPT>(wv[k], gp[k], s1[k], s2[k], c);
        if (VEC) {
            const int d = 4 * lane;
            if (d < a.dim) {
                store4(w + d, wv);
                if (OPT == 1 || OPT >= 3) store4(st + d, s1);
                if (OPT == 3) store4(st + a.dim + d, s2);
            }
        } else {
#pragma unroll
            for (int k = 0; k < REG_ELEMS; ++k) {
                const int d = lane + 32 * k;
                if (d < a.dim) {
                    store_w(w + d, wv[k]);
                    store_state<OPT>(st, d, a.dim, s1[k], s2[k]);
                }
            }
        }
        if (lane == 0) finish_header<OPT>(a, base, st, row, t, count, c.row_state);
    }
};

// Rows wider than the registers path: element loops, one row at a time.
template <typename W, int OPT, int SEG>
__device__ void step_wide_row(const StepArgs& a, Coeffs c, i64 r, int lane) {
    const i64 row = a.idx ? a.idx[r] : r;
    if (row < 0) return;
    char* base = a.rows + row * a.row_bytes;
    W* w = reinterpret_cast<W*>(base + a.weight_off);
    float* st = reinterpret_cast<float*>(base + a.state_off);
    unsigned t = 0, count = 0;
    float old = 0.f;
    if (lane == 0) {
        t = reinterpret_cast<unsigned*>(base)[3] + 1;
        count = reinterpret_cast<unsigned*>(base)[1];
        if (OPT == 2) old = st[0];
        if (OPT == 4) old = st[a.dim];
    }
    t = __shfl_sync(FULL, t, 0);
    if (OPT >= 3) bias_corrections(a, t, c);
    if (OPT == 2 || OPT == 4) {
        float sq = 0.f;
        for (int d = lane; d < a.dim; d += 32) {
            const float x = grad_at<SEG>(a, r, d) + c.wd * load_w(w + d);
            sq += x * x;
        }
        const float mean = warp_sum(sq) / (float)a.dim;
        old = __shfl_sync(FULL, old, 0);
        c.row_state = OPT == 2 ? old + mean : c.beta2 * old + c.one_minus_beta2 * mean;
    }
    for (int d = lane; d < a.dim; d += 32) {
        const float x = load_w(w + d);
        float s1 = 0.f, s2 = 0.f;
        load_state<OPT>(st, d, a.dim, s1, s2);
        store_w(w + d, step_element<OPT>(x, grad_at<SEG>(a, r, d) + c.wd * x, s1, s2, c));
        store_state<OPT>(st, d, a.dim, s1, s2);
    }
    if (lane == 0) finish_header<OPT>(a, base, st, row, t, count, c.row_state);
}

// ROWS rows a warp in flight; the next round's slots load while this round's rows step. The launcher
// uses 1 (kvstore/gpu_kernels.py: two rows a warp take more registers, so fewer warps, and ran slower).
// SEG: row r's gradient is the sum of a segment of gradient rows (see StepArgs).
// skip (may be null): when *skip is set, the kernel does nothing.
template <typename W, int OPT, int VEC, int ROWS, int SEG>
__global__ void optimizer_step(char* rows, i64 row_bytes, i64 weight_off, const i64* __restrict__ idx,
                               const float* __restrict__ grads, const i64* __restrict__ order,
                               const i64* __restrict__ starts, i64 total, i64 n, int dim, i64 state_off,
                               float lr, float eps, float beta1, float beta2, float one_minus_beta1,
                               float one_minus_beta2, double lr64, double beta1_64, double beta2_64,
                               const float2* __restrict__ bias, i64 bias_steps,
                               float wd, bool* dirty, unsigned now, int touch, const int* __restrict__ skip) {
    if (skip && *skip) return;   // a flag an earlier kernel set: this step is not to run
    const int lane = threadIdx.x & 31;
    const Coeffs c = {lr, eps, beta1, beta2, one_minus_beta1, one_minus_beta2, wd, 0.f, 1.f, 0.f};
    const StepArgs a = {rows, row_bytes, weight_off, idx, grads, order, starts, total, n, dim, state_off, lr64, beta1_64, beta2_64, bias,
                        bias_steps, dirty, now, touch};
    const i64 stride = warps_total();
    if (VEC || dim <= 32 * REG_ELEMS) {
        i64 r = warp_id_global();
        i64 slot[ROWS];
        row_indices<ROWS>(idx, r, stride, n, slot);
        for (; r < n; r += ROWS * stride) {
            RowStep<W, OPT, VEC, SEG> step[ROWS];
#pragma unroll
            for (int k = 0; k < ROWS; ++k) step[k].load(a, r + k * stride, slot[k], lane);
            row_indices<ROWS>(idx, r + ROWS * stride, stride, n, slot);
#pragma unroll
            for (int k = 0; k < ROWS; ++k) step[k].finish(a, c, lane);
        }
    } else {
        for (i64 r = warp_id_global(); r < n; r += stride) step_wide_row<W, OPT, SEG>(a, c, r, lane);
    }
}
