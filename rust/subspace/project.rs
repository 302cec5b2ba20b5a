//! Projection out of a subspace: layer gradients against input-side bases (GPM, GU) and flat
//! vectors against orthonormal rows (FOT's flattened form).

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef};
use rayon::prelude::*;

use super::simd::{dot, dot_serial, sub_combination, CHUNK};
use super::{check_basis, first_non_finite, par_for, Basis, GradMut, ORTHONORMAL_TOL};
use crate::error::ensure;
use crate::{Error, Result};

/// `G <- G - (G U) U^T` for every layer, in place. Every argument is checked before any
/// gradient is written, so an error leaves all of them unchanged. `check_bases = false` skips
/// the orthonormality check for callers that validated the bases when they were set.
pub fn project_out_(grads: &mut [GradMut], bases: &[Basis], check_bases: bool) -> Result<()> {
    ensure(grads.len() == bases.len(), "bases", || {
        format!(
            "expected one basis per gradient ({}), got {}",
            grads.len(),
            bases.len()
        )
    })?;
    let checks: Result<()> = grads
        .par_iter()
        .zip(bases.par_iter())
        .enumerate()
        .try_for_each(|(i, (g, b))| {
            ensure(
                g.data.len() == g.rows * g.cols,
                &format!("grads[{i}]"),
                || {
                    format!(
                        "expected {} values for ({}, {}), got {}",
                        g.rows * g.cols,
                        g.rows,
                        g.cols,
                        g.data.len()
                    )
                },
            )?;
            ensure(b.dim == g.cols, &format!("bases[{i}]"), || {
                format!(
                    "expected a basis of dimension {} (the gradient's columns), got ({}, {})",
                    g.cols, b.dim, b.rank
                )
            })?;
            if check_bases {
                check_basis(b, &format!("bases[{i}]"))?;
            } else {
                ensure(
                    b.data.len() == b.dim * b.rank,
                    &format!("bases[{i}]"),
                    || "length does not match its shape".into(),
                )?;
            }
            Ok(())
        });
    checks?;
    let (across, par) = par_for(grads.len());
    let nan_error = |i: usize, g: &[f32]| -> Error {
        match first_non_finite(g) {
            Some(j) => Error::value(
                format!("grads[{i}]"),
                format!("expected finite values, got {} at flat index {j}", g[j]),
            ),
            None => Error::value(
                format!("grads[{i}]"),
                "G U overflows float32 (values too large to project)",
            ),
        }
    };
    // Phase 1: T = G U for every layer. A NaN or inf anywhere in a row of G makes that row of
    // T non-finite (U has no zero column), so checking the small T replaces a pass over G.
    // Nothing is written before every layer has passed.
    let first = |(i, (g, b)): (usize, (&GradMut, &Basis))| -> Result<Option<Mat<f32>>> {
        if g.rows == 0 || g.cols == 0 {
            return Ok(None);
        }
        if b.rank == 0 {
            return match first_non_finite(g.data) {
                Some(_) => Err(nan_error(i, g.data)),
                None => Ok(None),
            };
        }
        let gm = MatRef::from_row_major_slice(g.data, g.rows, g.cols);
        let mut t = Mat::<f32>::zeros(g.rows, b.rank);
        matmul(t.as_mut(), Accum::Replace, gm, b.view(), 1.0f32, par);
        let finite = (0..t.ncols()).all(|c| t.col(c).iter().all(|v| v.is_finite()));
        if finite {
            Ok(Some(t))
        } else {
            Err(nan_error(i, g.data))
        }
    };
    let ts: Vec<Option<Mat<f32>>> = if across {
        grads
            .par_iter()
            .zip(bases.par_iter())
            .enumerate()
            .map(first)
            .collect::<Result<_>>()?
    } else {
        grads
            .iter()
            .zip(bases.iter())
            .enumerate()
            .map(first)
            .collect::<Result<_>>()?
    };
    // Phase 2: G -= T U^T.
    let second = |((g, b), t): ((&mut GradMut, &Basis), &Option<Mat<f32>>)| {
        if let Some(t) = t {
            let mut gm = MatMut::from_row_major_slice_mut(g.data, g.rows, g.cols);
            matmul(
                gm.as_mut(),
                Accum::Add,
                t.as_ref(),
                b.view().transpose(),
                -1.0f32,
                par,
            );
        }
    };
    if across {
        grads
            .par_iter_mut()
            .zip(bases.par_iter())
            .zip(ts.par_iter())
            .for_each(second);
    } else {
        grads
            .iter_mut()
            .zip(bases.iter())
            .zip(ts.iter())
            .for_each(second);
    }
    Ok(())
}

/// The flattened form: `g <- g - V^T (V g)` for a vector `g` of length `n` and `rank`
/// orthonormal rows `V` (`(rank, n)` row-major). Memory-bound, so two fused passes: all `rank`
/// dot products in one sweep over chunks of `g` (the chunk stays in cache), then one
/// read-modify-write of `g` per chunk; f64 accumulation throughout.
pub fn project_out_flat_(g: &mut [f32], vectors: &[f32], rank: usize, check: bool) -> Result<()> {
    let n = g.len();
    ensure(vectors.len() == rank * n, "vectors", || {
        format!(
            "expected shape ({rank}, {n}) ({} values), got {}",
            rank * n,
            vectors.len()
        )
    })?;
    ensure(rank <= n || n == 0, "vectors", || {
        format!("rank {rank} exceeds the dimension {n}")
    })?;
    let nan_error = || -> Error {
        if let Some(j) = first_non_finite(g) {
            return Error::value(
                "g",
                format!("expected finite values, got {} at index {j}", g[j]),
            );
        }
        if let Some(j) = first_non_finite(vectors) {
            return Error::value(
                "vectors",
                format!(
                    "expected finite values, got {} at flat index {j}",
                    vectors[j]
                ),
            );
        }
        Error::value("g", "V g overflows (values too large to project)")
    };
    if n == 0 {
        return Ok(());
    }
    if rank == 0 {
        return if first_non_finite(g).is_some() {
            Err(nan_error())
        } else {
            Ok(())
        };
    }
    if check {
        for i in 0..rank {
            let vi = &vectors[i * n..(i + 1) * n];
            for j in 0..=i {
                let d = dot(vi, &vectors[j * n..(j + 1) * n]);
                if !d.is_finite() {
                    return Err(nan_error());
                }
                let want = if i == j { 1.0 } else { 0.0 };
                ensure((d - want).abs() <= ORTHONORMAL_TOL, "vectors", || {
                    format!("expected orthonormal rows, <v{i}, v{j}> = {d:.6}")
                })?;
            }
        }
    }
    let row = |i: usize, lo: usize, hi: usize| &vectors[i * n + lo..i * n + hi];
    let coef: Vec<f64> = g
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(c, gc)| {
            let lo = c * CHUNK;
            (0..rank)
                .map(|i| dot_serial(row(i, lo, lo + gc.len()), gc))
                .collect::<Vec<f64>>()
        })
        .reduce(
            || vec![0f64; rank],
            |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect(),
        );
    // A NaN/inf in g reaches every dot product and one in row i reaches dot i: checking the
    // coefficients replaces a pass over the inputs; nothing has been written yet.
    if coef.iter().any(|c| !(*c as f32).is_finite()) {
        return Err(nan_error());
    }
    g.par_chunks_mut(CHUNK).enumerate().for_each(|(c, gc)| {
        let lo = c * CHUNK;
        let rows: Vec<&[f32]> = (0..rank).map(|i| row(i, lo, lo + gc.len())).collect();
        sub_combination(gc, &rows, &coef);
    });
    Ok(())
}
