// Importance family on the GPU: fused multi-tensor kernels (one launch for a whole list).
//
// Compiled at run time by NVRTC (rust/cuda/), so no headers: only built-ins. Semantics and
// float32 operation order are those of rust/importance/ and reference.py:
//   accumulate:  acc += (g * g) * scale   or   acc += |g| * scale
//   ssd_dampen:  where f > alpha * d:  theta *= ((lam * d) / f capped at 1); count per tensor
// NVRTC runs with --fmad=false and IEEE division, so each element gets exactly these roundings.
//
// Multi-tensor layout (as torch's multi-tensor apply): the host splits every tensor into
// chunks of `chunk` elements (a multiple of 4) and passes one int64 device array `meta`:
//   [ptr_0[n], ..., ptr_{k-1}[n], numel[n], (dtype[n]), block_start[n + 1]]
// block b works on tensor j with block_start[j] <= b < block_start[j + 1], chunk
// b - block_start[j]. Empty tensors own no block.

#define THREADS 256
#define UNROLL 4

typedef long long i64;
typedef unsigned long long u64;

// Tensor j owning block b (block_start is non-decreasing; empty tensors repeat a value, and
// the last j with block_start[j] <= b is the one that owns it).
__device__ __forceinline__ int owner(const i64* __restrict__ block_start, int n, i64 b) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (block_start[mid] <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<u64>(p) & 15u) == 0;
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(static_cast<unsigned int>(h) << 16);
}

// dtype codes shared with python/forgetcore/_cuda.py
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

template <int DT>
__device__ __forceinline__ float load_as_f32(const void* p, i64 i) {
    if (DT == DT_F32) return static_cast<const float*>(p)[i];
    if (DT == DT_F16) return f16_to_f32(static_cast<const unsigned short*>(p)[i]);
    return bf16_to_f32(static_cast<const unsigned short*>(p)[i]);
}

template <bool ABS>
__device__ __forceinline__ float term(float g, float scale) {
    return ABS ? fabsf(g) * scale : (g * g) * scale;
}

// acc[lo:hi] += term(g) for one chunk; float4 loads when both pointers allow.
template <int DT, bool ABS>
__device__ void accumulate_chunk(float* __restrict__ acc, const void* __restrict__ g,
                                 i64 lo, i64 hi, float scale) {
    const bool vec = DT == DT_F32 && aligned16(acc) && aligned16(g);
    i64 i = lo;
    if (vec) {
        const i64 hi4 = lo + ((hi - lo) & ~(i64)3);
        float4* a4 = reinterpret_cast<float4*>(acc);
        const float4* g4 = reinterpret_cast<const float4*>(g);
        // UNROLL independent float4 loads per thread before any store: memory-level parallelism.
        for (i64 base = lo + 4 * threadIdx.x; base < hi4; base += 4 * THREADS * UNROLL) {
            float4 av[UNROLL], gv[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const i64 k = base + (i64)u * 4 * THREADS;
                if (k < hi4) { av[u] = a4[k >> 2]; gv[u] = g4[k >> 2]; }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const i64 k = base + (i64)u * 4 * THREADS;
                if (k < hi4) {
                    float4 a = av[u];
                    a.x += term<ABS>(gv[u].x, scale);
                    a.y += term<ABS>(gv[u].y, scale);
                    a.z += term<ABS>(gv[u].z, scale);
                    a.w += term<ABS>(gv[u].w, scale);
                    a4[k >> 2] = a;
                }
            }
        }
        i = hi4;
    }
    for (i64 k = i + threadIdx.x; k < hi; k += THREADS) {
        acc[k] += term<ABS>(load_as_f32<DT>(g, k), scale);
    }
}

// meta = [acc[n], grad[n], numel[n], dtype[n], block_start[n + 1]]; mode 0 = sq, 1 = abs.
extern "C" __global__ void __launch_bounds__(THREADS)
accumulate(const i64* __restrict__ meta, int n, i64 chunk, float scale, int mode) {
    const i64 b = blockIdx.x;
    const int j = owner(meta + 4 * (i64)n, n, b);
    float* acc = reinterpret_cast<float*>(meta[j]);
    const void* g = reinterpret_cast<const void*>(meta[n + j]);
    const i64 numel = meta[2 * n + j];
    const int dt = static_cast<int>(meta[3 * n + j]);
    const i64 lo = (b - meta[4 * n + j]) * chunk;
    const i64 hi = lo + chunk < numel ? lo + chunk : numel;
    if (mode == 0) {
        if (dt == DT_F32) accumulate_chunk<DT_F32, false>(acc, g, lo, hi, scale);
        else if (dt == DT_F16) accumulate_chunk<DT_F16, false>(acc, g, lo, hi, scale);
        else accumulate_chunk<DT_BF16, false>(acc, g, lo, hi, scale);
    } else {
        if (dt == DT_F32) accumulate_chunk<DT_F32, true>(acc, g, lo, hi, scale);
        else if (dt == DT_F16) accumulate_chunk<DT_F16, true>(acc, g, lo, hi, scale);
        else accumulate_chunk<DT_BF16, true>(acc, g, lo, hi, scale);
    }
}

