// KV-cache scores on the GPU: forgetting-factor accumulation and the per-(batch, kv-head) keep
// selection, with the semantics of rust/kvscore/ (A2SF, with H2O as alpha = 1).
//
// Compiled at run time by NVRTC (rust/cuda/): no headers, only built-ins, --fmad=false and IEEE
// division, so the accumulation without renormalisation gets exactly the Rust kernel's
// roundings (per element: S *= alpha once per query row, then += w * A for each head of the
// group, in order). The renormalising row sums are parallel reductions: a different summation
// order than the Rust loop, so that path agrees within float32 rounding, not bit for bit.
//
// Layouts: scores, positions, valid are (rows = batch * kv_heads, T) contiguous; attention is
// (batch, q_heads, q, T) with any strides (in elements); q_heads = kv_heads * group.
// positions == nullptr means slot index = position; valid == nullptr means every slot valid.

typedef long long i64;
typedef unsigned long long u64;

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float attn_at(const void* a, int dt, i64 off) {
    if (dt == DT_F32) return static_cast<const float*>(a)[off];
    const unsigned short h = static_cast<const unsigned short*>(a)[off];
    if (dt == DT_F16) return f16_to_f32(h);
    return __uint_as_float(static_cast<unsigned int>(h) << 16);
}

struct AttnView {
    const void* p;
    int dt;
    i64 sb, sh, sq, st;  // strides of (batch, q_head, q, slot), in elements
};

// ---------------------------------------------------------------------------------------------
// Accumulation
// ---------------------------------------------------------------------------------------------

#define ROWSUM_THREADS 256

// rsum[(b * q_heads + h) * q + i] = sum_j valid A[b, h, i, j]: the renormalisation over the keys
// still kept (A2SF's lm-eval rule), applied by kv_accumulate (`renorm_weight`). One block per
// attention row.
extern "C" __global__ void __launch_bounds__(ROWSUM_THREADS)
kv_rowsum(AttnView a, const unsigned char* __restrict__ valid, int kv_heads, int group, int q,
          int T, float* __restrict__ rsum) {
    const i64 r = blockIdx.x;
    const int i = static_cast<int>(r % q);
    const int h = static_cast<int>((r / q) % ((i64)kv_heads * group));
    const i64 b = r / ((i64)q * kv_heads * group);
    const i64 base = b * a.sb + h * a.sh + i * a.sq;
    const unsigned char* v = valid ? valid + (b * kv_heads + h / group) * (i64)T : nullptr;
    float sum = 0.0f;
    for (int j = threadIdx.x; j < T; j += ROWSUM_THREADS) {
        if (!v || v[j]) sum += attn_at(a.p, a.dt, base + j * a.st);
    }
    __shared__ float warp_sums[ROWSUM_THREADS / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        float s = threadIdx.x < ROWSUM_THREADS / 32 ? warp_sums[threadIdx.x] : 0.0f;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
        if (threadIdx.x == 0) rsum[r] = s;
    }
}

#define ACC_THREADS 256

// A renormalised probability y / sum as the Rust kernel computes it: y * (1 / sum), or y / sum
// where 1 / sum overflows (a row of subnormal probabilities would otherwise become +inf, the
// "evicted" marker); 0 for a row that sums to 0.
__device__ __forceinline__ float renorm_weight(float y, float sum) {
    if (!(sum > 0.0f)) return 0.0f;
    const float w = 1.0f / sum;
    return isinf(w) ? y / sum : w * y;
}

