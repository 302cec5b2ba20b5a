//! KV-cache token scores: forgetting-factor accumulation and the keep/evict choice.
//!
//! A2SF (Accumulative Attention Scoring with Forgetting Factor, 2024/2025) scores each cached
//! key by S_t(j) = sum_{i<=t} alpha^(t-i) A[i, j]; alpha = 1 is H2O (Heavy-Hitter Oracle, 2023).
//! Layouts are row-major: scores, positions and validity are (batch, kv_heads, slots); attention
//! rows are (batch, q_heads, q, slots) with q_heads = kv_heads * group (GQA: the query heads
//! of a group are summed before ranking). Scores are always f32, whatever the attention dtype.
//!
//! Slots need not be in token order (the step-wise cache overwrites evicted slots in place), so
//! the selection takes each slot's token position and validity: sinks are the first `n_sink`
//! valid tokens by position, the recent window the `n_recent` highest positions, and invalid
//! slots (left padding, free slots) are never kept ahead of a valid one and never score.

use rayon::prelude::*;

pub mod contract;
mod fused;
pub use contract::Dtype;
pub use fused::{attention_scores, rows_needed, AttnDims};

use crate::error::{ensure, Result};

/// Below this many elements of work a kernel runs on the calling thread: a decode step is
/// microseconds of work, and waking a thread pool (on a busy machine, waiting for it) costs more.
const PAR_MIN: usize = 1 << 18;

/// Attention probabilities in one of the accepted storage formats.
#[derive(Clone, Copy)]
pub enum Attn<'a> {
    F32(&'a [f32]),
    /// IEEE half precision, as raw bits.
    F16(&'a [u16]),
    /// bfloat16, as raw bits (numpy has no bfloat16; Python hands over an int16 view).
    Bf16(&'a [u16]),
}

impl Attn<'_> {
    fn len(&self) -> usize {
        match self {
            Attn::F32(a) => a.len(),
            Attn::F16(a) | Attn::Bf16(a) => a.len(),
        }
    }
    #[inline]
    fn get(&self, i: usize) -> f32 {
        match self {
            Attn::F32(a) => a[i],
            Attn::F16(a) => f16_to_f32(a[i]),
            Attn::Bf16(a) => f32::from_bits((a[i] as u32) << 16),
        }
    }
}

/// Widen an IEEE binary16 to f32 (exact; subnormals, inf and NaN included).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // subnormal: value = man * 2^-24
            let v = man as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
    } else if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// Shapes shared by the kernels: batch, kv heads, slots.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub batch: usize,
    pub heads: usize,
    pub slots: usize,
}

impl Dims {
    fn rows(&self) -> usize {
        self.batch * self.heads
    }
    fn len(&self) -> usize {
        self.rows() * self.slots
    }
}

