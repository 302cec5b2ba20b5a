//! Orthonormal bases and gradient projection (GPM, FOT, GU).
//!
//! Layout conventions (all row-major `f32`):
//! - a layer gradient `G` is `(rows, cols)` = (out, in); its basis `U` is `(cols, rank)` with
//!   orthonormal columns on the input side, and projection is `G <- G - (G U) U^T`;
//! - the flattened form keeps its orthonormal vectors as the rows of a `(rank, n)` matrix `V`
//!   (a vector over all parameters is contiguous that way) and projects `g <- g - V^T (V g)`.
//!
//! Dense algebra goes through faer; layers run in parallel with rayon when there are at least
//! as many layers as threads, otherwise each layer's matmuls use all threads.

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::ensure;
use crate::{Error, Result};

/// Tolerance of the cheap orthonormality check on a basis handed in by the caller.
pub const ORTHONORMAL_TOL: f64 = 1e-3;

/// A writable `(rows, cols)` row-major layer gradient.
pub struct GradMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
}

/// A `(dim, rank)` row-major basis with orthonormal columns.
#[derive(Clone, Copy)]
pub struct Basis<'a> {
    pub data: &'a [f32],
    pub dim: usize,
    pub rank: usize,
}

impl<'a> Basis<'a> {
    fn view(&self) -> MatRef<'a, f32> {
        MatRef::from_row_major_slice(self.data, self.dim, self.rank)
    }
}

/// Which rule `extend_basis` uses to decide how many new directions to add.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Criterion {
    /// GPM (Saha et al. 2021): energies sigma^2 of the residual against the threshold.
    Energy(Count),
    /// FOT (Bakman et al. 2024): the norm ratio r = ||A - U U^T A|| / ||A|| (or the clients'
    /// weighted mean of it, when given) sets eps' = (r - (1 - threshold)) / r; adds the fewest
    /// directions whose energy share exceeds eps', at least one.
    NormRatio { ratio: Option<f64> },
}

/// How GPM's energy criterion counts directions on an empty basis (the first task).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// As GPM's code does: `sum(cumsum(sigma^2)/total < threshold)`, one short of reaching it.
    Official,
    /// The fewest directions whose energy reaches the threshold.
    Reach,
}

/// The result of one `extend_basis`.
pub struct Extension {
    /// `(dim, rank)` row-major; the first columns are the old basis, unchanged.
    pub basis: Vec<f32>,
    pub rank: usize,
    /// Directions added.
    pub added: usize,
}

fn par_for(n_tasks: usize) -> (bool, Par) {
    // Parallel across layers when they can keep every thread busy, else inside each matmul.
    let threads = rayon::current_num_threads();
    if n_tasks >= threads || threads == 1 {
        (true, Par::Seq)
    } else {
        (false, Par::rayon(threads))
    }
}

fn first_non_finite(x: &[f32]) -> Option<usize> {
    x.iter().position(|v| !v.is_finite())
}

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

const CHUNK: usize = 1 << 14;

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
fn dot_serial(a: &[f32], b: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { dot_avx2(a, b) };
    }
    dot_body(a, b)
}

fn sub_combination(g: &mut [f32], rows: &[&[f32]], coef: &[f64]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { sub_combination_avx2(g, rows, coef) };
    }
    sub_combination_body(g, rows, coef)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(x, y)| dot_serial(x, y))
        .sum()
}