// S <- alpha^q S + sum_i alpha^(q-1-i) sum_g A[g, i] / rsum[g, i] as the recurrence, one thread
// per slot: for each new query row i, S *= alpha (alpha == 0: finite entries become 0, +inf
// stays, the simulation's "evicted" sentinel), then S += A (renormalised by the row sums of
// kv_rowsum when rsum != nullptr) for each query head of the group, in head order, on valid
// slots only.
// Grid: rows * ceil(T / ACC_THREADS) blocks, row-major over (row, tile).
extern "C" __global__ void __launch_bounds__(ACC_THREADS)
kv_accumulate(float* __restrict__ scores, AttnView a, const unsigned char* __restrict__ valid,
              const float* __restrict__ rsum, int kv_heads, int group, int q, int T, float alpha) {
    const int tiles = (T + ACC_THREADS - 1) / ACC_THREADS;
    const i64 row = blockIdx.x / tiles;
    const int j = (blockIdx.x % tiles) * ACC_THREADS + threadIdx.x;
    if (j >= T) return;
    const i64 b = row / kv_heads;
    const int kh = static_cast<int>(row % kv_heads);
    const i64 q_heads = (i64)kv_heads * group;
    float s = scores[row * T + j];
    const bool ok = !valid || valid[row * T + j];
    for (int i = 0; i < q; ++i) {
        if (alpha == 0.0f) {
            if (isfinite(s)) s = 0.0f;
        } else if (alpha != 1.0f) {
            s *= alpha;
        }
        if (!ok) continue;
        for (int g = 0; g < group; ++g) {
            const int h = kh * group + g;
            const float y = attn_at(a.p, a.dt, b * a.sb + h * a.sh + i * a.sq + j * a.st);
            s += rsum ? renorm_weight(y, rsum[(b * q_heads + h) * q + i]) : y;
        }
    }
    scores[row * T + j] = s;
}

// ---------------------------------------------------------------------------------------------
// Fused scoring: alpha-weighted softmax column sums from queries and keys, no (q x slots) matrix
// ---------------------------------------------------------------------------------------------
//
// The semantics of rust/kvscore/fused.rs (`attention_scores`): over the newest W query rows
// (rows [first, Lq), W = rows_needed(alpha, tol, Lq) on the host: older rows move no score by
// more than group * tol),
//   S <- alpha^Lq S + sum_i alpha^(Lq-1-i) sum_{g in group} softmax_j(scaling * q_{g,i} . k_j)
// with query row i seeing slot j when key_valid[j] and key_pos[j] <= query_pos[i]; rows with
// query_valid false, or that see nothing, add nothing. Two passes, memory O(rows x W):
//   kv_row_stats: one block per (batch, query head, needed row): the row's max logit m and
//                 1 / sum_j exp(l_j - m) (the log-sum-exp, split as the Rust kernel keeps it);
//   kv_colsum:    one thread per slot, blocks over (batch * kv head, slot tile): for each needed
//                 row and each query head of the group (the query row staged in shared memory),
//                 adds w_i / z_i * exp(l_ij - m_i), then S = decay * S + sum (alpha = 0: finite S
//                 becomes 0, +inf, the evicted sentinel, stays).
// Logits are recomputed in the second pass (2x the dot products) instead of being stored: that
// is what keeps memory at O(W) per row, never O(W x slots). float32 throughout; summation order
// and exp differ from the Rust kernel (blocked GEMM, polynomial exp), so the two agree within
// float32 rounding, not bit for bit. queries/keys: contiguous float32 (B, Hq, Lq, D) and
// (B, Hkv, S, D); key_pos/key_valid (B, Hkv, S); query_pos/query_valid (B, Lq).

#ifndef FUSED_THREADS
#define FUSED_THREADS 128
#endif
#define FUSED_MAX_D 256  // head_dim limit (rust/cuda/kvscore.rs checks it)

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float dot_d(const float* a, const float* __restrict__ b, int d) {
    float s = 0.0f;
    for (int k = 0; k < d; ++k) s += a[k] * b[k];
    return s;
}

