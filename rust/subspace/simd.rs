//! The vector loops the subspace kernels share: dot products and linear combinations over
//! float32 slices with float64 accumulation, compiled for AVX2+FMA where the CPU has it
//! (chosen at run time) and portable otherwise.

use rayon::prelude::*;

pub(super) const CHUNK: usize = 1 << 14;

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] as f64 * y[l] as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += *x as f64 * *y as f64;
    }
    s
}

#[inline(always)]
fn sub_combination_body(g: &mut [f32], rows: &[&[f32]], coef: &[f64]) {
    // g -= sum_i coef_i rows_i, in blocks that stay in registers/L1; the correction is formed
    // in f32 (its rounding is below that of storing g in f32).
    const B: usize = 256;
    let mut acc = [0f32; B];
    let mut lo = 0;
    while lo < g.len() {
        let hi = (lo + B).min(g.len());
        let w = hi - lo;
        acc[..w].iter_mut().for_each(|a| *a = 0.0);
        for (r, c) in rows.iter().zip(coef) {
            let c = *c as f32;
            for (a, v) in acc[..w].iter_mut().zip(&r[lo..hi]) {
                *a += c * *v;
            }
        }
        for (x, a) in g[lo..hi].iter_mut().zip(&acc[..w]) {
            *x -= *a;
        }
        lo = hi;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f64 {
    dot_body(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sub_combination_avx2(g: &mut [f32], rows: &[&[f32]], coef: &[f64]) {
    sub_combination_body(g, rows, coef)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Dot product in f64 with 8 independent lanes so it vectorises (a single running f64 sum
/// would be latency-bound); AVX2 when the CPU has it (the crate is built for baseline x86-64).
pub(super) fn dot_serial(a: &[f32], b: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { dot_avx2(a, b) };
    }
    dot_body(a, b)
}

/// `g -= sum_k coef[k] * rows[k]` over one chunk, in f64.
pub(super) fn sub_combination(g: &mut [f32], rows: &[&[f32]], coef: &[f64]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { sub_combination_avx2(g, rows, coef) };
    }
    sub_combination_body(g, rows, coef)
}

/// Dot product of two long vectors in f64, chunks summed in parallel.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(x, y)| dot_serial(x, y))
        .sum()
}

/// `y += alpha * x`, each element rounded once from f64.
pub(super) fn axpy(y: &mut [f32], alpha: f64, x: &[f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| {
            for (p, q) in yc.iter_mut().zip(xc) {
                *p = (*p as f64 + alpha * *q as f64) as f32;
            }
        });
}
