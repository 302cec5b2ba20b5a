//! Fused attention scoring: the alpha-weighted column sums of softmax attention straight from
//! queries and keys, without ever holding the T x T probability matrix.
//!
//! The attention *output* comes from the model's own fast path (SDPA / flash); this pass only
//! produces the scores a press ranks by:
//!
//!   S <- alpha^Lq S + sum_i alpha^(Lq-1-i) sum_{g in group} softmax_j(scale * q_{g,i} . k_j)
//!
//! over the `Lq` new query rows (newest weight 1), the same recurrence as
//! [`super::accumulate`] gives from explicit probabilities. Per block of query rows it forms
//! one (rows x slots) logit tile with faer's GEMM, takes each row's log-sum-exp and adds the
//! weighted probabilities to the column sums: memory O(block x slots), float32 throughout.
//!
//! Visibility is positional, so the same kernel serves prefill, chunked prefill and decode on a
//! cache whose slots are out of token order: query row i sees slot j when `key_valid[j]` and
//! `key_pos[j] <= query_pos[i]`. Rows with `query_valid` false (left padding) add nothing.
//!
//! Row skipping (A2SF, alpha < 1): only the newest `W` rows are computed, W the smallest
//! integer with alpha^W / (1 - alpha) <= `tol`. The skipped rows' weights sum to at most
//! sum_{k >= W} alpha^k = alpha^W / (1 - alpha) <= tol, and each probability is at most 1, so
//! every score is within `group * tol` of the exact one: the ranking (hence the kept set) can
//! only change between keys whose exact scores differ by less than `2 * group * tol`. With
//! tol = 1e-7 and alpha = 0.9, W = 175 rows instead of Lq: prefill scoring is O(W x T), not
//! O(T^2). H2O (alpha = 1) needs every row; it is blocked the same way, still without the matrix.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{ensure, Result};

/// Query rows per logit tile.
const BLOCK: usize = 64;
/// Query rows per parallel task; fixed (not tied to the thread count) so the order of the
/// float32 sums, and so the result, is the same on every machine.
const PART: usize = 64;

/// Shapes of one fused scoring call.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub slots: usize,
    pub head_dim: usize,
}

/// Rows of the newest query block that can move the scores by more than `tol` (see the module
/// doc); `q_len` when nothing can be skipped.
pub fn rows_needed(alpha: f32, tol: f32, q_len: usize) -> usize {
    if alpha >= 1.0 || tol <= 0.0 {
        return q_len;
    }
    if alpha <= 0.0 {
        return q_len.min(1);
    }
    // alpha^W / (1 - alpha) <= tol  <=>  W >= ln(tol (1 - alpha)) / ln(alpha)
    let w = ((tol as f64 * (1.0 - alpha as f64)).ln() / (alpha as f64).ln()).ceil();
    (w.max(1.0) as usize).min(q_len)
}

/// e^x for x <= 0 to about 2 ulp, branch-free so the loops over a tile vectorise
/// (Cody-Waite range reduction, degree-6 polynomial on [-ln2/2, ln2/2]).
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

/// Query rows per block below which the logits are plain dot products, not a GEMM call.
const FEW_ROWS: usize = 4;

/// `out[j] = scaling * q . k_j` for the first `out.len()` keys (rows of `keys`, `q.len()` wide).
#[inline(always)]
fn logits_body(q: &[f32], keys: &[f32], out: &mut [f32], scaling: f32) {
    let dh = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        let k = &keys[j * dh..(j + 1) * dh];
        // eight independent lanes: a sum the compiler may vectorise without reordering it
        let mut l = [0.0f32; 8];
        for (qc, kc) in q.chunks_exact(8).zip(k.chunks_exact(8)) {
            for x in 0..8 {
                l[x] += qc[x] * kc[x];
            }
        }
        let tail = dh - dh % 8;
        for x in tail..dh {
            l[0] += q[x] * k[x];
        }
        *o = scaling * (((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])));
    }
}