fn axpy(y: &mut [f32], alpha: f64, x: &[f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| {
            for (p, q) in yc.iter_mut().zip(xc) {
                *p = (*p as f64 + alpha * *q as f64) as f32;
            }
        });
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

/// How many of the energies `lam` (descending, >= 0) a criterion adds.
/// `total` is ||A||^2, `res` is ||A - U U^T A||^2 (equal to `total` for an empty basis).
pub fn count_new(
    lam: &[f64],
    total: f64,
    res: f64,
    old_rank: usize,
    threshold: f64,
    criterion: Criterion,
) -> usize {
    let avail = lam.iter().take_while(|l| **l > 0.0).count();
    let k = match criterion {
        Criterion::Energy(count) => {
            if old_rank == 0 && count == Count::Official {
                // GPM main_pmnist.py, first task: r = sum(cumsum(ratio) < th) (the `+1` is commented out).
                let mut acc = 0.0;
                let mut r = 0;
                for l in lam {
                    acc += l / total;
                    if acc < threshold {
                        r += 1;
                    } else {
                        break;
                    }
                }
                r
            } else {
                // GPM later tasks (and "reach"): add while the captured energy is below threshold.
                let mut acc = (total - res) / total;
                let mut r = 0;
                for l in lam.iter().take(avail) {
                    if acc < threshold {
                        acc += l / total;
                        r += 1;
                    } else {
                        break;
                    }
                }
                r
            }
        }
        Criterion::NormRatio { ratio } => {
            let r_bar = ratio.unwrap_or_else(|| (res / total).sqrt());
            let eps_p = if r_bar > 0.0 {
                (r_bar - (1.0 - threshold)) / r_bar
            } else {
                -1.0
            };
            let mut acc = 0.0;
            let mut r = 0;
            for l in lam.iter().take(avail) {
                acc += l / res;
                r += 1;
                if acc > eps_p {
                    break;
                }
            }
            r.max(1)
        }
    };
    k.min(avail)
}

/// Grow an orthonormal basis `U` (`(dim, rank)`) from a representation matrix `A` (`(dim, n)`,
/// samples as columns): remove A's component in span(U), decompose the residual R (through the
/// eigendecomposition of the smaller Gram matrix, R R^T or R^T R), add the leading left singular
/// directions chosen by `criterion`, and re-orthonormalise the new columns against the old ones
/// and each other (projection twice, then a QR, in f64). The old columns are kept bit for bit; the basis
/// never exceeds `dim` (a full basis stays full). Numerically zero directions are never added.
pub fn extend_basis(
    u: &Basis,
    a: &[f32],
    n: usize,
    threshold: f64,
    criterion: Criterion,
    par: Par,
) -> Result<Extension> {
    check_basis(u, "basis")?;
    let d = u.dim;
    ensure(a.len() == d * n, "reps", || {
        format!("expected ({d}, {n}) = {} values, got {}", d * n, a.len())
    })?;
    ensure(
        threshold.is_finite() && threshold > 0.0 && threshold <= 1.0,
        "threshold",
        || format!("expected a number in (0, 1], got {threshold}"),
    )?;
    if let Criterion::NormRatio { ratio: Some(r) } = criterion {
        ensure(
            r.is_finite() && (0.0..=1.0 + 1e-6).contains(&r),
            "ratio",
            || format!("expected a number in [0, 1], got {r}"),
        )?;
    }
    if let Some(j) = first_non_finite(a) {
        return Err(Error::value(
            "reps",
            format!("expected finite values, got {} at flat index {j}", a[j]),
        ));
    }
    let unchanged = || Extension {
        basis: u.data.to_vec(),
        rank: u.rank,
        added: 0,
    };
    let r0 = u.rank;
    if r0 >= d || n == 0 {
        return Ok(unchanged());
    }
    let am = MatRef::from_row_major_slice(a, d, n);
    // Residual R = A - U (U^T A).
    let mut res = am.to_owned();
    if r0 > 0 {
        let mut c = Mat::<f32>::zeros(r0, n);
        matmul(
            c.as_mut(),
            Accum::Replace,
            u.view().transpose(),
            am,
            1.0f32,
            par,
        );
        matmul(res.as_mut(), Accum::Add, u.view(), c.as_ref(), -1.0f32, par);
    }
    let sq = |m: MatRef<f32>| -> f64 {
        let mut s = 0f64;
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                let v = m[(i, j)] as f64;
                s += v * v;
            }
        }
        s
    };
    let total = sq(am);
    let res_e = sq(res.as_ref());
    if total == 0.0 || res_e <= total * 1e-12 {
        return Ok(unchanged());
    }
    // Gram matrix of the smaller side and its eigendecomposition, in f32 (as torch/LAPACK ssyevd
    // would); directions below the rounding floor are dropped and the chosen ones are
    // re-orthonormalised in f64 below.
    let wide = d <= n;
    let m = if wide { d } else { n };
    let mut gram = Mat::<f32>::zeros(m, m);
    if wide {
        matmul(
            gram.as_mut(),
            Accum::Replace,
            res.as_ref(),
            res.as_ref().transpose(),
            1.0f32,
            par,
        );
    } else {
        matmul(
            gram.as_mut(),
            Accum::Replace,
            res.as_ref().transpose(),
            res.as_ref(),
            1.0f32,
            par,
        );
    }
    let mut s = Diag::<f32>::zeros(m);
    let mut vecs = Mat::<f32>::zeros(m, m);
    {
        let req =
            self_adjoint_evd_scratch::<f32>(m, ComputeEigenvectors::Yes, par, Default::default());
        let mut buf = MemBuffer::new(req);
        self_adjoint_evd(
            gram.as_ref(),
            s.as_mut(),
            Some(vecs.as_mut()),
            par,
            MemStack::new(&mut buf),
            Default::default(),
        )
        .map_err(|e| Error::value("reps", format!("eigendecomposition failed: {e:?}")))?;
    }
    // Descending energies; anything below the Gram's rounding level counts as zero.
    let ev = s.column_vector();
    let floor = ev.iter().fold(0f64, |a, b| a.max(*b as f64)) * (m as f64) * f32::EPSILON as f64;
    let lam: Vec<f64> = (0..m)
        .rev()
        .map(|i| ev[i] as f64)
        .map(|l| if l > floor { l } else { 0.0 })
        .collect();
    let want = count_new(&lam, total, res_e, r0, threshold, criterion).min(d - r0);
    if want == 0 {
        return Ok(unchanged());
    }
    // New directions as f64 columns of W (d x want).
    let sel = Mat::<f64>::from_fn(m, want, |i, c| vecs[(i, m - 1 - c)] as f64);
    let mut w = if wide {
        sel
    } else {
        // Left singular directions u = R v (normalised below).
        let res64 = Mat::<f64>::from_fn(d, n, |i, j| res[(i, j)] as f64);
        let mut w = Mat::<f64>::zeros(d, want);
        matmul(
            w.as_mut(),
            Accum::Replace,
            res64.as_ref(),
            sel.as_ref(),
            1.0,
            par,
        );
        w
    };
    // Re-orthonormalise: against U twice (block matmuls).
    let u64m = Mat::<f64>::from_fn(d, r0, |i, j| u.data[i * r0 + j] as f64);
    for _ in 0..2 {
        if r0 > 0 {
            let mut c = Mat::<f64>::zeros(r0, want);
            matmul(
                c.as_mut(),
                Accum::Replace,
                u64m.as_ref().transpose(),
                w.as_ref(),
                1.0,
                par,
            );
            matmul(w.as_mut(), Accum::Add, u64m.as_ref(), c.as_ref(), -1.0, par);
        }
    }
    // Then a Householder QR of the new block (same span as Gram-Schmidt, blocked, so it costs
    // milliseconds); a direction whose R diagonal is negligible against its norm is dropped.
    let norms: Vec<f64> = (0..want)
        .map(|c| w.col(c).iter().map(|x| x * x).sum::<f64>().sqrt())
        .collect();
    let qr = w.qr();
    let q = qr.compute_thin_Q();
    let r = qr.thin_R();
    let kept: Vec<usize> = (0..want)
        .filter(|&c| norms[c] > 1e-12 && r[(c, c)].abs() > 1e-6 * norms[c])
        .collect();
    let added = kept.len();
    let rank = r0 + added;
    let mut basis = vec![0f32; d * rank];
    for i in 0..d {
        basis[i * rank..i * rank + r0].copy_from_slice(&u.data[i * r0..(i + 1) * r0]);
        for (c, &k) in kept.iter().enumerate() {
            basis[i * rank + r0 + c] = q[(i, k)] as f32;
        }
    }
    // One more pass in f32 would not improve on this: the f64 columns rounded to f32 are
    // orthonormal to ~1e-7, which is what the 100-extension test checks.
    Ok(Extension { basis, rank, added })
}

