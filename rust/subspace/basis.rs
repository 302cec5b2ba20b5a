//! Bases: the cheap orthonormality check of a caller's basis, and Gram-Schmidt of flat vectors.

use super::simd::{axpy, dot};
use super::{first_non_finite, Basis, ORTHONORMAL_TOL};
use crate::error::ensure;
use crate::{Error, Result};

/// Cheap orthonormality check, O(dim * rank): every column norm is 1 and `U^T U z = z` for a
/// fixed +-1 probe `z`, both within `ORTHONORMAL_TOL`. A full `U^T U` would cost as much as a
/// projection of a small layer; this catches unnormalised and non-orthogonal bases in practice.
pub fn check_basis(b: &Basis, arg: &str) -> Result<()> {
    ensure(b.data.len() == b.dim * b.rank, arg, || {
        format!(
            "expected {} values for a ({}, {}) basis, got {}",
            b.dim * b.rank,
            b.dim,
            b.rank,
            b.data.len()
        )
    })?;
    ensure(b.rank <= b.dim, arg, || {
        format!("rank {} exceeds the dimension {}", b.rank, b.dim)
    })?;
    if let Some(i) = first_non_finite(b.data) {
        return Err(Error::value(
            arg,
            format!(
                "expected finite values, got {} at flat index {i}",
                b.data[i]
            ),
        ));
    }
    if b.rank == 0 {
        return Ok(());
    }
    let k = b.rank;
    let mut norms = vec![0f64; k];
    let z: Vec<f64> = (0..k)
        .map(|j| {
            if (j.wrapping_mul(0x9E37_79B9) >> 7) & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect();
    let mut uz = vec![0f64; b.dim];
    for (i, row) in b.data.chunks_exact(k).enumerate() {
        let mut s = 0f64;
        for j in 0..k {
            let v = row[j] as f64;
            norms[j] += v * v;
            s += v * z[j];
        }
        uz[i] = s;
    }
    for (j, n) in norms.iter().enumerate() {
        if (n - 1.0).abs() > ORTHONORMAL_TOL {
            return Err(Error::value(
                arg,
                format!("expected orthonormal columns, column {j} has squared norm {n:.6}"),
            ));
        }
    }
    let mut back = vec![0f64; k];
    for (i, row) in b.data.chunks_exact(k).enumerate() {
        for j in 0..k {
            back[j] += row[j] as f64 * uz[i];
        }
    }
    let err = back
        .iter()
        .zip(&z)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt()
        / (k as f64).sqrt();
    ensure(err <= ORTHONORMAL_TOL, arg, || {
        format!(
            "expected orthonormal columns, U^T U differs from the identity (probe error {err:.2e})"
        )
    })
}

/// Gram-Schmidt applied twice to the rows of `vectors` (`(k, n)` row-major), with global f64
/// dot products; a row is dropped when its residual norm after both passes is at most
/// `tol` times its original norm. Returns the kept orthonormal rows and their input indices.
pub fn orthonormalize(
    vectors: &[f32],
    k: usize,
    n: usize,
    tol: f64,
) -> Result<(Vec<f32>, Vec<usize>)> {
    ensure(vectors.len() == k * n, "vectors", || {
        format!(
            "expected {} values for ({k}, {n}), got {}",
            k * n,
            vectors.len()
        )
    })?;
    ensure(tol.is_finite() && tol >= 0.0, "tol", || {
        format!("expected a finite number >= 0, got {tol}")
    })?;
    if let Some(j) = first_non_finite(vectors) {
        return Err(Error::value(
            "vectors",
            format!(
                "expected finite values, got {} at flat index {j}",
                vectors[j]
            ),
        ));
    }
    let mut out: Vec<f32> = Vec::with_capacity(k * n);
    let mut kept = Vec::new();
    let mut v = vec![0f32; n];
    for i in 0..k {
        let x = &vectors[i * n..(i + 1) * n];
        let norm0 = dot(x, x).sqrt();
        v.copy_from_slice(x);
        for _pass in 0..2 {
            for j in 0..kept.len() {
                let u = &out[j * n..(j + 1) * n];
                let c = dot(&v, u);
                axpy(&mut v, -c, u);
            }
        }
        let norm = dot(&v, &v).sqrt();
        if norm == 0.0 || norm <= tol * norm0 {
            continue;
        }
        let inv = 1.0 / norm;
        out.extend(v.iter().map(|p| (*p as f64 * inv) as f32));
        kept.push(i);
    }
    Ok((out, kept))
}