/// One query row of logits `t` (overwritten with its probabilities): mask the slots it cannot
/// see (`kp[j] > qp`) to -inf, subtract the max, exponentiate, and add `wi / z` times the
/// probabilities to `acc`. A row that sees nothing adds nothing. The max and the sum run in
/// eight lanes so that both loops vectorise (a single float accumulator cannot be reordered).
#[inline(always)]
fn row_body(t: &mut [f32], kp: &[i64], qp: i64, acc: &mut [f32], wi: f32) {
    const NEG: f32 = f32::NEG_INFINITY;
    let n = t.len() - t.len() % 8;
    let mut mx = [NEG; 8];
    for (tc, kc) in t[..n].chunks_exact_mut(8).zip(kp[..n].chunks_exact(8)) {
        for l in 0..8 {
            let v = if kc[l] <= qp { tc[l] } else { NEG };
            tc[l] = v;
            mx[l] = mx[l].max(v);
        }
    }
    for j in n..t.len() {
        t[j] = if kp[j] <= qp { t[j] } else { NEG };
        mx[0] = mx[0].max(t[j]);
    }
    let m = mx.iter().fold(NEG, |a, &b| a.max(b));
    if m == NEG {
        return; // sees nothing
    }
    let mut zs = [0.0f32; 8];
    for tc in t[..n].chunks_exact_mut(8) {
        for l in 0..8 {
            // masked slots (-inf) get exactly 0, not exp(-87)
            let e = if tc[l] > NEG { exp_neg(tc[l] - m) } else { 0.0 };
            tc[l] = e;
            zs[l] += e;
        }
    }
    for x in t[n..].iter_mut() {
        *x = if *x > NEG { exp_neg(*x - m) } else { 0.0 };
        zs[0] += *x;
    }
    let z = ((zs[0] + zs[1]) + (zs[2] + zs[3])) + ((zs[4] + zs[5]) + (zs[6] + zs[7]));
    let c = wi / z;
    acc.iter_mut().zip(t.iter()).for_each(|(a, &p)| *a += c * p);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// `logits_body` compiled for AVX2 (8-wide lanes; no FMA: the same roundings as portable).
    #[target_feature(enable = "avx2")]
    pub unsafe fn logits(q: &[f32], keys: &[f32], out: &mut [f32], scaling: f32) {
        super::logits_body(q, keys, out, scaling)
    }
    /// `row_body` compiled for AVX2 (vector round and int conversion for the exp).
    #[target_feature(enable = "avx2")]
    pub unsafe fn row(t: &mut [f32], kp: &[i64], qp: i64, acc: &mut [f32], wi: f32) {
        super::row_body(t, kp, qp, acc, wi)
    }
}

fn logits(q: &[f32], keys: &[f32], out: &mut [f32], scaling: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { x86::logits(q, keys, out, scaling) };
    }
    logits_body(q, keys, out, scaling)
}

fn row_add(t: &mut [f32], kp: &[i64], qp: i64, acc: &mut [f32], wi: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { x86::row(t, kp, qp, acc, wi) };
    }
    row_body(t, kp, qp, acc, wi)
}

#[allow(clippy::too_many_arguments)]
fn check(
    scores: &[f32],
    query: &[f32],
    keys: &[f32],
    key_pos: &[i64],
    key_valid: &[bool],
    query_pos: &[i64],
    query_valid: &[bool],
    d: AttnDims,
    scaling: f32,
    alpha: f32,
    tol: f32,
) -> Result<()> {
    super::contract::attention_scores(d, scaling, alpha, tol)?;
    let kv = d.batch * d.kv_heads * d.slots;
    super::contract::lengths(&[
        ("scores", scores.len(), kv),
        (
            "query",
            query.len(),
            d.batch * d.q_heads * d.q_len * d.head_dim,
        ),
        ("keys", keys.len(), kv * d.head_dim),
        ("key_pos", key_pos.len(), kv),
        ("key_valid", key_valid.len(), kv),
        ("query_pos", query_pos.len(), d.batch * d.q_len),
        ("query_valid", query_valid.len(), d.batch * d.q_len),
    ])?;
    ensure(!scores.iter().any(|s| s.is_nan()), "scores", || {
        "expected no NaN".into()
    })?;
    // the keys are checked where they are read, through their logits (see the task)
    super::contract::finite("query", query)
}

