//! Basis growth: GPM's energy criterion and FOT's norm ratio over the residual's spectrum.

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use super::{check_basis, first_non_finite, par_for, Basis, Count, Criterion, Extension};
use crate::error::ensure;
use crate::{Error, Result};

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
    // Normalise first: the criteria are scale-invariant, but the f32 Gram matrix is not (its
    // entries are squares: A ~ 1e19 overflows it, A ~ 1e-20 underflows it, and the QR below
    // drops columns of norm <= 1e-12). A power of two scales exactly, so an input whose largest
    // entry is already in [1, 2) gives the same basis as before, and every other scale gives
    // that same basis too.
    let amax = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    if amax == 0.0 {
        return Ok(unchanged());
    }
    let scale = 2f64.powi(-(amax as f64).log2().floor() as i32);
    // Residual R = A - U (U^T A), on the scaled A (column-major, as faer's kernels prefer).
    let mut res = Mat::<f32>::from_fn(d, n, |i, j| (a[i * n + j] as f64 * scale) as f32);
    let sq = |m: MatRef<f32>| -> f64 {
        // Column by column: contiguous in the column-major matrices used here.
        (0..m.ncols())
            .map(|j| {
                m.col(j)
                    .iter()
                    .map(|&v| (v as f64) * (v as f64))
                    .sum::<f64>()
            })
            .sum()
    };
    let total = sq(res.as_ref());
    if r0 > 0 {
        let mut c = Mat::<f32>::zeros(r0, n);
        matmul(
            c.as_mut(),
            Accum::Replace,
            u.view().transpose(),
            res.as_ref(),
            1.0f32,
            par,
        );
        matmul(res.as_mut(), Accum::Add, u.view(), c.as_ref(), -1.0f32, par);
    }
    let res_e = sq(res.as_ref());
    if total == 0.0 || res_e <= total * 1e-12 {
        return Ok(unchanged());
    }
    // Gram matrix of the smaller side and its eigendecomposition, in f32 (as torch/LAPACK ssyevd
    // would); directions below the rounding floor are dropped and the chosen ones are
    // re-orthonormalised in f64 below. Only the lower triangle is formed (half the flops of a
    // full product): the symmetric eigensolver reads only that half.
    let wide = d <= n;
    let m = if wide { d } else { n };
    let mut gram = Mat::<f32>::zeros(m, m);
    let (lhs, rhs) = if wide {
        (res.as_ref(), res.as_ref().transpose())
    } else {
        (res.as_ref().transpose(), res.as_ref())
    };
    triangular::matmul(
        gram.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        lhs,
        BlockStructure::Rectangular,
        rhs,
        BlockStructure::Rectangular,
        1.0f32,
        par,
    );
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
mod scale_tests {
    use super::*;

    /// Rank-2 data (dim 6, 5 samples) with energies 1 and 0.25: the energy criterion at 0.97
    /// keeps both directions whatever the overall scale (regression: 1e19 and 1e-20 raised from
    /// the eigensolver, 1e-30 gave rank 0).
    #[test]
    fn extension_is_scale_invariant() {
        let (d, n) = (6usize, 5usize);
        let a: Vec<f32> = (0..d * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                let u1 = [1.0f32, 1.0, 0.0, 0.0, 1.0, 0.0][i];
                let u2 = [0.0f32, 1.0, -1.0, 1.0, 0.0, 0.0][i];
                u1 * [1.0f32, -1.0, 2.0, 0.5, 1.0][j] + 0.5 * u2 * [0.3f32, 1.0, -0.7, 0.2, 0.9][j]
            })
            .collect();
        let empty = Basis {
            data: &[],
            dim: d,
            rank: 0,
        };
        let crit = Criterion::Energy(Count::Reach);
        let want = extend_basis(&empty, &a, n, 0.97, crit, Par::Seq).unwrap();
        assert_eq!(want.rank, 2);
        for s in [1e19f32, 1e-20, 1e-30, 3.0e30, 1e-38] {
            let b: Vec<f32> = a.iter().map(|x| x * s).collect();
            let got = extend_basis(&empty, &b, n, 0.97, crit, Par::Seq).unwrap();
            assert_eq!(got.rank, 2, "scale {s}");
            // Same span: the projector U U^T agrees.
            for i in 0..d {
                for k in 0..d {
                    let p = |u: &[f32]| (0..2).map(|c| u[i * 2 + c] * u[k * 2 + c]).sum::<f32>();
                    assert!((p(&got.basis) - p(&want.basis)).abs() < 1e-5, "scale {s}");
                }
            }
        }
    }
}
