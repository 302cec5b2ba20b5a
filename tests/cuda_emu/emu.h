// A tiny CPU emulator of the CUDA features cuda/*.cu uses, so the kernels' logic is tested
// without a GPU (tests/test_cuda.py builds it with g++): every CUDA thread of a block is an OS
// thread, __syncthreads a block barrier, warp shuffles and ballots an exchange between two
// warp barriers, __shared__ a static (blocks run one after another). It checks logic
// (indexing, radix selection, scans, tie rules), not timing or the GPU memory model.
#pragma once
#include <math.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<unsigned long long> xchg;
    std::vector<unsigned long long> dyn;  // dynamic shared memory, 8-byte aligned
};
inline EmuBlock* g_emu = nullptr;

inline void __syncthreads() { g_emu->block->arrive_and_wait(); }

template <class T>
inline T emu_exchange(T v, int src_lane) {
    const unsigned int tid = threadIdx.x, lane = tid & 31u, base = tid - lane;
    auto& w = *g_emu->warps[tid >> 5];
    std::memcpy(&g_emu->xchg[tid], &v, sizeof(T));
    w.arrive_and_wait();
    T out;
    std::memcpy(&out, &g_emu->xchg[base + static_cast<unsigned int>(src_lane)], sizeof(T));
    w.arrive_and_wait();
    return out;
}
// Out-of-range source lanes return the caller's own value, as on the GPU.
template <class T>
inline T __shfl_down_sync(unsigned int, T v, int off) {
    const int lane = threadIdx.x & 31;
    return emu_exchange(v, lane + off < 32 ? lane + off : lane);
}
template <class T>
inline T __shfl_up_sync(unsigned int, T v, int off) {
    const int lane = threadIdx.x & 31;
    return emu_exchange(v, lane - off >= 0 ? lane - off : lane);
}
inline unsigned int __ballot_sync(unsigned int, int pred) {
    unsigned int bits = 0;
    const unsigned int base = threadIdx.x & ~31u;
    const unsigned long long mine = pred ? 1 : 0;
    auto& w = *g_emu->warps[threadIdx.x >> 5];
    g_emu->xchg[threadIdx.x] = mine;
    w.arrive_and_wait();
    for (unsigned int l = 0; l < 32; ++l) bits |= (g_emu->xchg[base + l] ? 1u : 0u) << l;
    w.arrive_and_wait();
    return bits;
}

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return std::atomic_ref<unsigned int>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline long long atomicMin(long long* p, long long v) {
    std::atomic_ref<long long> a(*p);
    long long old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned int atomicOr(unsigned int* p, unsigned int v) { return std::atomic_ref<unsigned int>(*p).fetch_or(v); }

// IEEE binary16 -> float32, exact (stands in for the kernels' cvt.f32.f16).
inline float emu_f16_to_f32(unsigned short h) {
    const unsigned int sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {
        const float v = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24
        return sign ? -v : v;
    }
    const unsigned int bits = exp == 0x1f ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
    return __uint_as_float(bits);
}

// Run `body` as grid x block threads, one block after another.
template <class F>
void emu_launch(long long grid, unsigned int block, size_t smem_bytes, F body) {
    if (grid <= 0) return;
    EmuBlock e;
    e.block = std::make_unique<std::barrier<>>(block);
    for (unsigned int w = 0; w < (block + 31) / 32; ++w) e.warps.push_back(std::make_unique<std::barrier<>>(32));
    e.xchg.assign(block, 0);
    e.dyn.assign((smem_bytes + 7) / 8 + 1, 0xdeadbeefdeadbeefull);  // garbage: kernels must initialise
    g_emu = &e;
    blockDim = dim3{block, 1, 1};
    gridDim = dim3{static_cast<unsigned int>(grid), 1, 1};
    for (long long b = 0; b < grid; ++b) {
        std::vector<std::thread> ts;
        ts.reserve(block);
        for (unsigned int t = 0; t < block; ++t) {
            ts.emplace_back([&, b, t] {
                blockIdx = dim3{static_cast<unsigned int>(b), 1, 1};
                threadIdx = dim3{t, 1, 1};
                body();
            });
        }
        for (auto& t : ts) t.join();
    }
    g_emu = nullptr;
}

template <class T>
inline T* emu_dynamic_smem() { return reinterpret_cast<T*>(g_emu->dyn.data()); }