/// Add the alpha-weighted attention column sums of `query` over `keys` to `scores` (see the
/// module doc). Layouts, row-major: scores/key_pos/key_valid (B, Hkv, S); query
/// (B, Hq, Lq, D); keys (B, Hkv, S, D); query_pos/query_valid (B, Lq). A failed call leaves
/// `scores` untouched.
#[allow(clippy::too_many_arguments)]
pub fn attention_scores(
    scores: &mut [f32],
    query: &[f32],
    keys: &[f32],
    key_pos: &[i64],
    key_valid: &[bool],
    query_pos: &[i64],
    query_valid: &[bool],
    d: AttnDims,
    scaling: f32,
    alpha: f32,
    tol: f32,
) -> Result<()> {
    check(
        scores,
        query,
        keys,
        key_pos,
        key_valid,
        query_pos,
        query_valid,
        d,
        scaling,
        alpha,
        tol,
    )?;
    let (s, lq, dh) = (d.slots, d.q_len, d.head_dim);
    let group = d.q_heads / d.kv_heads;
    let rows = d.batch * d.kv_heads;
    if rows == 0 || s == 0 || lq == 0 {
        return Ok(());
    }
    // decay the old scores: alpha == 0 keeps the +inf "evicted" sentinel and zeroes the rest
    let decay = if alpha == 0.0 {
        0.0
    } else {
        alpha.powi(lq as i32)
    };
    let w = rows_needed(alpha, tol, lq);
    let first = lq - w;
    let n_parts = w.div_ceil(PART);
    // each task: one (batch, kv-head) row and one part of the needed query rows
    let task = |task: usize| {
        let (row, part) = (task / n_parts, task % n_parts);
        let b = row / d.kv_heads;
        let kh = row % d.kv_heads;
        let kr = row * s..(row + 1) * s;
        let (kpos, kval) = (&key_pos[kr.clone()], &key_valid[kr]);
        let k = MatRef::from_row_major_slice(&keys[row * s * dh..(row + 1) * s * dh], s, dh);
        let mut acc = vec![0.0f32; s];
        // the slot's position, or i64::MAX where invalid: visibility becomes one compare
        let kp_eff: Vec<i64> = (0..s)
            .map(|j| if kval[j] { kpos[j] } else { i64::MAX })
            .collect();
        let p0 = first + part * PART;
        let p1 = (p0 + PART).min(lq);
        let mut tile = vec![0.0f32; BLOCK.min(p1 - p0) * s];
        let mut i0 = p0;
        while i0 < p1 {
            let i1 = (i0 + BLOCK).min(p1);
            let nr = i1 - i0;
            // only slots up to the last one any row of this block can see (causal prefill)
            let qmax = (i0..i1)
                .map(|i| query_pos[b * lq + i])
                .max()
                .unwrap_or(i64::MIN);
            let lim = (0..s)
                .rev()
                .find(|&j| kval[j] && kpos[j] <= qmax)
                .map_or(0, |j| j + 1);
            if lim == 0 {
                i0 = i1;
                continue;
            }
            for g in 0..group {
                let qh = kh * group + g;
                let qoff = ((b * d.q_heads + qh) * lq + i0) * dh;
                let qs = &query[qoff..qoff + nr * dh];
                if nr <= FEW_ROWS {
                    // decode: a GEMM call's set-up costs more than these few dot products
                    for (r, t) in tile[..nr * lim].chunks_exact_mut(lim).enumerate() {
                        logits(&qs[r * dh..(r + 1) * dh], &keys[row * s * dh..], t, scaling);
                    }
                } else {
                    let qm = MatRef::from_row_major_slice(qs, nr, dh);
                    let tm = MatMut::from_row_major_slice_mut(&mut tile[..nr * lim], nr, lim);
                    matmul(
                        tm,
                        Accum::Replace,
                        qm,
                        k.subrows(0, lim).transpose(),
                        scaling,
                        Par::Seq,
                    );
                }
                // the keys' finiteness check, fused: a NaN or infinite key makes its logit
                // non-finite (the query was checked), and so does a logit that overflows
                if super::contract::finite("keys", &tile[..nr * lim]).is_err() {
                    return Err(crate::Error::value(
                        "keys",
                        "expected finite keys whose logits (scaling * q . k) fit in float32",
                    ));
                }
                for r in 0..nr {
                    let i = i0 + r;
                    if !query_valid[b * lq + i] {
                        continue;
                    }
                    // weight alpha^(Lq-1-i), newest row 1; alpha == 0 keeps the last row only
                    let wi = if alpha == 0.0 {
                        if i + 1 == lq {
                            1.0
                        } else {
                            0.0
                        }
                    } else {
                        alpha.powi((lq - 1 - i) as i32)
                    };
                    let t = &mut tile[r * lim..(r + 1) * lim];
                    row_add(
                        t,
                        &kp_eff[..lim],
                        query_pos[b * lq + i],
                        &mut acc[..lim],
                        wi,
                    );
                }
            }
            i0 = i1;
        }
        Ok(acc)
    };
    // a decode step is microseconds of work: waking the thread pool would cost more
    let small = rows * w * s * dh * group < 1 << 20;
    // scores are written only after every task succeeded: a failed call changes nothing
    let partials: Vec<Vec<f32>> = if small {
        (0..rows * n_parts).map(task).collect::<Result<_>>()?
    } else {
        (0..rows * n_parts)
            .into_par_iter()
            .map(task)
            .collect::<Result<_>>()?
    };
    let finish = |(row, sc): (usize, &mut [f32])| {
        if alpha == 0.0 {
            sc.iter_mut()
                .filter(|x| x.is_finite())
                .for_each(|x| *x = 0.0);
        } else {
            sc.iter_mut().for_each(|x| *x *= decay);
        }
        for part in &partials[row * n_parts..(row + 1) * n_parts] {
            sc.iter_mut().zip(part).for_each(|(x, &p)| *x += p);
        }
    };
    if small {
        scores.chunks_mut(s).enumerate().for_each(finish);
    } else {
        scores.par_chunks_mut(s).enumerate().for_each(finish);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Explicit probabilities, then the same recurrence: the oracle for the fused pass.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        kpos: &[i64],
        qpos: &[i64],
        d: AttnDims,
        scaling: f32,
        alpha: f32,
    ) -> Vec<f32> {
        let g = d.q_heads / d.kv_heads;
        let mut out = vec![0.0f32; d.batch * d.kv_heads * d.slots];
        for b in 0..d.batch {
            for qh in 0..d.q_heads {
                let kh = qh / g;
                let row = b * d.kv_heads + kh;
                for i in 0..d.q_len {
                    let qv = &q[((b * d.q_heads + qh) * d.q_len + i) * d.head_dim..][..d.head_dim];
                    let l: Vec<f64> = (0..d.slots)
                        .map(|j| {
                            if kpos[row * d.slots + j] > qpos[b * d.q_len + i] {
                                return f64::NEG_INFINITY;
                            }
                            let kv = &k[(row * d.slots + j) * d.head_dim..][..d.head_dim];
                            qv.iter().zip(kv).map(|(a, b)| (a * b) as f64).sum::<f64>()
                                * scaling as f64
                        })
                        .collect();
                    let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = l.iter().map(|x| (x - m).exp()).sum();
                    let w = (alpha as f64).powi((d.q_len - 1 - i) as i32);
                    for j in 0..d.slots {
                        out[row * d.slots + j] += (w * (l[j] - m).exp() / z) as f32;
                    }
                }
            }
        }
        out
    }

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn exp_is_accurate() {
        for i in 0..2000 {
            let x = -(i as f32) * 0.04;
            let (a, b) = (exp_neg(x), x.exp());
            assert!((a - b).abs() <= 4e-7 * b + 1e-38, "{x}: {a} vs {b}");
        }
    }

    #[test]
    fn matches_explicit_probabilities_causal_gqa() {
        for (alpha, seed) in [(1.0f32, 1u64), (0.9, 2), (0.5, 3)] {
            let d = AttnDims {
                batch: 2,
                q_heads: 4,
                kv_heads: 2,
                q_len: 70,
                slots: 70,
                head_dim: 8,
            };
            let q = rnd(d.batch * d.q_heads * d.q_len * d.head_dim, seed);
            let k = rnd(d.batch * d.kv_heads * d.slots * d.head_dim, seed + 9);
            let kpos: Vec<i64> = (0..d.batch * d.kv_heads)
                .flat_map(|_| 0..d.slots as i64)
                .collect();
            let qpos: Vec<i64> = (0..d.batch).flat_map(|_| 0..d.q_len as i64).collect();
            let kval = vec![true; kpos.len()];
            let qval = vec![true; qpos.len()];
            let mut s = vec![0.0f32; kpos.len()];
            attention_scores(
                &mut s, &q, &k, &kpos, &kval, &qpos, &qval, d, 0.7, alpha, 0.0,
            )
            .unwrap();
            let want = naive(&q, &k, &kpos, &qpos, d, 0.7, alpha);
            for (a, b) in s.iter().zip(&want) {
                assert!((a - b).abs() < 2e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn decode_rows_take_the_dot_product_path_and_match() {
        // q_len <= FEW_ROWS: logits by plain dot products (odd head_dim: the lane tail too),
        // slots out of order with one invalid
        for (q_len, dh, seed) in [(1usize, 13usize, 21u64), (3, 64, 22), (4, 8, 23)] {
            let d = AttnDims {
                batch: 2,
                q_heads: 4,
                kv_heads: 2,
                q_len,
                slots: 37,
                head_dim: dh,
            };
            let q = rnd(d.batch * d.q_heads * q_len * dh, seed);
            let k = rnd(d.batch * d.kv_heads * d.slots * dh, seed + 1);
            let kpos: Vec<i64> = (0..d.batch * d.kv_heads)
                .flat_map(|r| (0..d.slots as i64).map(move |j| (j * 7 + r as i64) % 37))
                .collect();
            let mut kval = vec![true; kpos.len()];
            kval[5] = false;
            let qpos: Vec<i64> = (0..d.batch)
                .flat_map(|_| (0..q_len as i64).map(|i| 33 + i))
                .collect();
            let qval = vec![true; qpos.len()];
            let mut s = vec![0.0f32; kpos.len()];
            attention_scores(&mut s, &q, &k, &kpos, &kval, &qpos, &qval, d, 0.3, 0.9, 0.0).unwrap();
            let kp_masked: Vec<i64> = kpos
                .iter()
                .zip(&kval)
                .map(|(&p, &v)| if v { p } else { i64::MAX })
                .collect();
            let want = naive(&q, &k, &kp_masked, &qpos, d, 0.3, 0.9);
            for (a, b) in s.iter().zip(&want) {
                assert!((a - b).abs() < 2e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn skipped_rows_stay_within_the_bound() {
        let d = AttnDims {
            batch: 1,
            q_heads: 2,
            kv_heads: 1,
            q_len: 600,
            slots: 600,
            head_dim: 4,
        };
        let q = rnd(d.q_heads * d.q_len * d.head_dim, 5);
        let k = rnd(d.slots * d.head_dim, 6);
        let kpos: Vec<i64> = (0..d.slots as i64).collect();
        let (kval, qval) = (vec![true; d.slots], vec![true; d.q_len]);
        let tol = 1e-4f32;
        assert!(rows_needed(0.9, tol, 600) < 200);
        let mut s = vec![0.0f32; d.slots];
        attention_scores(&mut s, &q, &k, &kpos, &kval, &kpos, &qval, d, 1.0, 0.9, tol).unwrap();
        let want = naive(&q, &k, &kpos, &kpos, d, 1.0, 0.9);
        let err = s
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err <= 2.0 * tol + 1e-5, "{err}");
    }

    #[test]
    fn bad_inputs_leave_scores_untouched() {
        let d = AttnDims {
            batch: 1,
            q_heads: 1,
            kv_heads: 1,
            q_len: 1,
            slots: 2,
            head_dim: 1,
        };
        let mut s = vec![1.0, 2.0];
        let e = attention_scores(
            &mut s,
            &[f32::NAN],
            &[1.0, 1.0],
            &[0, 0],
            &[true; 2],
            &[0],
            &[true],
            d,
            1.0,
            0.5,
            0.0,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("query:"));
        let e = attention_scores(
            &mut s,
            &[1.0],
            &[1.0, 1.0],
            &[0, 0],
            &[true; 2],
            &[0],
            &[true],
            d,
            1.0,
            1.5,
            0.0,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("alpha:"));
        // a NaN key, and finite inputs whose logit overflows: both found where they are read
        for (q, k) in [(1.0f32, [f32::NAN, 1.0f32]), (1e30, [1e30, 1.0])] {
            let e = attention_scores(
                &mut s,
                &[q],
                &k,
                &[0, 0],
                &[true; 2],
                &[0],
                &[true],
                d,
                1.0,
                0.5,
                0.0,
            )
            .unwrap_err();
            assert!(e.to_string().starts_with("keys:"), "{e}");
        }
        assert_eq!(s, vec![1.0, 2.0]);
    }
}