// Max (is_max) or sum of v over the block; every thread gets the result. red holds
// FUSED_THREADS / 32 + 1 floats of shared memory.
__device__ float block_reduce(float v, bool is_max, float* red) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_down_sync(0xffffffffu, v, off);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float x = threadIdx.x < FUSED_THREADS / 32 ? red[threadIdx.x] : (is_max ? neg_inf() : 0.0f);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float o = __shfl_down_sync(0xffffffffu, x, off);
            x = is_max ? fmaxf(x, o) : x + o;
        }
        if (threadIdx.x == 0) red[FUSED_THREADS / 32] = x;
    }
    __syncthreads();
    const float r = red[FUSED_THREADS / 32];
    __syncthreads();  // red is reused by the next reduction
    return r;
}

// stats[2 r] = m, stats[2 r + 1] = 1 / z for r = (b * Hq + qh) * W + (i - first); (0, 0) for a
// row that adds nothing. Grid: B * Hq * W blocks.
extern "C" __global__ void __launch_bounds__(FUSED_THREADS)
kv_row_stats(const float* __restrict__ query, const float* __restrict__ keys, const i64* __restrict__ key_pos,
             const unsigned char* __restrict__ key_valid, const i64* __restrict__ query_pos,
             const unsigned char* __restrict__ query_valid, int q_heads, int kv_heads, int q_len, int S, int D,
             int first, int W, float scaling, float* __restrict__ stats) {
    __shared__ float qs[FUSED_MAX_D];
    __shared__ float red[FUSED_THREADS / 32 + 1];
    const i64 r = blockIdx.x;
    const int ii = static_cast<int>(r % W);
    const int qh = static_cast<int>((r / W) % q_heads);
    const i64 b = r / ((i64)W * q_heads);
    const int i = first + ii;
    const i64 row = b * kv_heads + qh / (q_heads / kv_heads);
    const float* qrow = query + ((b * q_heads + qh) * q_len + i) * (i64)D;
    for (int k = threadIdx.x; k < D; k += FUSED_THREADS) qs[k] = qrow[k];
    __syncthreads();
    const bool qv = query_valid[b * q_len + i] != 0;
    const i64 qp = query_pos[b * q_len + i];
    float m = neg_inf();
    if (qv) {
        for (int j = threadIdx.x; j < S; j += FUSED_THREADS) {
            if (key_valid[row * S + j] && key_pos[row * S + j] <= qp)
                m = fmaxf(m, scaling * dot_d(qs, keys + (row * S + j) * D, D));
        }
    }
    m = block_reduce(m, true, red);
    float z = 0.0f;
    if (qv && m > neg_inf()) {
        for (int j = threadIdx.x; j < S; j += FUSED_THREADS) {
            if (key_valid[row * S + j] && key_pos[row * S + j] <= qp)
                z += expf(scaling * dot_d(qs, keys + (row * S + j) * D, D) - m);
        }
    }
    z = block_reduce(z, false, red);
    if (threadIdx.x == 0) {
        const bool adds = qv && m > neg_inf() && z > 0.0f;
        stats[2 * r] = adds ? m : 0.0f;
        stats[2 * r + 1] = adds ? 1.0f / z : 0.0f;
    }
}

