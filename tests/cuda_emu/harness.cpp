// C entry points over the emulated kernels (tests/cuda_emu/emu.h); grid and block sizes as the
// Rust launchers (rust/cuda/) compute them. Built once per source, with -DEMU_IMPORTANCE or
// -DEMU_KVSCORE, from a copy of cuda/<source>.cu with the two GPU-only lines replaced.
#include "emu.h"

#ifdef EMU_IMPORTANCE
#include "importance.cu"

extern "C" void emu_accumulate(const i64* meta, int n, i64 chunk, i64 blocks, float scale, int mode) {
    emu_launch(blocks, THREADS, 0, [=] { accumulate(meta, n, chunk, scale, mode); });
}

extern "C" void emu_find_invalid(const i64* meta, int n, i64 chunk, i64 blocks, i64* first) {
    emu_launch(blocks, THREADS, 0, [=] { find_invalid(meta, n, chunk, first); });
}

extern "C" void emu_ssd_dampen(const i64* meta, int n, i64 chunk, i64 blocks, float alpha, float lam, i64* counts) {
    emu_launch(blocks, THREADS, 0, [=] { ssd_dampen(meta, n, chunk, alpha, lam, counts); });
}
#endif

#ifdef EMU_KVSCORE
#include "kvscore.cu"

extern "C" void emu_kv_accumulate(float* scores, const void* attn, int dt, const i64* strides,
                                  const unsigned char* valid, float* inv, int batch, int kv_heads,
                                  int group, int q, int T, float alpha) {
    const AttnView a{attn, dt, strides[0], strides[1], strides[2], strides[3]};
    if (inv) {
        emu_launch((i64)batch * kv_heads * group * q, ROWSUM_THREADS, 0,
                   [=] { kv_rowsum(a, valid, kv_heads, group, q, T, inv); });
    }
    const i64 tiles = (T + ACC_THREADS - 1) / ACC_THREADS;
    emu_launch((i64)batch * kv_heads * tiles, ACC_THREADS, 0,
               [=] { kv_accumulate(scores, a, valid, inv, kv_heads, group, q, T, alpha); });
}

// rust/cuda/kvscore.rs `attention_scores`: stats holds 2 * batch * q_heads * W floats.
extern "C" void emu_kv_attention_scores(float* scores, const float* query, const float* keys, const i64* key_pos,
                                        const unsigned char* key_valid, const i64* query_pos,
                                        const unsigned char* query_valid, float* stats, int batch, int q_heads,
                                        int kv_heads, int q_len, int S, int D, int first, float scaling,
                                        float alpha, float decay) {
    const int W = q_len - first;
    if (W <= 0 || S == 0) return;
    emu_launch((i64)batch * q_heads * W, FUSED_THREADS, 0, [=] {
        kv_row_stats(query, keys, key_pos, key_valid, query_pos, query_valid, q_heads, kv_heads, q_len, S, D, first,
                     W, scaling, stats);
    });
    const i64 tiles = (S + FUSED_THREADS - 1) / FUSED_THREADS;
    emu_launch((i64)batch * kv_heads * tiles, FUSED_THREADS, 0, [=] {
        kv_colsum(scores, query, keys, key_pos, key_valid, query_pos, query_valid, stats, q_heads, kv_heads, q_len,
                  S, D, first, W, scaling, alpha, decay);
    });
}

extern "C" void emu_kv_select_keep(const float* s, const i64* pos, const unsigned char* valid, i64 rows, int T,
                                   int budget, int n_sink, int n_recent, i64* out) {
    if (budget == 0) return;
    emu_launch(rows, SEL_THREADS, (T + 31) / 32 * 4,
               [=] { kv_select_keep(s, pos, valid, T, budget, n_sink, n_recent, out); });
}

extern "C" void emu_kv_evict_one(const float* s, const i64* pos, const unsigned char* valid, i64 rows, int T,
                                 int n_sink, int n_recent, i64* out) {
    emu_launch(rows, SEL_THREADS, (T + 31) / 32 * 4, [=] { kv_evict_one(s, pos, valid, T, n_sink, n_recent, out); });
}
#endif
