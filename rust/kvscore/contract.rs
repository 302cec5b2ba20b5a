//! The argument contract of the kvscore primitives, written once: the CPU kernels
//! (`kvscore::accumulate`, `select_keep`, `evict_one`, `attention_scores`) and the CUDA
//! launchers (`cuda::kvscore`) call these before touching memory, so every path refuses the same
//! inputs with the same message. Shapes come in as `Dims` / `AttnDims`; the CPU kernels also
//! check their slices' lengths against them ([`lengths`]), the launchers get pointers of tensors
//! whose shapes the caller took from the tensors themselves.

use std::str::FromStr;

use super::{AttnDims, Dims};
use crate::error::ensure;
use crate::{Error, Result};

/// Storage format of attention probabilities (and of the fused kernel's queries and keys).
/// The discriminants are the CUDA source's `DT_*` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Dtype {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

impl FromStr for Dtype {
    type Err = Error;

    /// torch's dtype names without the `torch.` prefix: `"float32"`, `"float16"`, `"bfloat16"`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float32" => Ok(Dtype::F32),
            "float16" => Ok(Dtype::F16),
            "bfloat16" => Ok(Dtype::Bf16),
            other => Err(Error::type_(
                "attn",
                format!("expected float32, float16 or bfloat16, got {other}"),
            )),
        }
    }
}

/// `alpha` is the forgetting factor: finite, in [0, 1].
pub fn alpha(alpha: f32) -> Result<()> {
    ensure(
        alpha.is_finite() && (0.0..=1.0).contains(&alpha),
        "alpha",
        || format!("expected a number in [0, 1], got {alpha}"),
    )
}

/// Every slice has the element count its shape implies: `(name, got, want)`.
pub fn lengths(items: &[(&str, usize, usize)]) -> Result<()> {
    for &(name, got, want) in items {
        ensure(got == want, name, || {
            format!("expected {want} elements, got {got}")
        })?;
    }
    Ok(())
}

/// Elements of a shape, or a `ValueError` naming `arg` where the product overflows.
pub fn numel(arg: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::value(arg, format!("shape {shape:?} is too large")))
}

/// No NaN or infinity in `x`, or a `ValueError` naming `arg`. x - x is 0 for finite x and NaN
/// otherwise; summed in eight independent lanes, so the pass vectorises (one float
/// accumulator is a chain of dependent adds, several times slower on a decode step's keys).
pub fn finite(arg: &str, x: &[f32]) -> Result<()> {
    let mut lanes = [0.0f32; 8];
    #[allow(clippy::eq_op)]
    for c in x.chunks_exact(8) {
        for l in 0..8 {
            lanes[l] += c[l] - c[l];
        }
    }
    #[allow(clippy::eq_op)]
    let tail: f32 = x.chunks_exact(8).remainder().iter().map(|&v| v - v).sum();
    ensure(lanes.iter().sum::<f32>() + tail == 0.0, arg, || {
        "expected finite values".into()
    })
}

/// `accumulate(scores (B, H, T), attn (B, H*group, q, T), alpha, group)`.
pub fn accumulate(dims: Dims, group: usize, q: usize, alpha_: f32) -> Result<()> {
    ensure(group >= 1, "group", || {
        format!("expected an int >= 1, got {group}")
    })?;
    alpha(alpha_)?;
    numel("scores", &[dims.batch, dims.heads, dims.slots])?;
    numel("attn", &[dims.batch, dims.heads, group, q, dims.slots]).map(|_| ())
}

/// `select_keep(scores (B, H, T), budget, n_sink, n_recent)`: sinks and recent fit the budget,
/// and the budget fits the slots.
pub fn select_keep(dims: Dims, budget: usize, n_sink: usize, n_recent: usize) -> Result<()> {
    numel("scores", &[dims.batch, dims.heads, dims.slots])?;
    ensure(budget <= dims.slots, "budget", || {
        format!(
            "expected at most the {} cached slots, got {budget}",
            dims.slots
        )
    })?;
    let protected = n_sink.checked_add(n_recent);
    ensure(protected.is_some_and(|p| p <= budget), "budget", || {
        format!(
            "expected at least n_sink + n_recent = {}, got {budget}",
            n_sink as u128 + n_recent as u128
        )
    })
}

/// `evict_one(scores (B, H, T), n_sink, n_recent)`: any counts (more than the slots protects all).
pub fn evict_one(dims: Dims) -> Result<()> {
    numel("scores", &[dims.batch, dims.heads, dims.slots]).map(|_| ())
}

/// `attention_scores(scores (B, Hkv, S), query (B, Hq, Lq, D), keys (B, Hkv, S, D), ...)`.
pub fn attention_scores(d: AttnDims, scaling: f32, alpha_: f32, tol: f32) -> Result<()> {
    ensure(
        d.kv_heads > 0 && d.q_heads > 0 && d.q_heads % d.kv_heads == 0,
        "query",
        || {
            format!(
                "expected query heads to be a positive multiple of the {} key heads, got {}",
                d.kv_heads, d.q_heads
            )
        },
    )?;
    alpha(alpha_)?;
    ensure(scaling.is_finite(), "scaling", || {
        format!("expected a finite number, got {scaling}")
    })?;
    ensure(tol.is_finite() && tol >= 0.0, "tol", || {
        format!("expected a finite number >= 0, got {tol}")
    })?;
    numel("query", &[d.batch, d.q_heads, d.q_len, d.head_dim])?;
    numel("keys", &[d.batch, d.kv_heads, d.slots, d.head_dim]).map(|_| ())
}