// One element of SSD; returns 1 when selected. Same roundings as rust/importance/.
__device__ __forceinline__ int dampen1(float& t, float d, float f, float alpha, float lam) {
    if (f > alpha * d) {
        float beta = (lam * d) / f;
        beta = beta > 1.0f ? 1.0f : beta;
        t = t * beta;
        return 1;
    }
    return 0;
}

// meta = [theta[n], imp_full[n], imp_forget[n], numel[n], block_start[n + 1]];
// counts (int64, n, zeroed by the caller) gets the number of selected elements per tensor.
// theta is written only where an element of its float4 is selected: the usual case (few
// selected) reads 12 bytes per element and writes almost nothing.
extern "C" __global__ void __launch_bounds__(THREADS)
ssd_dampen(const i64* __restrict__ meta, int n, i64 chunk, float alpha, float lam,
           i64* __restrict__ counts) {
    const i64 b = blockIdx.x;
    const int j = owner(meta + 4 * (i64)n, n, b);
    float* theta = reinterpret_cast<float*>(meta[j]);
    const float* d = reinterpret_cast<const float*>(meta[n + j]);
    const float* f = reinterpret_cast<const float*>(meta[2 * n + j]);
    const i64 numel = meta[3 * n + j];
    const i64 lo = (b - meta[4 * n + j]) * chunk;
    const i64 hi = lo + chunk < numel ? lo + chunk : numel;

    int count = 0;
    i64 i = lo;
    if (aligned16(theta) && aligned16(d) && aligned16(f)) {
        const i64 hi4 = lo + ((hi - lo) & ~(i64)3);
        float4* t4 = reinterpret_cast<float4*>(theta);
        const float4* d4 = reinterpret_cast<const float4*>(d);
        const float4* f4 = reinterpret_cast<const float4*>(f);
        for (i64 base = lo + 4 * threadIdx.x; base < hi4; base += 4 * THREADS * UNROLL) {
            float4 dv[UNROLL], fv[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const i64 k = base + (i64)u * 4 * THREADS;
                if (k < hi4) { dv[u] = d4[k >> 2]; fv[u] = f4[k >> 2]; }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const i64 k = base + (i64)u * 4 * THREADS;
                if (k < hi4) {
                    const bool any = (fv[u].x > alpha * dv[u].x) | (fv[u].y > alpha * dv[u].y) |
                                     (fv[u].z > alpha * dv[u].z) | (fv[u].w > alpha * dv[u].w);
                    if (any) {
                        float4 t = t4[k >> 2];
                        count += dampen1(t.x, dv[u].x, fv[u].x, alpha, lam);
                        count += dampen1(t.y, dv[u].y, fv[u].y, alpha, lam);
                        count += dampen1(t.z, dv[u].z, fv[u].z, alpha, lam);
                        count += dampen1(t.w, dv[u].w, fv[u].w, alpha, lam);
                        t4[k >> 2] = t;
                    }
                }
            }
        }
        i = hi4;
    }
    for (i64 k = i + threadIdx.x; k < hi; k += THREADS) {
        float t = theta[k];
        if (dampen1(t, d[k], f[k], alpha, lam)) { theta[k] = t; count += 1; }
    }

    // Block sum of the counts: warp shuffles, then one atomic per block.
    __shared__ int warp_sums[THREADS / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) count += __shfl_down_sync(0xffffffffu, count, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = count;
    __syncthreads();
    if (threadIdx.x < 32) {
        int s = threadIdx.x < THREADS / 32 ? warp_sums[threadIdx.x] : 0;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
        if (threadIdx.x == 0 && s) atomicAdd(reinterpret_cast<u64*>(counts + j), static_cast<u64>(s));
    }
}

// meta = [imp[n], numel[n], block_start[n + 1]]; first (int64, n, filled with INT64_MAX by the
// caller) gets per tensor the lowest flat index of a NaN, infinite or negative value: the
// importance check before dampening, one read pass over every tensor in one launch.
extern "C" __global__ void __launch_bounds__(THREADS)
find_invalid(const i64* __restrict__ meta, int n, i64 chunk, i64* __restrict__ first) {
    const i64 b = blockIdx.x;
    const int j = owner(meta + 2 * (i64)n, n, b);
    const float* x = reinterpret_cast<const float*>(meta[j]);
    const i64 numel = meta[n + j];
    const i64 lo = (b - meta[2 * n + j]) * chunk;
    const i64 hi = lo + chunk < numel ? lo + chunk : numel;
    i64 bad = 0x7fffffffffffffffll;
    for (i64 k = lo + threadIdx.x; k < hi; k += THREADS) {
        const float v = x[k];
        if (!(v >= 0.0f && v < __int_as_float(0x7f800000)) && k < bad) bad = k;
    }
    __shared__ i64 warp_min[THREADS / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const i64 o = __shfl_down_sync(0xffffffffu, bad, off);
        bad = o < bad ? o : bad;
    }
    if ((threadIdx.x & 31) == 0) warp_min[threadIdx.x >> 5] = bad;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < THREADS / 32; ++w) bad = warp_min[w] < bad ? warp_min[w] : bad;
        if (bad != 0x7fffffffffffffffll) atomicMin(first + j, bad);
    }
}