/// S <- alpha^q S + sum_i alpha^(q-1-i) A_i over the `q` new query rows (newest weight 1),
/// with the `group` query heads of each KV head summed.
///
/// `renorm` divides each query head's row by its sum over the valid slots first (A2SF's
/// lm-eval rule: attention renormalised over the keys still kept); without it the rows are
/// added as they are (H2O). `alpha == 0` keeps +inf entries (the simulation's "already
/// evicted" sentinel) and zeroes the rest before adding, as the official code special-cases
/// it (0 * inf would be NaN). Invalid slots receive nothing.
#[allow(clippy::too_many_arguments)]
pub fn accumulate(
    scores: &mut [f32],
    attn: Attn<'_>,
    valid: Option<&[bool]>,
    dims: Dims,
    group: usize,
    q: usize,
    alpha: f32,
    renorm: bool,
) -> Result<()> {
    contract::accumulate(dims, group, q, alpha)?;
    contract::lengths(&[
        ("scores", scores.len(), dims.len()),
        ("attn", attn.len(), dims.rows() * group * q * dims.slots),
        ("valid", valid.map_or(dims.len(), <[bool]>::len), dims.len()),
    ])?;
    ensure(!scores.iter().any(|s| s.is_nan()), "scores", || {
        "expected no NaN".into()
    })?;
    let t = dims.slots;
    if t == 0 || dims.rows() == 0 || q == 0 {
        return Ok(());
    }
    // Check the attention for NaN/inf before touching the scores (a failed call changes nothing).
    let chunk_bad = |c: &[f32]| contract::finite("attn", c).is_err();
    let bad = match attn {
        Attn::F32(a) if a.len() < PAR_MIN => chunk_bad(a),
        Attn::F32(a) => a.par_chunks(1 << 16).any(chunk_bad),
        _ if attn.len() < PAR_MIN => (0..attn.len()).any(|i| !attn.get(i).is_finite()),
        _ => (0..attn.len())
            .into_par_iter()
            .any(|i| !attn.get(i).is_finite()),
    };
    ensure(!bad, "attn", || {
        "expected finite attention probabilities".into()
    })?;
    let body = |(row, s): (usize, &mut [f32])| {
        let v = valid.map(|v| &v[row * t..(row + 1) * t]);
        // per head of the group: multiply by inv[g], then divide by div[g] (1 unless 1 / sum
        // overflows: a row of subnormal probabilities must renormalise to finite values, not to
        // +inf, the "evicted" marker)
        let mut inv = vec![1.0f32; group];
        let mut div = vec![1.0f32; group];
        for i in 0..q {
            if renorm {
                for g in 0..group {
                    let base = ((row * group + g) * q + i) * t;
                    let mut sum = 0.0f32;
                    for j in 0..t {
                        if v.is_none_or(|v| v[j]) {
                            sum += attn.get(base + j);
                        }
                    }
                    let w = 1.0 / sum;
                    (inv[g], div[g]) = if sum <= 0.0 {
                        (0.0, 1.0)
                    } else if w.is_infinite() {
                        (1.0, sum)
                    } else {
                        (w, 1.0)
                    };
                }
            }
            if alpha == 0.0 {
                s.iter_mut()
                    .filter(|x| x.is_finite())
                    .for_each(|x| *x = 0.0);
            }
            #[allow(clippy::needless_range_loop)] // g also indexes attn's rows
            for g in 0..group {
                let base = ((row * group + g) * q + i) * t;
                let (w, dv) = (inv[g], div[g]);
                // the first head of the group carries the decay, fused into one pass over s
                let decay = if g == 0 && alpha != 0.0 { alpha } else { 1.0 };
                match (attn, v) {
                    (Attn::F32(a), None) if dv == 1.0 => {
                        let a = &a[base..base + t];
                        s.iter_mut()
                            .zip(a)
                            .for_each(|(x, &y)| *x = decay * *x + w * y);
                    }
                    _ => {
                        for j in 0..t {
                            let add = if v.is_none_or(|v| v[j]) {
                                // dv == 1 unless renormalising a subnormal row: exact no-op
                                w * attn.get(base + j) / dv
                            } else {
                                0.0
                            };
                            s[j] = decay * s[j] + add;
                        }
                    }
                }
            }
        }
    };
    if attn.len() < PAR_MIN {
        scores.chunks_mut(t).enumerate().for_each(body);
    } else {
        scores.par_chunks_mut(t).enumerate().for_each(body);
    }
    Ok(())
}

/// Lengths, no NaN score, and distinct positions among each row's valid slots (see
/// [`contract::unique_positions`]): a read-only pass before any selection.
fn check_select(scores: &[f32], positions: &[i64], valid: &[bool], dims: Dims) -> Result<()> {
    contract::lengths(&[
        ("scores", scores.len(), dims.len()),
        ("positions", positions.len(), dims.len()),
        ("valid", valid.len(), dims.len()),
    ])?;
    ensure(!scores.iter().any(|s| s.is_nan()), "scores", || {
        "expected no NaN".into()
    })?;
    let t = dims.slots;
    if t == 0 {
        return Ok(());
    }
    let row = |scratch: &mut Vec<u64>, r: usize| {
        let rr = r * t..(r + 1) * t;
        contract::unique_positions(&positions[rr.clone()], &valid[rr], scratch)
    };
    if dims.len() < PAR_MIN {
        let mut scratch = Vec::new();
        (0..dims.rows()).try_for_each(|r| row(&mut scratch, r))
    } else {
        (0..dims.rows())
            .into_par_iter()
            .try_for_each_init(Vec::new, row)
    }
}

