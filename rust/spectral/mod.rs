//! Spectral family: singular values and condition numbers of many matrices at once.
//!
//! Input matrices are float32, row-major (what a contiguous torch weight is); every result is
//! float64. Two ways to the singular values, chosen per matrix by [`Method`]:
//!
//! * **Gram** (the fast path): `G = AᵀA` or `AAᵀ`, whichever is smaller (k×k with
//!   k = min(m, n)), accumulated in float64 from float32 row blocks (a product of two float32
//!   numbers is exact in float64), only its lower triangle (half the flops of a full GEMM);
//!   then the eigenvalues of the symmetric `G` in float64, σᵢ = √max(λᵢ, 0). Squaring doubles
//!   the condition number's exponent: the relative error of σ_min is about ε₆₄·κ²·c, so this
//!   path is exact to ~1e-9 for κ ≤ 1e3 and still ~1e-7 or better at κ = 1e4, better than a
//!   float32 SVD (error ~ ε₃₂·κ) up to κ ≈ 1e8. It costs mk² (GEMM, BLAS-3) + 4/3 k³
//!   (tridiagonalisation) flops against 4mk² − 4/3 k³ for the Golub–Kahan bidiagonalisation of an
//!   SVD, half of which is memory-bound BLAS-2.
//! * **Svd**: faer's values-only SVD of the float64 copy of `A`; relative error of σ_min about
//!   ε₆₄·κ, for any κ.
//! * **Auto** (default): Gram, then Svd again for a matrix whose Gram estimate of κ exceeds
//!   [`GRAM_MAX_KAPPA`], where the Gram path would lose digits. For condition numbers of square
//!   matrices of at least [`lanczos::MIN_SIZE`], Auto first tries the extreme singular values
//!   alone (LU + Lanczos, [`lanczos`]): fewer flops, all BLAS-3, and the SVD's accuracy.
//!
//! κ = σ_max / σ_min, and κ = +∞ for a matrix that is singular to the working precision of the
//! path that produced σ_min: σ_min ≤ max(m, n)·ε₆₄·σ_max for the SVD, and the same rule on the
//! eigenvalues of G for the Gram path, σ_min ≤ √(max(m, n)·ε₆₄)·σ_max (below that the value is
//! rounding noise of the float64 computation, not information; this includes σ_min = 0 and the
//! zero matrix). `Auto` never reports a Gram κ above `GRAM_MAX_KAPPA`, so it uses the SVD rule.
//!
//! Parallelism: a matrix whose cost is more than its share of one thread runs alone with faer's
//! within-matrix parallelism; all others are spread across the rayon threads, one matrix per
//! task, each sequential inside. On two cores that keeps both busy in both regimes.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::svd::{self, ComputeSvdVectors};
use faer::{Accum, Mat, MatRef, Par};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;

use crate::error::ensure;
use crate::{Error, Result};

pub mod lanczos;

/// Above this Gram estimate of κ, `Method::Auto` recomputes with the direct SVD. Measured
/// against a float64 SVD: a 300×200 matrix with κ = 1e4 is within 2e-9 relative by Gram, with
/// κ = 1e5 within 2e-7, with κ = 1e6 only 2e-5; over the GPT-2-small set (κ up to 9e4) and all
/// of SmolLM2 (κ up to 8e5) the Gram-only error is at most 1.8e-6 (`benches/bench_spectral.py`).
/// 5e4 keeps every Auto result within ~1e-7 (error grows like κ²) while sending the common
/// κ ∈ [1e4, 5e4] of large trained matrices (e.g. 4096×4096 layers) down the fast path instead
/// of faer's much slower float64 SVD (38x slower than torch at 4096² when it fell back).
pub const GRAM_MAX_KAPPA: f64 = 5e4;

/// Rows (or columns) of `A` widened to float64 per Gram block: bounds the extra memory to
/// `GRAM_BLOCK * max(m, n)` doubles while keeping the GEMM's inner dimension large.
const GRAM_BLOCK: usize = 512;