// See the section comment. decay = alpha^Lq (the host's powi, as the Rust kernel). Grid:
// B * Hkv * ceil(S / FUSED_THREADS) blocks, row-major over (row, tile).
extern "C" __global__ void __launch_bounds__(FUSED_THREADS)
kv_colsum(float* __restrict__ scores, const float* __restrict__ query, const float* __restrict__ keys,
          const i64* __restrict__ key_pos, const unsigned char* __restrict__ key_valid,
          const i64* __restrict__ query_pos, const unsigned char* __restrict__ query_valid,
          const float* __restrict__ stats, int q_heads, int kv_heads, int q_len, int S, int D, int first, int W,
          float scaling, float alpha, float decay) {
    __shared__ float qs[FUSED_MAX_D];
    const int tiles = (S + FUSED_THREADS - 1) / FUSED_THREADS;
    const i64 row = blockIdx.x / tiles;
    const int j = (blockIdx.x % tiles) * FUSED_THREADS + threadIdx.x;
    const i64 b = row / kv_heads;
    const int kh = static_cast<int>(row % kv_heads);
    const int group = q_heads / kv_heads;
    const bool slot = j < S && key_valid[row * S + j];
    const i64 kp = slot ? key_pos[row * S + j] : 0;
    const float* krow = keys + (row * S + (slot ? j : 0)) * (i64)D;
    float acc = 0.0f;
    float w = 1.0f;  // alpha^(Lq-1-i): the newest row first, then times alpha per older row
    for (int ii = W - 1; ii >= 0; --ii) {
        const int i = first + ii;
        const bool qv = query_valid[b * q_len + i] != 0;
        const i64 qp = query_pos[b * q_len + i];
        for (int g = 0; g < group; ++g) {
            const int qh = kh * group + g;
            const float* qrow = query + ((b * q_heads + qh) * q_len + i) * (i64)D;
            __syncthreads();
            for (int k = threadIdx.x; k < D; k += FUSED_THREADS) qs[k] = qrow[k];
            __syncthreads();
            const i64 r = (b * q_heads + qh) * W + ii;
            const float c = stats[2 * r + 1];
            if (slot && qv && kp <= qp && c > 0.0f && w > 0.0f)
                acc += (w * c) * expf(scaling * dot_d(qs, krow, D) - stats[2 * r]);
        }
        w = alpha == 0.0f ? 0.0f : w * alpha;
    }
    if (j >= S) return;
    float s = scores[row * S + j];
    if (alpha == 0.0f) {
        if (isfinite(s)) s = 0.0f;
    } else {
        s *= decay;
    }
    scores[row * S + j] = s + acc;
}

// ---------------------------------------------------------------------------------------------
// Keep selection: one block per (batch, kv-head) row, a bitmask of kept slots in shared memory
// ---------------------------------------------------------------------------------------------

// 1024 on the GPU (rust/cuda/kvscore.rs launches that many); the CPU emulator of the tests
// builds with fewer threads, which exercises the same multi-warp scans at a fraction of the cost.
#ifndef SEL_THREADS
#define SEL_THREADS 1024
#endif
#define SEL_WARPS (SEL_THREADS / 32)

struct Row {
    const float* s;
    const i64* pos;
    const unsigned char* valid;
    int T;
    unsigned int* kept;  // ceil(T / 32) words in shared memory
};

struct Shared {
    unsigned int hist[256];
    int warp[SEL_WARPS];
    u64 wmin[SEL_WARPS], wmax[SEL_WARPS];
    int remaining, bucket, digit;
};

__device__ __forceinline__ bool is_kept(const Row& r, int j) { return (r.kept[j >> 5] >> (j & 31)) & 1u; }
__device__ __forceinline__ void set_kept(const Row& r, int j) { atomicOr(&r.kept[j >> 5], 1u << (j & 31)); }
__device__ __forceinline__ bool is_valid(const Row& r, int j) { return !r.valid || r.valid[j]; }
__device__ __forceinline__ i64 position(const Row& r, int j) { return r.pos ? r.pos[j] : (i64)j; }

// Order-preserving unsigned keys: larger key = larger value (float: IEEE total order, as
// Rust's total_cmp; -0 below +0).
__device__ __forceinline__ u64 pos_key(i64 p) { return static_cast<u64>(p) ^ 0x8000000000000000ull; }
__device__ __forceinline__ unsigned int score_key(float x) {
    const unsigned int u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// What a selection ranks. All consider only valid slots not yet kept.
#define SINK 0       // smallest positions first
#define RECENT 1     // largest positions first
#define SCORE 2      // largest scores first (32-bit key)
#define SCORE_TIE 3  // among slots whose score key equals `tie`: largest positions first

template <int MODE>
__device__ __forceinline__ bool key_of(const Row& r, int j, unsigned int tie, u64& key) {
    if (!is_valid(r, j) || is_kept(r, j)) return false;
    if (MODE == SINK) { key = ~pos_key(position(r, j)); return true; }
    if (MODE == RECENT) { key = pos_key(position(r, j)); return true; }
    const unsigned int sk = score_key(r.s[j]);
    if (MODE == SCORE) { key = sk; return true; }
    if (sk != tie) return false;
    key = pos_key(position(r, j));
    return true;
}

// Exclusive prefix sum of v over the block (in thread order); *total gets the block's sum.
__device__ __forceinline__ int block_scan(int v, int* total, Shared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, off);
        if (lane >= off) x += y;
    }
    if (lane == 31) sh.warp[warp] = x;
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < SEL_WARPS; ++w) {
        const int c = sh.warp[w];
        if (w < warp) before += c;
        all += c;
    }
    __syncthreads();  // sh.warp is reused by the next call
    *total = all;
    return before + x - v;
}