/// Per row: which slots are protected (sinks, recent) and which are candidates.
/// Returns (protected count, candidates) and marks protected slots in `keep`.
fn protect(
    pos: &[i64],
    val: &[bool],
    n_sink: usize,
    n_recent: usize,
    keep: &mut [bool],
    scratch: &mut Vec<usize>,
) -> usize {
    scratch.clear();
    scratch.extend((0..pos.len()).filter(|&j| val[j]));
    let n_valid = scratch.len();
    let ns = n_sink.min(n_valid);
    let nr = n_recent.min(n_valid - ns);
    if ns > 0 {
        if ns < n_valid {
            scratch.select_nth_unstable_by_key(ns - 1, |&j| pos[j]);
        }
        for &j in &scratch[..ns] {
            keep[j] = true;
        }
    }
    if nr > 0 {
        let rest = &mut scratch[ns..];
        let k = rest.len() - nr;
        if k > 0 {
            rest.select_nth_unstable_by_key(k, |&j| pos[j]);
        }
        for &j in &rest[k..] {
            keep[j] = true;
        }
        scratch.truncate(ns + k);
    }
    scratch.drain(..ns);
    ns + nr
}

/// Higher score first; on a tie the later token first (the official code evicts the first
/// index among equal minima, i.e. the older token).
#[inline]
fn better(s: &[f32], pos: &[i64], a: usize, b: usize) -> std::cmp::Ordering {
    s[b].total_cmp(&s[a]).then(pos[b].cmp(&pos[a]))
}

/// The `budget` slots to keep in each (batch, kv-head) row, ascending slot order, written to
/// `out` (batch, kv_heads, budget). The valid slots of a row must hold distinct positions. Valid sinks and recent tokens first, then the highest
/// scores among the other valid slots; a row with fewer valid slots than `budget` keeps all
/// of them and pads with its lowest invalid slots (the caller's validity keeps them masked).
#[allow(clippy::too_many_arguments)]
pub fn select_keep(
    scores: &[f32],
    positions: &[i64],
    valid: &[bool],
    dims: Dims,
    budget: usize,
    n_sink: usize,
    n_recent: usize,
    out: &mut [i64],
) -> Result<()> {
    contract::select_keep(dims, budget, n_sink, n_recent)?;
    check_select(scores, positions, valid, dims)?;
    ensure(out.len() == dims.rows() * budget, "out", || {
        format!(
            "expected {} elements, got {}",
            dims.rows() * budget,
            out.len()
        )
    })?;
    let t = dims.slots;
    // No rows (an empty batch or no heads): nothing to select, and no per-row scratch of
    // `slots` entries to allocate (an empty tensor may declare any number of slots).
    if budget == 0 || dims.rows() == 0 {
        return Ok(());
    }
    let body = |(keep, scratch): &mut (Vec<bool>, Vec<usize>), (row, o): (usize, &mut [i64])| {
        let r = row * t..(row + 1) * t;
        let (s, pos, val) = (&scores[r.clone()], &positions[r.clone()], &valid[r]);
        keep.iter_mut().for_each(|k| *k = false);
        let n_prot = protect(pos, val, n_sink, n_recent, keep, scratch);
        let free = budget - n_prot.min(budget);
        if scratch.len() <= free {
            scratch.iter().for_each(|&j| keep[j] = true);
        } else if free > 0 {
            scratch.select_nth_unstable_by(free - 1, |&a, &b| better(s, pos, a, b));
            scratch[..free].iter().for_each(|&j| keep[j] = true);
        }
        // Fewer valid slots than the budget: fill with the lowest invalid slots.
        let mut n = keep.iter().filter(|&&k| k).count();
        let mut j = 0;
        while n < budget {
            if !keep[j] {
                keep[j] = true;
                n += 1;
            }
            j += 1;
        }
        let mut m = 0;
        for (jj, k) in keep.iter().enumerate() {
            if *k {
                o[m] = jj as i64;
                m += 1;
            }
        }
    };
    if dims.len() < PAR_MIN {
        let mut st = (vec![false; t], Vec::with_capacity(t));
        out.chunks_mut(budget)
            .enumerate()
            .for_each(|x| body(&mut st, x));
    } else {
        out.par_chunks_mut(budget)
            .enumerate()
            .for_each_init(|| (vec![false; t], Vec::with_capacity(t)), body);
    }
    Ok(())
}