/// A borrowed float32 matrix in row-major order.
#[derive(Clone, Copy, Debug)]
pub struct MatView<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> MatView<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatView { data, rows, cols }
    }
    fn cost(&self) -> f64 {
        let (m, n) = (
            self.rows.max(self.cols) as f64,
            self.rows.min(self.cols) as f64,
        );
        m * n * n + n * n * n
    }
}

/// How singular values are computed (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Auto,
    Gram,
    Svd,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Method::Auto),
            "gram" => Ok(Method::Gram),
            "svd" => Ok(Method::Svd),
            _ => Err(Error::value(
                "method",
                format!("expected 'auto', 'gram' or 'svd', got {s:?}"),
            )),
        }
    }
}

fn check(mats: &[MatView<'_>], allow_empty: bool) -> Result<()> {
    for (i, a) in mats.iter().enumerate() {
        let arg = format!("matrices[{i}]");
        ensure(
            a.rows.checked_mul(a.cols) == Some(a.data.len()),
            &arg,
            || {
                format!(
                    "expected {}x{} = {} values, got {}",
                    a.rows,
                    a.cols,
                    a.rows * a.cols,
                    a.data.len()
                )
            },
        )?;
        ensure(allow_empty || !a.data.is_empty(), &arg, || {
            format!(
                "expected a non-empty matrix, got shape ({}, {})",
                a.rows, a.cols
            )
        })?;
        let bad = a.data.iter().filter(|x| !x.is_finite()).count();
        ensure(bad == 0, &arg, || {
            format!(
                "expected finite values, got {bad} NaN/inf of {}",
                a.data.len()
            )
        })?;
    }
    Ok(())
}

/// Run `f` on every matrix with the scheduling described in the module docs; results in input order.
fn schedule<T: Send>(
    mats: &[MatView<'_>],
    f: impl Fn(MatView<'_>, Par) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let threads = rayon::current_num_threads().max(1);
    let total: f64 = mats.iter().map(MatView::cost).sum();
    let big = |a: &MatView<'_>| threads > 1 && a.cost() * threads as f64 > total;
    let mut out: Vec<Option<T>> = (0..mats.len()).map(|_| None).collect();
    for (i, a) in mats.iter().enumerate() {
        if big(a) {
            out[i] = Some(f(*a, Par::rayon(0))?);
        }
    }
    // Largest first, so the long ones start early and the short ones fill the gaps.
    let mut rest: Vec<usize> = (0..mats.len()).filter(|&i| !big(&mats[i])).collect();
    rest.sort_by(|&i, &j| mats[j].cost().total_cmp(&mats[i].cost()));
    let done: Vec<(usize, T)> = rest
        .into_par_iter()
        .map(|i| f(mats[i], Par::Seq).map(|r| (i, r)))
        .collect::<Result<_>>()?;
    for (i, r) in done {
        out[i] = Some(r);
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every index is scheduled once"))
        .collect())
}

/// Eigenvalues of the k×k Gram matrix of `a` (k = min(m, n)), float64, ascending.
fn gram_eigenvalues(a: MatView<'_>, par: Par) -> Result<Vec<f64>> {
    let (m, n) = (a.rows, a.cols);
    let tall = m >= n;
    let k = m.min(n);
    let mut g = Mat::<f64>::zeros(k, k);
    // Blocks along the long side: rows of A when tall (G += XᵀX), columns when wide (G += YYᵀ).
    let long = if tall { m } else { n };
    let bs = GRAM_BLOCK.min(long);
    let mut buf = vec![0.0f64; bs * k];
    let mut start = 0;
    while start < long {
        let b = bs.min(long - start);
        if tall {
            // X: b×n, row-major; each row is a contiguous row of A.
            for (dst, src) in buf[..b * n]
                .iter_mut()
                .zip(&a.data[start * n..(start + b) * n])
            {
                *dst = *src as f64;
            }
            let x = MatRef::from_row_major_slice(&buf[..b * n], b, n);
            triangular::matmul(
                g.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Add,
                x.transpose(),
                BlockStructure::Rectangular,
                x,
                BlockStructure::Rectangular,
                1.0,
                par,
            );
        } else {
            // Y: m×b, row-major; row i is A[i, start..start+b].
            for i in 0..m {
                let src = &a.data[i * n + start..i * n + start + b];
                for (dst, s) in buf[i * b..(i + 1) * b].iter_mut().zip(src) {
                    *dst = *s as f64;
                }
            }
            let y = MatRef::from_row_major_slice(&buf[..m * b], m, b);
            triangular::matmul(
                g.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Add,
                y,
                BlockStructure::Rectangular,
                y.transpose(),
                BlockStructure::Rectangular,
                1.0,
                par,
            );
        }
        start += b;
    }
    let mut s = faer::diag::Diag::<f64>::zeros(k);
    let scratch =
        evd::self_adjoint_evd_scratch::<f64>(k, ComputeEigenvectors::No, par, Default::default());
    let mut mem = MemBuffer::new(scratch);
    evd::self_adjoint_evd(
        g.as_ref(),
        s.as_mut(),
        None,
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| {
        Error::value(
            "matrices",
            format!("symmetric eigensolver did not converge: {e:?}"),
        )
    })?;
    Ok(s.column_vector().iter().copied().collect())
}

/// Singular values (descending) by the Gram path.
fn sv_gram(a: MatView<'_>, par: Par) -> Result<Vec<f64>> {
    let lam = gram_eigenvalues(a, par)?;
    Ok(lam.iter().rev().map(|&l| l.max(0.0).sqrt()).collect())
}

/// Singular values (descending) by faer's values-only SVD of the float64 copy.
fn sv_direct(a: MatView<'_>, par: Par) -> Result<Vec<f64>> {
    let (m, n) = (a.rows, a.cols);
    let k = m.min(n);
    let wide: Vec<f64> = a.data.iter().map(|&x| x as f64).collect();
    // Column-major n×m of the row-major m×n buffer is Aᵀ: same singular values, and faer's SVD
    // reads column-major fastest.
    let at = MatRef::from_column_major_slice(&wide, n, m);
    let mut s = faer::diag::Diag::<f64>::zeros(k);
    let scratch = svd::svd_scratch::<f64>(
        n,
        m,
        ComputeSvdVectors::No,
        ComputeSvdVectors::No,
        par,
        Default::default(),
    );
    let mut mem = MemBuffer::new(scratch);
    svd::svd(
        at,
        s.as_mut(),
        None,
        None,
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| Error::value("matrices", format!("SVD did not converge: {e:?}")))?;
    Ok(s.column_vector().iter().copied().collect())
}

/// κ from descending singular values: +∞ when σ_min ≤ `resolution`·σ_max (see the module docs).
pub fn kappa_from_singular_values(s: &[f64], resolution: f64) -> f64 {
    let (Some(&smax), Some(&smin)) = (s.first(), s.last()) else {
        return f64::INFINITY;
    };
    if smax <= 0.0 || smin <= smax * resolution {
        f64::INFINITY
    } else {
        smax / smin
    }
}

/// Relative size below which σ_min is rounding noise, for each path.
fn resolution(a: MatView<'_>, gram: bool) -> f64 {
    let r = a.rows.max(a.cols) as f64 * f64::EPSILON;
    if gram {
        r.sqrt()
    } else {
        r
    }
}

/// Singular values (descending) and the resolution of the path that computed them.
fn sv_one(a: MatView<'_>, method: Method, par: Par) -> Result<(Vec<f64>, f64)> {
    if a.rows == 0 || a.cols == 0 {
        return Ok((Vec::new(), 0.0));
    }
    let direct = |a| Ok((sv_direct(a, par)?, resolution(a, false)));
    match method {
        Method::Svd => direct(a),
        Method::Gram => Ok((sv_gram(a, par)?, resolution(a, true))),
        Method::Auto => {
            let s = sv_gram(a, par)?;
            let (smax, smin) = (s[0], s[s.len() - 1]);
            if smax > 0.0 && smin * GRAM_MAX_KAPPA < smax {
                direct(a)
            } else {
                Ok((s, resolution(a, true))) // well conditioned, or the zero matrix (exact either way)
            }
        }
    }
}

/// Singular values, descending, of every matrix (an empty matrix gives an empty list).
pub fn singular_values(mats: &[MatView<'_>], method: Method) -> Result<Vec<Vec<f64>>> {
    check(mats, true)?;
    schedule(mats, |a, par| Ok(sv_one(a, method, par)?.0))
}

/// Condition number σ_max/σ_min of every matrix (+∞ when singular to working precision).
pub fn condition_numbers(mats: &[MatView<'_>], method: Method) -> Result<Vec<f64>> {
    check(mats, false)?;
    schedule(mats, |a, par| {
        if method == Method::Auto && a.rows == a.cols && a.rows >= lanczos::MIN_SIZE {
            if let Some(k) = lanczos::kappa_lu(a, par) {
                return Ok(k);
            }
        }
        let (s, res) = sv_one(a, method, par)?;
        Ok(kappa_from_singular_values(&s, res))
    })
}

/// Result of [`spectral_norms`] for one matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormEstimate {
    /// Estimate of σ_max: ‖A v‖ for the last unit iterate v, a lower bound on σ_max.
    pub value: f64,
    pub iterations: usize,
    /// Whether the relative change fell below `tol` within `max_iter` iterations.
    pub converged: bool,
}

/// Power iteration on AᵀA for the largest singular value of every matrix.
///
/// Stops when successive estimates differ by at most `tol` relative (or after `max_iter`).
/// The estimate is a lower bound that increases towards σ_max; its error after convergence is
/// about `tol`·(σ₁/(σ₁−σ₂)) relative, so a tiny spectral gap needs a smaller `tol`. One pass over
/// A per iteration (u = A v and Aᵀu fused row by row), float64 accumulation, start vector drawn
/// from `seed`.
pub fn spectral_norms(
    mats: &[MatView<'_>],
    tol: f64,
    max_iter: usize,
    seed: u64,
) -> Result<Vec<NormEstimate>> {
    ensure(tol.is_finite() && tol > 0.0, "tol", || {
        format!("expected a positive finite number, got {tol}")
    })?;
    ensure(max_iter >= 1, "max_iter", || {
        "expected an int >= 1, got 0".into()
    })?;
    check(mats, false)?;
    schedule(mats, |a, par| {
        Ok(power_iteration(a, tol, max_iter, seed, par))
    })
}

/// w = Aᵀ(A v) over the rows [r0, r1); returns (w, ‖A v‖² over those rows).
fn ata_rows(a: MatView<'_>, v: &[f64], r0: usize, r1: usize) -> (Vec<f64>, f64) {
    let n = a.cols;
    let mut w = vec![0.0f64; n];
    let mut uu = 0.0;
    for i in r0..r1 {
        let row = &a.data[i * n..(i + 1) * n];
        let ui: f64 = row.iter().zip(v).map(|(&x, &y)| x as f64 * y).sum();
        uu += ui * ui;
        for (wj, &x) in w.iter_mut().zip(row) {
            *wj += ui * x as f64;
        }
    }
    (w, uu)
}

fn power_iteration(a: MatView<'_>, tol: f64, max_iter: usize, seed: u64, par: Par) -> NormEstimate {
    let (m, n) = (a.rows, a.cols);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() - 0.5).collect();
    let norm = |x: &[f64]| x.iter().map(|y| y * y).sum::<f64>().sqrt();
    let nv = norm(&v);
    v.iter_mut().for_each(|x| *x /= nv);
    let chunks = if par == Par::Seq {
        1
    } else {
        rayon::current_num_threads().max(1) * 4
    };
    let rows_per = m.div_ceil(chunks).max(1);
    let mut prev = 0.0f64;
    for it in 1..=max_iter {
        let (w, uu) = if chunks == 1 {
            ata_rows(a, &v, 0, m)
        } else {
            (0..m.div_ceil(rows_per))
                .into_par_iter()
                .map(|c| ata_rows(a, &v, c * rows_per, ((c + 1) * rows_per).min(m)))
                .reduce(
                    || (vec![0.0; n], 0.0),
                    |(mut w1, u1), (w2, u2)| {
                        w1.iter_mut().zip(&w2).for_each(|(x, y)| *x += y);
                        (w1, u1 + u2)
                    },
                )
        };
        let est = uu.sqrt();
        let nw = norm(&w);
        if nw == 0.0 || !nw.is_finite() {
            // A v = 0: v lies in the null space (or A = 0); est is exact for A = 0.
            return NormEstimate {
                value: est,
                iterations: it,
                converged: est == 0.0,
            };
        }
        if it > 1 && (est - prev).abs() <= tol * est {
            return NormEstimate {
                value: est,
                iterations: it,
                converged: true,
            };
        }
        prev = est;
        v = w.into_iter().map(|x| x / nw).collect();
    }
    NormEstimate {
        value: prev,
        iterations: max_iter,
        converged: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng;

    /// A = U diag(s) Vᵀ with random orthogonal U, V (QR of Gaussians), as float32 row-major.
    fn with_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Vec<f32> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut gauss = |r: usize, c: usize| {
            Mat::<f64>::from_fn(r, c, |_, _| {
                // Box–Muller
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
        };
        let k = m.min(n);
        let u = gauss(m, k).qr().compute_thin_Q();
        let v = gauss(n, k).qr().compute_thin_Q();
        let d = Mat::<f64>::from_fn(k, k, |i, j| if i == j { s[i] } else { 0.0 });
        let a = &u * &d * v.transpose();
        let mut out = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                out.push(a[(i, j)] as f32);
            }
        }
        out
    }

    fn exact_sv(data: &[f32], m: usize, n: usize) -> Vec<f64> {
        sv_direct(MatView::new(data, m, n), Par::Seq).unwrap()
    }

    #[test]
    fn known_spectrum_is_recovered_by_every_method() {
        let s = [10.0, 5.0, 2.0, 1.0];
        for &(m, n) in &[(4usize, 4usize), (9, 4), (4, 9)] {
            let a = with_spectrum(m, n, &s, 1);
            for method in [Method::Auto, Method::Gram, Method::Svd] {
                let got = singular_values(&[MatView::new(&a, m, n)], method).unwrap();
                for (g, e) in got[0].iter().zip(&s) {
                    assert!((g - e).abs() < 1e-5 * e, "{method:?} {m}x{n}: {g} vs {e}");
                }
            }
        }
    }

    #[test]
    fn auto_falls_back_for_ill_conditioned() {
        // κ = 1e6: Gram alone loses digits, Auto must match the direct SVD.
        let s: Vec<f64> = (0..8).map(|i| 10f64.powf(-6.0 * i as f64 / 7.0)).collect();
        let a = with_spectrum(16, 8, &s, 2);
        let exact = exact_sv(&a, 16, 8);
        let k = condition_numbers(&[MatView::new(&a, 16, 8)], Method::Auto).unwrap()[0];
        let ke = exact[0] / exact[7];
        assert!((k - ke).abs() <= 1e-9 * ke, "{k} vs {ke}");
    }

    #[test]
    fn singular_and_zero_matrices_have_infinite_kappa() {
        let zero = vec![0.0f32; 12];
        let rank1: Vec<f32> = (0..12).map(|i| ((i / 4) + 1) as f32).collect(); // rows 1,2,3 × ones
        let mats = [MatView::new(&zero, 3, 4), MatView::new(&rank1, 3, 4)];
        for method in [Method::Auto, Method::Gram, Method::Svd] {
            let k = condition_numbers(&mats, method).unwrap();
            assert!(k.iter().all(|x| x.is_infinite()), "{method:?}: {k:?}");
        }
        let one = [3.0f32];
        assert_eq!(
            condition_numbers(&[MatView::new(&one, 1, 1)], Method::Auto).unwrap(),
            vec![1.0]
        );
    }

    #[test]
    fn bad_input_names_the_matrix() {
        let a = [1.0f32, f32::NAN, 0.0, 1.0];
        let e = condition_numbers(
            &[MatView::new(&[1.0], 1, 1), MatView::new(&a, 2, 2)],
            Method::Auto,
        )
        .unwrap_err();
        assert_eq!(
            e,
            Error::value("matrices[1]", "expected finite values, got 1 NaN/inf of 4")
        );
        let e = condition_numbers(&[MatView::new(&[], 0, 3)], Method::Auto).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("matrices[0]: expected a non-empty matrix"));
        assert_eq!(
            singular_values(&[MatView::new(&[], 0, 3)], Method::Auto).unwrap(),
            vec![Vec::<f64>::new()]
        );
        let e = singular_values(&[MatView::new(&[1.0; 5], 2, 3)], Method::Auto).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("matrices[0]: expected 2x3 = 6 values, got 5"));
        assert!(Method::parse("qr").is_err());
        assert!(spectral_norms(&[MatView::new(&[1.0], 1, 1)], 0.0, 10, 0).is_err());
    }

    #[test]
    fn scheduling_keeps_order_with_one_big_matrix() {
        let big = with_spectrum(64, 64, &(1..=64).map(|i| i as f64).collect::<Vec<_>>(), 3);
        let small: Vec<Vec<f32>> = (0..5)
            .map(|i| with_spectrum(4, 3, &[3.0 + i as f64, 2.0, 1.0], 4 + i))
            .collect();
        let mut mats = vec![MatView::new(&big, 64, 64)];
        mats.extend(small.iter().map(|d| MatView::new(d, 4, 3)));
        let k = condition_numbers(&mats, Method::Auto).unwrap();
        assert!((k[0] - 64.0).abs() < 1e-6 * 64.0);
        for (i, ki) in k[1..].iter().enumerate() {
            assert!((ki - (3.0 + i as f64)).abs() < 1e-5 * ki, "{i}: {ki}");
        }
    }

    #[test]
    fn power_iteration_converges_to_sigma_max() {
        let s = [4.0, 2.0, 1.0, 0.5];
        let a = with_spectrum(20, 4, &s, 5);
        let r = spectral_norms(
            &[MatView::new(&a, 20, 4), MatView::new(&[0.0; 6], 2, 3)],
            1e-10,
            1000,
            0,
        )
        .unwrap();
        assert!(
            r[0].converged && (r[0].value - 4.0).abs() < 1e-6,
            "{:?}",
            r[0]
        );
        assert!(r[0].value <= 4.0 * (1.0 + 1e-7));
        assert_eq!(r[1].value, 0.0);
        let capped = spectral_norms(&[MatView::new(&a, 20, 4)], 1e-15, 2, 0).unwrap()[0];
        assert!(!capped.converged && capped.iterations == 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn auto_matches_direct_svd(m in 1usize..40, n in 1usize..40, seed in 0u64..1000, decades in 0.0f64..7.0) {
            let k = m.min(n);
            let s: Vec<f64> = (0..k).map(|i| 10f64.powf(-decades * i as f64 / (k.max(2) - 1) as f64)).collect();
            let a = with_spectrum(m, n, &s, seed);
            let exact = exact_sv(&a, m, n);
            let got = &singular_values(&[MatView::new(&a, m, n)], Method::Auto).unwrap()[0];
            for (g, e) in got.iter().zip(&exact) {
                prop_assert!((g - e).abs() <= 1e-6 * e + 1e-12 * exact[0], "{g} vs {e}");
            }
        }
    }
}
