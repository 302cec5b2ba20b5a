//! κ of a large square matrix from its two extreme singular values alone (ours, not in the
//! KappaTune code, which takes a full SVD).
//!
//! σ_max² is the largest eigenvalue of AᵀA: Lanczos with matrix-vector products on the float32
//! data (float64 accumulation, one pass over A per step). σ_min⁻² is the largest eigenvalue of
//! (AᵀA)⁻¹: with the partial-pivoting LU of A in float64, P A = L U, (AᵀA)⁻¹ = U⁻¹ L⁻¹ L⁻ᵀ U⁻ᵀ
//! (the permutation cancels), four triangular solves per Lanczos step. The LU costs ⅔n³ flops,
//! all BLAS-3, against n³ (Gram) + 4/3 n³ (tridiagonalisation, half of it memory-bound) for the
//! Gram path and 8/3 n³ for the bidiagonalisation of an SVD; the relative error of σ_min is
//! about ε₆₄·κ·(pivot growth), that of an SVD, not the ε₆₄·κ² of the Gram path.
//!
//! Lanczos stops when the residual of the top Ritz pair, |β_k s_k|, is at most [`TOL`] of the
//! Ritz value: an eigenvalue then lies within that relative distance (the Ritz values of a
//! Krylov space never exceed λ_max, and a random start vector has a component along its
//! eigenvector). A run that does not converge within [`MAX_STEPS`] returns `None` and the caller
//! takes the Gram/SVD path.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::linalg::lu::partial_pivoting::factor::{lu_in_place, lu_in_place_scratch};
use faer::linalg::triangular_solve::{
    solve_lower_triangular_in_place, solve_unit_lower_triangular_in_place,
    solve_unit_upper_triangular_in_place, solve_upper_triangular_in_place,
};
use faer::{Mat, MatMut, Par};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::{ata_rows, MatView};

/// Relative residual at which a Ritz value is accepted (bounds its relative error).
pub const TOL: f64 = 1e-7;
/// Lanczos steps before giving up (the caller then takes the Gram/SVD path).
pub const MAX_STEPS: usize = 400;
/// Square matrices from this size take this path in `Method::Auto` (below it the Gram path's
/// tridiagonalisation still fits the caches and is faster).
pub const MIN_SIZE: usize = 2048;

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Largest eigenvalue and the last component of its eigenvector, of the symmetric tridiagonal
/// matrix with diagonal `alpha` and off-diagonal `beta` (`beta.len() + 1 == alpha.len()`).
fn top_ritz(alpha: &[f64], beta: &[f64]) -> Option<(f64, f64)> {
    let k = alpha.len();
    let t = Mat::<f64>::from_fn(k, k, |i, j| {
        if i == j {
            alpha[i]
        } else if i == j + 1 {
            beta[j]
        } else {
            0.0
        }
    });
    let mut s = faer::diag::Diag::<f64>::zeros(k);
    let mut u = Mat::<f64>::zeros(k, k);
    let req = evd::self_adjoint_evd_scratch::<f64>(
        k,
        ComputeEigenvectors::Yes,
        Par::Seq,
        Default::default(),
    );
    let mut mem = MemBuffer::new(req);
    evd::self_adjoint_evd(
        t.as_ref(),
        s.as_mut(),
        Some(u.as_mut()),
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .ok()?;
    Some((s.column_vector()[k - 1], u[(k - 1, k - 1)]))
}

/// Largest eigenvalue of the symmetric positive semi-definite operator `apply` (`w = M v`) on
/// R^n by Lanczos with full reorthogonalisation, from a fixed pseudo-random start (so results
/// are deterministic). `None` when it does not converge within `max_steps`; +∞ when the
/// operator's output is not finite (an inverse of a factor singular to float64).
pub fn lanczos_max(
    n: usize,
    tol: f64,
    max_steps: usize,
    mut apply: impl FnMut(&[f64], &mut [f64]),
) -> Option<f64> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0x006b_6170_7061);
    let mut v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() - 0.5).collect();
    let nv = dot(&v, &v).sqrt();
    v.iter_mut().for_each(|x| *x /= nv);
    let mut q = vec![v];
    let (mut alpha, mut beta) = (Vec::new(), Vec::new());
    let mut w = vec![0.0f64; n];
    let steps = max_steps.min(n);
    for k in 1..=steps {
        let qj = q.last().expect("q starts with the start vector");
        apply(qj, &mut w);
        if w.iter().any(|x| !x.is_finite()) {
            return Some(f64::INFINITY);
        }
        alpha.push(dot(&w, qj));
        // Full reorthogonalisation, twice (it also removes alpha q_j and beta q_{j-1}).
        for _ in 0..2 {
            for qi in &q {
                let c = dot(&w, qi);
                w.iter_mut().zip(qi).for_each(|(x, y)| *x -= c * y);
            }
        }
        let b = dot(&w, &w).sqrt();
        let scale = alpha.iter().fold(0f64, |m, a| m.max(a.abs()));
        let breakdown = b <= scale * 1e-14;
        if breakdown || k == steps || (k >= 4 && k % 4 == 0) {
            let (theta, s_last) = top_ritz(&alpha, &beta)?;
            // An invariant subspace (breakdown) or the whole space: the Ritz values are exact.
            if breakdown || k == n || (theta > 0.0 && (b * s_last).abs() <= tol * theta) {
                return Some(theta);
            }
        }
        beta.push(b);
        q.push(w.iter().map(|x| x / b).collect());
    }
    None
}