__device__ __forceinline__ int block_sum(int v, Shared& sh) {
    int total;
    block_scan(v, &total, sh);
    return total;
}

template <int MODE>
__device__ void mark_all(const Row& r, unsigned int tie) {
    for (int j = threadIdx.x; j < r.T; j += SEL_THREADS) {
        u64 key;
        if (key_of<MODE>(r, j, tie, key)) set_kept(r, j);
    }
    __syncthreads();
}

// Mark, among the slots with key == k_eq, the first `need` in slot order.
template <int MODE>
__device__ void take_ties_in_slot_order(const Row& r, unsigned int tie, u64 k_eq, int need, Shared& sh) {
    int taken = 0;  // the same in every thread
    for (int start = 0; start < r.T && taken < need; start += SEL_THREADS) {
        const int j = start + threadIdx.x;
        u64 key;
        const bool eq = j < r.T && key_of<MODE>(r, j, tie, key) && key == k_eq;
        int total;
        const int before = block_scan(eq ? 1 : 0, &total, sh);
        if (eq && taken + before < need) set_kept(r, j);
        taken += total;
    }
    __syncthreads();
}

// Smallest and largest key among the eligible slots (both ~0 / 0 when there are none).
template <int MODE>
__device__ void key_range(const Row& r, unsigned int tie, u64* lo_out, u64* hi_out, Shared& sh) {
    u64 lo = ~0ull, hi = 0;
    for (int j = threadIdx.x; j < r.T; j += SEL_THREADS) {
        u64 key;
        if (key_of<MODE>(r, j, tie, key)) {
            lo = key < lo ? key : lo;
            hi = key > hi ? key : hi;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const u64 a = __shfl_down_sync(0xffffffffu, lo, off), b = __shfl_down_sync(0xffffffffu, hi, off);
        lo = a < lo ? a : lo;
        hi = b > hi ? b : hi;
    }
    if ((threadIdx.x & 31) == 0) { sh.wmin[threadIdx.x >> 5] = lo; sh.wmax[threadIdx.x >> 5] = hi; }
    __syncthreads();
    for (int w = 0; w < SEL_WARPS; ++w) {
        lo = sh.wmin[w] < lo ? sh.wmin[w] : lo;
        hi = sh.wmax[w] > hi ? sh.wmax[w] : hi;
    }
    __syncthreads();
    *lo_out = lo;
    *hi_out = hi;
}

// Mark the k (1 <= k <= number of eligible slots) eligible slots with the largest keys, by
// radix select, 8 bits per pass, starting at the first byte where the eligible keys differ
// (one min/max pass replaces the passes over common leading bytes, e.g. the high bytes of
// positions) and stopping as soon as the bucket holding the k-th key is taken whole. Equal
// keys at the boundary: SCORE hands them to SCORE_TIE (larger position first, as the Rust
// kernel's tie rule); the others take them in slot order.
template <int MODE>
__device__ void select_top(const Row& r, int k, unsigned int tie, Shared& sh) {
    u64 lo, hi;
    key_range<MODE>(r, tie, &lo, &hi, sh);
    u64 prefix = lo, mask = ~0ull;
    int remaining = k;
    bool whole = false;
    int start = -8;  // all keys equal: no pass, the k-th key is lo
    if (lo != hi) {
        start = (63 - __clzll(static_cast<long long>(lo ^ hi))) & ~7;
        mask = start + 8 >= 64 ? 0ull : ~0ull << (start + 8);
        prefix = lo & mask;
    }
    for (int shift = start; shift >= 0; shift -= 8) {
        for (int d = threadIdx.x; d < 256; d += SEL_THREADS) sh.hist[d] = 0;
        __syncthreads();
        for (int j = threadIdx.x; j < r.T; j += SEL_THREADS) {
            u64 key;
            if (key_of<MODE>(r, j, tie, key) && (key & mask) == prefix)
                atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int cum = 0, d = 255;
            for (; d > 0; --d) {
                if (cum + static_cast<int>(sh.hist[d]) >= remaining) break;
                cum += sh.hist[d];
            }
            sh.remaining = remaining - cum;
            sh.bucket = sh.hist[d];
            sh.digit = d;
        }
        __syncthreads();
        remaining = sh.remaining;
        prefix |= static_cast<u64>(sh.digit) << shift;
        mask |= static_cast<u64>(255u) << shift;
        const int bucket = sh.bucket;
        __syncthreads();  // everyone has read sh before the next pass overwrites it
        if (bucket == remaining) { whole = true; break; }
    }
    // prefix is now the k-th key (or its bucket, when whole). Keys above it are in; with
    // `whole`, so is its whole bucket; otherwise `remaining` of the keys equal to it.
    for (int j = threadIdx.x; j < r.T; j += SEL_THREADS) {
        u64 key;
        if (key_of<MODE>(r, j, tie, key) && (whole ? (key & mask) >= prefix : key > prefix)) set_kept(r, j);
    }
    __syncthreads();
    if (whole) return;
    if constexpr (MODE == SCORE) {
        select_top<SCORE_TIE>(r, remaining, static_cast<unsigned int>(prefix), sh);
    } else {
        take_ties_in_slot_order<MODE>(r, tie, prefix, remaining, sh);
    }
}

// Mark sinks (the first n_sink valid tokens by position) and the recent window (the n_recent
// highest positions among the rest); returns (through *n_valid) the number of valid slots and
// the number protected.
__device__ int protect(const Row& r, int n_sink, int n_recent, int* n_valid_out, Shared& sh) {
    const int words = (r.T + 31) >> 5;
    int c = 0;
    for (int w = threadIdx.x; w < words; w += SEL_THREADS) r.kept[w] = 0u;
    for (int j = threadIdx.x; j < r.T; j += SEL_THREADS) c += is_valid(r, j) ? 1 : 0;
    const int n_valid = block_sum(c, sh);  // its barriers also publish the zeroed bitmask
    const int ns = n_sink < n_valid ? n_sink : n_valid;
    const int rest = n_valid - ns;
    const int nr = n_recent < rest ? n_recent : rest;
    if (ns > 0) {
        if (ns == n_valid) mark_all<SINK>(r, 0u);
        else select_top<SINK>(r, ns, 0u, sh);
    }
    if (nr > 0) {
        if (nr == rest) mark_all<RECENT>(r, 0u);
        else select_top<RECENT>(r, nr, 0u, sh);
    }
    *n_valid_out = n_valid;
    return ns + nr;
}

// out[row, :budget] = the kept slots in ascending slot order; a row with fewer valid slots
// than the budget is filled up with its lowest unkept (invalid) slots, as the Rust kernel.
// Requires n_sink + n_recent <= budget <= T (checked by the launcher).
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
kv_select_keep(const float* __restrict__ scores, const i64* __restrict__ positions,
               const unsigned char* __restrict__ valid, int T, int budget, int n_sink,
               int n_recent, i64* __restrict__ out) {
    extern __shared__ unsigned int kept_words[];
    __shared__ Shared sh;
    const i64 row = blockIdx.x;
    const Row r{scores + row * T, positions ? positions + row * T : nullptr,
                valid ? valid + row * T : nullptr, T, kept_words};
    int n_valid;
    const int prot = protect(r, n_sink, n_recent, &n_valid, sh);
    const int cand = n_valid - prot;
    const int slack = budget - prot;
    if (cand <= slack) mark_all<SCORE>(r, 0u);
    else if (slack > 0) select_top<SCORE>(r, slack, 0u, sh);

    // Ordered compaction with fill: slot j goes to kept_before(j) + min(unkept_before(j), F).
    const int words = (T + 31) >> 5;
    int c = 0;
    for (int w = threadIdx.x; w < words; w += SEL_THREADS) c += __popc(r.kept[w]);
    const int fill = budget - block_sum(c, sh);
    i64* o = out + row * budget;
    int kept_base = 0;
    for (int w0 = 0; w0 < words; w0 += SEL_THREADS) {
        const int w = w0 + threadIdx.x;
        const unsigned int word = w < words ? r.kept[w] : 0u;
        int total;
        int kb = kept_base + block_scan(__popc(word), &total, sh);
        if (w < words) {
            for (int bit = 0; bit < 32; ++bit) {
                const int j = w * 32 + bit;
                if (j >= T) break;
                const int unkept_before = j - kb;
                if ((word >> bit) & 1u) {
                    o[kb + (unkept_before < fill ? unkept_before : fill)] = j;
                    ++kb;
                } else if (unkept_before < fill) {
                    o[kb + unkept_before] = j;
                }
            }
        }
        kept_base += total;
    }
}

// Step-wise eviction: out[row] = the slot to evict, the lowest score among valid slots that
// are neither sinks nor recent (ties: the older token, i.e. the lower position), or -1.
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
kv_evict_one(const float* __restrict__ scores, const i64* __restrict__ positions,
             const unsigned char* __restrict__ valid, int T, int n_sink, int n_recent,
             i64* __restrict__ out) {
    extern __shared__ unsigned int kept_words[];
    __shared__ Shared sh;
    __shared__ unsigned int best_s[SEL_WARPS];
    __shared__ u64 best_p[SEL_WARPS];
    __shared__ int best_j[SEL_WARPS];
    const i64 row = blockIdx.x;
    const Row r{scores + row * T, positions ? positions + row * T : nullptr,
                valid ? valid + row * T : nullptr, T, kept_words};
    int n_valid;
    protect(r, n_sink, n_recent, &n_valid, sh);
    // Lexicographic minimum of (score key, position key, slot) over the candidates.
    unsigned int bs = 0xffffffffu;
    u64 bp = ~0ull;
    int bj = -1;
    for (int j = threadIdx.x; j < T; j += SEL_THREADS) {
        u64 key;
        if (key_of<SCORE>(r, j, 0u, key)) {
            const unsigned int s = static_cast<unsigned int>(key);
            const u64 p = pos_key(position(r, j));
            if (bj < 0 || s < bs || (s == bs && (p < bp || (p == bp && j < bj)))) { bs = s; bp = p; bj = j; }
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const unsigned int s = __shfl_down_sync(0xffffffffu, bs, off);
        const u64 p = __shfl_down_sync(0xffffffffu, bp, off);
        const int jj = __shfl_down_sync(0xffffffffu, bj, off);
        if (jj >= 0 && (bj < 0 || s < bs || (s == bs && (p < bp || (p == bp && jj < bj))))) { bs = s; bp = p; bj = jj; }
    }
    if ((threadIdx.x & 31) == 0) { best_s[threadIdx.x >> 5] = bs; best_p[threadIdx.x >> 5] = bp; best_j[threadIdx.x >> 5] = bj; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < SEL_WARPS; ++w) {
            const unsigned int s = best_s[w];
            const u64 p = best_p[w];
            const int jj = best_j[w];
            if (jj >= 0 && (bj < 0 || s < bs || (s == bs && (p < bp || (p == bp && jj < bj))))) { bs = s; bp = p; bj = jj; }
        }
        out[row] = bj;
    }
}