/// Valid slots of one row must hold distinct token positions: a cache never holds one token
/// twice, and with duplicates "the first sinks" and "the most recent" are not defined (the
/// kernels and the reference would each pick their own). Invalid slots may repeat anything.
/// O(slots) with a bitmap over the row's position range when that range is at most 64x the
/// slots (every cache), a sort otherwise. `scratch` is reused across rows.
pub fn unique_positions(pos: &[i64], valid: &[bool], scratch: &mut Vec<u64>) -> Result<()> {
    let (mut lo, mut hi, mut n) = (i64::MAX, i64::MIN, 0usize);
    for (&p, &v) in pos.iter().zip(valid) {
        if v {
            lo = lo.min(p);
            hi = hi.max(p);
            n += 1;
        }
    }
    if n < 2 {
        return Ok(());
    }
    let dup = |p: i64| {
        Error::value(
            "positions",
            format!("expected distinct positions among the valid slots of each row, got {p} twice"),
        )
    };
    let range = (hi as i128 - lo as i128) as u128 + 1;
    if range <= 64 * pos.len() as u128 {
        scratch.clear();
        scratch.resize((range as usize).div_ceil(64), 0);
        for (&p, &v) in pos.iter().zip(valid) {
            if v {
                let k = (p - lo) as usize;
                let (w, b) = (k / 64, 1u64 << (k % 64));
                if scratch[w] & b != 0 {
                    return Err(dup(p));
                }
                scratch[w] |= b;
            }
        }
        return Ok(());
    }
    let mut v: Vec<i64> = pos
        .iter()
        .zip(valid)
        .filter(|x| *x.1)
        .map(|x| *x.0)
        .collect();
    v.sort_unstable();
    match v.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(dup(w[0])),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg_of<T>(r: Result<T>) -> String {
        match r {
            Err(Error::Value { arg, .. }) | Err(Error::Type { arg, .. }) => arg,
            Ok(_) => String::new(),
        }
    }

    fn d(b: usize, h: usize, t: usize) -> Dims {
        Dims {
            batch: b,
            heads: h,
            slots: t,
        }
    }

    #[test]
    fn parses_dtypes_once() {
        assert_eq!("float32".parse::<Dtype>(), Ok(Dtype::F32));
        assert_eq!("bfloat16".parse::<Dtype>(), Ok(Dtype::Bf16));
        let e = "float64".parse::<Dtype>().unwrap_err();
        assert!(matches!(e, Error::Type { .. }));
        assert_eq!(
            e.to_string(),
            "attn: expected float32, float16 or bfloat16, got float64"
        );
    }

    #[test]
    fn names_the_argument_that_breaks_it() {
        assert_eq!(arg_of(accumulate(d(1, 2, 3), 1, 1, 0.5)), "");
        assert_eq!(arg_of(accumulate(d(1, 2, 3), 0, 1, 0.5)), "group");
        assert_eq!(arg_of(accumulate(d(1, 2, 3), 1, 1, f32::NAN)), "alpha");
        assert_eq!(arg_of(accumulate(d(usize::MAX, 2, 3), 1, 1, 0.5)), "scores");
        assert_eq!(arg_of(select_keep(d(1, 1, 4), 5, 0, 0)), "budget");
        assert_eq!(arg_of(select_keep(d(1, 1, 4), 2, 2, 1)), "budget");
        assert_eq!(arg_of(select_keep(d(1, 1, 4), 2, usize::MAX, 1)), "budget");
        let a = AttnDims {
            batch: 1,
            q_heads: 3,
            kv_heads: 2,
            q_len: 1,
            slots: 2,
            head_dim: 1,
        };
        assert_eq!(arg_of(attention_scores(a, 1.0, 0.5, 0.0)), "query");
        let a = AttnDims { q_heads: 4, ..a };
        assert_eq!(
            arg_of(attention_scores(a, f32::INFINITY, 0.5, 0.0)),
            "scaling"
        );
        assert_eq!(arg_of(attention_scores(a, 1.0, 0.5, -1.0)), "tol");
        assert_eq!(arg_of(lengths(&[("keys", 3, 4)])), "keys");
    }

    #[test]
    fn finite_finds_every_non_finite_position() {
        for n in [0usize, 1, 7, 8, 9, 33] {
            assert!(finite("x", &vec![1.5f32; n]).is_ok());
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in 0..n {
                    let mut v = vec![1.5f32; n];
                    v[at] = bad;
                    assert_eq!(arg_of(finite("x", &v)), "x");
                }
            }
        }
        // a large finite value never overflows the check (x - x is exactly 0)
        assert!(finite("x", &[f32::MAX; 20]).is_ok());
    }

    #[test]
    fn duplicate_valid_positions_are_refused_either_way() {
        let mut s = Vec::new();
        assert!(unique_positions(&[3, 1, 2], &[true; 3], &mut s).is_ok());
        // a repeated position on an invalid slot is fine
        assert!(unique_positions(&[3, 3, 2], &[true, false, true], &mut s).is_ok());
        let e = unique_positions(&[3, 1, 3], &[true; 3], &mut s).unwrap_err();
        assert_eq!(arg_of::<()>(Err(e)), "positions");
        // a wide range takes the sorting path
        assert!(unique_positions(&[0, i64::MAX, i64::MIN], &[true; 3], &mut s).is_ok());
        let e = unique_positions(&[i64::MAX, 0, i64::MAX], &[true; 3], &mut s);
        assert_eq!(arg_of(e), "positions");
    }
}