/// κ(A) for a square A by LU + Lanczos; `None` when either Lanczos run did not converge.
/// Returns +∞ for a matrix singular to working precision (σ_min ≤ n·ε₆₄·σ_max), as the SVD path.
pub fn kappa_lu(a: MatView<'_>, par: Par) -> Option<f64> {
    let n = a.rows;
    debug_assert_eq!(a.cols, n);
    let lmax = lanczos_max(n, TOL, MAX_STEPS, |v, w| {
        let (r, _) = ata_rows(a, v, 0, n);
        w.copy_from_slice(&r);
    })?;
    if lmax == 0.0 {
        return Some(f64::INFINITY); // the zero matrix
    }
    // The row-major buffer read column-major is Aᵀ, which has A's singular values.
    let mut lu = Mat::<f64>::from_fn(n, n, |i, j| a.data[j * n + i] as f64);
    let mut perm = vec![0usize; n];
    let mut perm_inv = vec![0usize; n];
    let mut mem = MemBuffer::new(lu_in_place_scratch::<usize, f64>(
        n,
        n,
        par,
        Default::default(),
    ));
    lu_in_place(
        lu.as_mut(),
        &mut perm,
        &mut perm_inv,
        par,
        MemStack::new(&mut mem),
        Default::default(),
    );
    if (0..n).any(|i| lu[(i, i)] == 0.0 || !lu[(i, i)].is_finite()) {
        return Some(f64::INFINITY); // an exactly singular factor
    }
    let f = lu.as_ref();
    // A factor too close to singular for float64 makes the solves overflow: +∞ below.
    let inv_min = lanczos_max(n, TOL, MAX_STEPS, |v, w| {
        w.copy_from_slice(v);
        let mut x = MatMut::from_column_major_slice_mut(w, n, 1);
        solve_lower_triangular_in_place(f.transpose(), x.as_mut(), par); // U^T
        solve_unit_upper_triangular_in_place(f.transpose(), x.as_mut(), par); // L^T
        solve_unit_lower_triangular_in_place(f, x.as_mut(), par); // L
        solve_upper_triangular_in_place(f, x.as_mut(), par); // U
    })?;
    let kappa = (lmax * inv_min).sqrt();
    if !kappa.is_finite() || kappa * (n as f64) * f64::EPSILON >= 1.0 {
        Some(f64::INFINITY)
    } else {
        Some(kappa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A = Q diag(s) with Q orthogonal (Householder reflection of a fixed vector): κ = s_max / s_min.
    fn designed(n: usize, kappa: f64) -> Vec<f32> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let h: Vec<f64> = (0..n).map(|_| rng.random::<f64>() - 0.5).collect();
        let hh = dot(&h, &h);
        let s: Vec<f64> = (0..n)
            .map(|j| kappa.powf(-(j as f64) / (n as f64 - 1.0)))
            .collect();
        let mut a = vec![0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                let delta = if i == j { 1.0 } else { 0.0 };
                let q = delta - 2.0 * h[i] * h[j] / hh;
                a[i * n + j] = (q * s[j]) as f32;
            }
        }
        a
    }

    #[test]
    fn kappa_lu_matches_the_svd() {
        for (n, kappa) in [(60usize, 10.0f64), (90, 1e3), (120, 1e5)] {
            let a = designed(n, kappa);
            let v = MatView::new(&a, n, n);
            let got = kappa_lu(v, Par::Seq).expect("converges");
            let (s, res) = super::super::sv_one(v, super::super::Method::Svd, Par::Seq).unwrap();
            let want = super::super::kappa_from_singular_values(&s, res);
            assert!(((got - want) / want).abs() < 1e-6, "n {n}: {got} vs {want}");
        }
    }

    #[test]
    fn singular_and_zero_matrices_are_infinite() {
        let n = 40;
        let mut a = designed(n, 10.0);
        let row: Vec<f32> = a[..n].to_vec();
        a[n..2 * n].copy_from_slice(&row); // two equal rows
        assert_eq!(
            kappa_lu(MatView::new(&a, n, n), Par::Seq),
            Some(f64::INFINITY)
        );
        let z = vec![0f32; n * n];
        assert_eq!(
            kappa_lu(MatView::new(&z, n, n), Par::Seq),
            Some(f64::INFINITY)
        );
    }
}