/// `extend_basis` for many layers at once (rayon across layers when there are enough).
pub fn extend_bases(
    bases: &[Basis],
    reps: &[(&[f32], usize)],
    thresholds: &[f64],
    criteria: &[Criterion],
) -> Result<Vec<Extension>> {
    let l = bases.len();
    ensure(reps.len() == l, "reps", || {
        format!("expected one matrix per basis ({l}), got {}", reps.len())
    })?;
    ensure(thresholds.len() == l, "threshold", || {
        format!(
            "expected one threshold per basis ({l}), got {}",
            thresholds.len()
        )
    })?;
    ensure(criteria.len() == l, "criterion", || {
        format!(
            "expected one criterion per basis ({l}), got {}",
            criteria.len()
        )
    })?;
    let (across, par) = par_for(l);
    let run = |i: usize| {
        extend_basis(
            &bases[i],
            reps[i].0,
            reps[i].1,
            thresholds[i],
            criteria[i],
            par,
        )
        .map_err(|e| match e {
            Error::Value { arg, msg } => Error::value(format!("{arg}[{i}]"), msg),
            Error::Type { arg, msg } => Error::type_(format!("{arg}[{i}]"), msg),
        })
    };
    if across {
        (0..l).into_par_iter().map(run).collect()
    } else {
        (0..l).map(run).collect()
    }
}

#[cfg(test)]
mod tests;
