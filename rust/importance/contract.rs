//! The argument contract of the importance primitives, written once: the CPU kernels
//! (`importance::accumulate`, `importance::ssd_dampen`) and the CUDA launchers
//! (`cuda::importance`) both call these before touching memory, so every path refuses the same
//! inputs with the same message. Lengths are element counts per tensor, in list order.

use std::str::FromStr;

use super::Mode;
use crate::error::ensure;
use crate::{Error, Result};

impl FromStr for Mode {
    type Err = Error;

    /// `"sq"` (squared gradients, the Fisher diagonal) or `"abs"` (MAS-style magnitudes).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sq" => Ok(Mode::Sq),
            "abs" => Ok(Mode::Abs),
            other => Err(Error::value(
                "mode",
                format!("expected 'sq' or 'abs', got {other:?}"),
            )),
        }
    }
}

/// `want` and `got` list the same number of tensors with the same element counts.
pub fn same_lengths(arg: &str, want: &[usize], got: &[usize]) -> Result<()> {
    ensure(want.len() == got.len(), arg, || {
        format!("expected {} tensors, got {}", want.len(), got.len())
    })?;
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        ensure(w == g, arg, || {
            format!("tensor {i}: expected {w} elements, got {g}")
        })?;
    }
    Ok(())
}

/// `accumulate(acc, grads, scale)`: one gradient per accumulator, same sizes, finite scale.
pub fn accumulate(acc: &[usize], grads: &[usize], scale: f32) -> Result<()> {
    same_lengths("grads", acc, grads)?;
    ensure(scale.is_finite(), "scale", || {
        format!("expected a finite number, got {scale}")
    })
}

/// `ssd_dampen(params, imp_full, imp_forget, alpha, lam)`: one importance of each kind per
/// parameter, same sizes; `alpha` and `lam` finite and >= 0.
pub fn ssd_dampen(
    params: &[usize],
    imp_full: &[usize],
    imp_forget: &[usize],
    alpha: f32,
    lam: f32,
) -> Result<()> {
    same_lengths("imp_full", params, imp_full)?;
    same_lengths("imp_forget", params, imp_forget)?;
    ensure(alpha.is_finite() && alpha >= 0.0, "alpha", || {
        format!("expected a finite number >= 0, got {alpha}")
    })?;
    ensure(lam.is_finite() && lam >= 0.0, "lam", || {
        format!("expected a finite number >= 0, got {lam}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg_of(r: Result<()>) -> String {
        match r {
            Err(Error::Value { arg, .. }) | Err(Error::Type { arg, .. }) => arg,
            Ok(()) => String::new(),
        }
    }

    #[test]
    fn parses_modes_once() {
        assert_eq!("sq".parse::<Mode>(), Ok(Mode::Sq));
        assert_eq!("abs".parse::<Mode>(), Ok(Mode::Abs));
        let e = "SQ".parse::<Mode>().unwrap_err();
        assert_eq!(e.to_string(), "mode: expected 'sq' or 'abs', got \"SQ\"");
    }

    #[test]
    fn names_the_argument_that_breaks_it() {
        assert_eq!(arg_of(accumulate(&[3, 4], &[3, 4], 1.0)), "");
        assert_eq!(arg_of(accumulate(&[3, 4], &[3], 1.0)), "grads");
        assert_eq!(arg_of(accumulate(&[3, 4], &[3, 5], 1.0)), "grads");
        assert_eq!(arg_of(accumulate(&[3], &[3], f32::NAN)), "scale");
        assert_eq!(arg_of(ssd_dampen(&[2], &[2], &[2], 1.0, 1.0)), "");
        assert_eq!(arg_of(ssd_dampen(&[2], &[1], &[2], 1.0, 1.0)), "imp_full");
        assert_eq!(arg_of(ssd_dampen(&[2], &[2], &[], 1.0, 1.0)), "imp_forget");
        assert_eq!(arg_of(ssd_dampen(&[2], &[2], &[2], -1.0, 1.0)), "alpha");
        assert_eq!(
            arg_of(ssd_dampen(&[2], &[2], &[2], 1.0, f32::INFINITY)),
            "lam"
        );
    }
}