/// Step-wise eviction: per (batch, kv-head) row the one slot to evict, the lowest score among
/// the valid slots that are neither sinks nor recent (ties: the older token), or -1 where no
/// slot is evictable. O(slots) per row; the caller overwrites that slot with the next token.
/// The valid slots of a row must hold distinct positions (so the choice is unique).
pub fn evict_one(
    scores: &[f32],
    positions: &[i64],
    valid: &[bool],
    dims: Dims,
    n_sink: usize,
    n_recent: usize,
    out: &mut [i64],
) -> Result<()> {
    contract::evict_one(dims)?;
    check_select(scores, positions, valid, dims)?;
    ensure(out.len() == dims.rows(), "out", || {
        format!("expected {} elements, got {}", dims.rows(), out.len())
    })?;
    let t = dims.slots;
    if dims.rows() == 0 {
        return Ok(()); // as in select_keep: no rows, no scratch
    }
    let body = |(keep, scratch): &mut (Vec<bool>, Vec<usize>), (row, o): (usize, &mut i64)| {
        let r = row * t..(row + 1) * t;
        let (s, pos, val) = (&scores[r.clone()], &positions[r.clone()], &valid[r]);
        keep.iter_mut().for_each(|k| *k = false);
        protect(pos, val, n_sink, n_recent, keep, scratch);
        *o = scratch
            .iter()
            .copied()
            .max_by(|&a, &b| better(s, pos, a, b))
            .map_or(-1, |j| j as i64);
    };
    if dims.len() < PAR_MIN {
        let mut st = (vec![false; t], Vec::with_capacity(t));
        out.iter_mut().enumerate().for_each(|x| body(&mut st, x));
    } else {
        out.par_iter_mut()
            .enumerate()
            .for_each_init(|| (vec![false; t], Vec::with_capacity(t)), body);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(b: usize, h: usize, t: usize) -> Dims {
        Dims {
            batch: b,
            heads: h,
            slots: t,
        }
    }

    #[test]
    fn no_rows_allocate_nothing_whatever_the_slots() {
        // Found by the fuzz target: an empty batch declaring 2^50 slots made the per-row
        // scratch allocate 2^50 entries (an abort, not an error).
        let dims = d(0, 1, 1 << 50);
        select_keep(&[], &[], &[], dims, 4, 0, 0, &mut []).unwrap();
        evict_one(&[], &[], &[], dims, 0, 0, &mut []).unwrap();
    }

    #[test]
    fn f16_widening_is_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
    }

    #[test]
    fn recurrence_weights_newest_row_one() {
        // one head, q = 3 rows over 2 slots: S = a^3 S0 + a^2 A0 + a A1 + A2
        let mut s = vec![1.0, 2.0];
        let a = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5];
        accumulate(&mut s, Attn::F32(&a), None, d(1, 1, 2), 1, 3, 0.5, false).unwrap();
        assert!((s[0] - (0.125 + 0.25 + 0.5)).abs() < 1e-6);
        assert!((s[1] - (0.25 + 0.5 + 0.5)).abs() < 1e-6);
    }

    #[test]
    fn alpha_zero_keeps_inf_sentinel() {
        let mut s = vec![f32::INFINITY, 3.0];
        accumulate(
            &mut s,
            Attn::F32(&[0.5, 0.5]),
            None,
            d(1, 1, 2),
            1,
            1,
            0.0,
            false,
        )
        .unwrap();
        assert_eq!(s, vec![f32::INFINITY, 0.5]);
    }

    #[test]
    fn sinks_and_recent_protected_by_position() {
        // slots out of token order: positions 5,0,3,1,4,2 ; lowest scores on sink and recent
        let pos = [5, 0, 3, 1, 4, 2];
        let s = [0.0, 0.0, 9.0, 1.0, 2.0, 8.0];
        let v = [true; 6];
        let mut out = [0i64; 3];
        select_keep(&s, &pos, &v, d(1, 1, 6), 3, 1, 1, &mut out).unwrap();
        assert_eq!(out, [0, 1, 2]); // recent (pos 5, slot 0), sink (pos 0, slot 1), top score slot 2
        let mut ev = [0i64; 1];
        evict_one(&s, &pos, &v, d(1, 1, 6), 1, 1, &mut ev).unwrap();
        assert_eq!(ev, [3]);
    }

    #[test]
    fn padding_never_kept_ahead_of_tokens() {
        let pos = [0, 1, 2, 3];
        let v = [false, false, true, true];
        let s = [100.0, 100.0, 0.0, 0.0];
        let mut out = [0i64; 3];
        select_keep(&s, &pos, &v, d(1, 1, 4), 3, 1, 1, &mut out).unwrap();
        assert_eq!(out, [0, 2, 3]);
        let mut ev = [0i64; 1];
        evict_one(&s, &pos, &v, d(1, 1, 4), 1, 1, &mut ev).unwrap();
        assert_eq!(ev, [-1]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut s = vec![0.0; 4];
        let e = accumulate(
            &mut s,
            Attn::F32(&[0.0; 3]),
            None,
            d(1, 1, 4),
            1,
            1,
            0.5,
            false,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("attn:"));
        let e = accumulate(
            &mut s,
            Attn::F32(&[0.0; 4]),
            None,
            d(1, 1, 4),
            1,
            1,
            1.5,
            false,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("alpha:"));
        let e = accumulate(
            &mut s,
            Attn::F32(&[f32::NAN; 4]),
            None,
            d(1, 1, 4),
            1,
            1,
            0.5,
            false,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("attn:"));
        assert_eq!(s, vec![0.0; 4]);
        let mut out = [0i64; 2];
        let e =
            select_keep(&s, &[0, 1, 2, 3], &[true; 4], d(1, 1, 4), 2, 2, 1, &mut out).unwrap_err();
        assert!(e.to_string().starts_with("budget:"));
    }

    proptest! {
        #[test]
        fn keep_is_sorted_unique_and_protects(t in 1usize..40, budget_frac in 0.0f64..1.0, seed in 0u64..1000) {
            let budget = ((t as f64) * budget_frac) as usize;
            let n_sink = budget.min(2);
            let n_recent = (budget - n_sink).min(3);
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut rnd = || { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (x >> 33) as f32 / (1u64 << 31) as f32 };
            let s: Vec<f32> = (0..t).map(|_| rnd()).collect();
            let pos: Vec<i64> = (0..t as i64).rev().collect();
            let v: Vec<bool> = (0..t).map(|_| rnd() > 0.2).collect();
            let mut out = vec![0i64; budget];
            select_keep(&s, &pos, &v, d(1, 1, t), budget, n_sink, n_recent, &mut out).unwrap();
            prop_assert!(out.windows(2).all(|w| w[0] < w[1]));
            let n_valid = v.iter().filter(|&&b| b).count();
            let kept_valid = out.iter().filter(|&&j| v[j as usize]).count();
            prop_assert_eq!(kept_valid, n_valid.min(budget));
        }
    }
}
