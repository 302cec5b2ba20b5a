//! Importance family: fused multi-tensor kernels over lists of float32 slices.
//!
//! * [`accumulate`]: `acc += scale * g²` (or `scale * |g|`) for every tensor of a list — the
//!   inner step of every diagonal-Fisher / MAS importance estimate.
//! * [`ssd_dampen`]: Selective Synaptic Dampening (Foster et al., AAAI 2024): wherever
//!   `imp_forget > alpha * imp_full`, `theta *= min(lam * imp_full / imp_forget, 1)`.
//! * [`validate`]: one read pass that finds the first NaN, infinite or negative importance.
//!
//! [`contract`] holds the argument checks of each entry point, shared with the CUDA launchers.
//!
//! All three split every tensor into chunks of [`CHUNK`] elements and hand the chunks of the
//! whole list to rayon at once, so one big tensor and many small ones balance alike over the
//! threads. Arithmetic is plain IEEE float32 in the same order as `reference.py` (no fused
//! multiply-add: Rust never contracts), which is what makes the results bit-identical to torch.

use rayon::prelude::*;

use crate::Result;

pub mod contract;
mod simd;
use simd::Bad;

/// Elements per work item: large enough to amortise scheduling, small enough to balance.
pub const CHUNK: usize = 1 << 15;

/// What [`accumulate`] adds: `scale * g * g` or `scale * |g|`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sq,
    Abs,
}

/// `acc[t][i] += (g[t][i] * g[t][i]) * scale` (`Mode::Sq`) or `|g[t][i]| * scale` (`Mode::Abs`).
///
/// The order `(g * g) * scale` matches the reference `acc += (g * g) * scale`.
pub fn accumulate(acc: &mut [&mut [f32]], grads: &[&[f32]], scale: f32, mode: Mode) -> Result<()> {
    let lens: Vec<usize> = acc.iter().map(|a| a.len()).collect();
    contract::accumulate(
        &lens,
        &grads.iter().map(|g| g.len()).collect::<Vec<_>>(),
        scale,
    )?;
    let mut work: Vec<(&mut [f32], &[f32])> = Vec::new();
    for (a, g) in acc.iter_mut().zip(grads) {
        for (ac, gc) in a.chunks_mut(CHUNK).zip(g.chunks(CHUNK)) {
            work.push((ac, gc));
        }
    }
    work.into_par_iter()
        .for_each(|(a, g)| simd::accumulate(a, g, scale, mode == Mode::Sq));
    Ok(())
}

/// Index (tensor, element) of the first value that is NaN, infinite or negative, if any.
pub fn validate(imps: &[&[f32]]) -> Option<(usize, usize, f32)> {
    first_bad(imps, Bad::NotNonNegativeFinite)
}

/// Index (tensor, element) of the first NaN or infinity, if any: the check of gradients
/// before [`accumulate`] writes anything.
pub fn find_nonfinite(xs: &[&[f32]]) -> Option<(usize, usize, f32)> {
    first_bad(xs, Bad::NotFinite)
}

/// One parallel read pass over every chunk; the position is looked up only in a bad chunk.
fn first_bad(xs: &[&[f32]], kind: Bad) -> Option<(usize, usize, f32)> {
    let mut work: Vec<(usize, usize, &[f32])> = Vec::new();
    for (t, s) in xs.iter().enumerate() {
        for (c, chunk) in s.chunks(CHUNK).enumerate() {
            work.push((t, c * CHUNK, chunk));
        }
    }
    work.into_par_iter()
        .filter_map(|(t, off, s)| {
            if !simd::any_bad(s, kind) {
                return None;
            }
            let i = simd::first_bad(s, kind)?;
            Some((t, off + i, s[i]))
        })
        .min_by_key(|&(t, i, _)| (t, i))
}

/// One chunk of SSD's work: (tensor index, theta, imp_full, imp_forget).
type DampenWork<'a> = (usize, &'a mut [f32], &'a [f32], &'a [f32]);

/// SSD dampening over a list of tensors; returns the number of selected elements per tensor.
///
/// `alpha` and `lam` are the float32 values the reference multiplies by (torch casts a Python
/// scalar to the tensor's float32 before multiplying). Importances are not validated here:
/// call [`validate`] first unless they are known to be finite and non-negative.
pub fn ssd_dampen(
    params: &mut [&mut [f32]],
    imp_full: &[&[f32]],
    imp_forget: &[&[f32]],
    alpha: f32,
    lam: f32,
) -> Result<Vec<i64>> {
    let lens: Vec<usize> = params.iter().map(|p| p.len()).collect();
    let lens_of = |xs: &[&[f32]]| xs.iter().map(|x| x.len()).collect::<Vec<_>>();
    contract::ssd_dampen(&lens, &lens_of(imp_full), &lens_of(imp_forget), alpha, lam)?;
    let mut work: Vec<DampenWork> = Vec::new();
    for (t, ((p, d), f)) in params.iter_mut().zip(imp_full).zip(imp_forget).enumerate() {
        for ((pc, dc), fc) in p
            .chunks_mut(CHUNK)
            .zip(d.chunks(CHUNK))
            .zip(f.chunks(CHUNK))
        {
            work.push((t, pc, dc, fc));
        }
    }
    let counts: Vec<(usize, i64)> = work
        .into_par_iter()
        .map(|(t, p, d, f)| (t, simd::dampen(p, d, f, alpha, lam)))
        .collect();
    let mut out = vec![0i64; lens.len()];
    for (t, c) in counts {
        out[t] += c;
    }
    Ok(out)
}

/// Stream triad `a = b + s * c` over the same threads and chunking as the kernels: the
/// bandwidth yardstick the benchmarks report against.
pub fn triad(a: &mut [f32], b: &[f32], c: &[f32], s: f32) {
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .zip(c.par_chunks(CHUNK))
        .for_each(|((a, b), c)| {
            for ((a, &b), &c) in a.iter_mut().zip(b).zip(c) {
                *a = b + s * c;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(theta: &mut [f32], d: &[f32], f: &[f32], alpha: f32, lam: f32) -> i64 {
        simd::dampen_scalar(theta, d, f, alpha, lam)
    }

    #[test]
    fn dampens_only_selected_and_caps_at_one() {
        let mut p = vec![1.0f32, 2.0, 3.0, 4.0];
        let d = [1.0f32, 0.0, 1.0, 1.0];
        let f = [20.0f32, 1.0, 5.0, 11.0];
        let mut ps: Vec<&mut [f32]> = vec![&mut p];
        let c = ssd_dampen(&mut ps, &[&d], &[&f], 10.0, 1.0).unwrap();
        assert_eq!(c, vec![3]);
        assert_eq!(p, vec![1.0 / 20.0, 0.0, 3.0, 4.0 / 11.0]);
        // lam large: beta capped at 1, theta unchanged but still counted as selected.
        let mut q = vec![5.0f32];
        let mut qs: Vec<&mut [f32]> = vec![&mut q];
        assert_eq!(
            ssd_dampen(&mut qs, &[&[1.0]], &[&[20.0]], 10.0, 100.0).unwrap(),
            vec![1]
        );
        assert_eq!(q, vec![5.0]);
    }

    #[test]
    fn rejects_mismatch_and_bad_scalars() {
        let mut p = vec![0.0f32; 3];
        let mut ps: Vec<&mut [f32]> = vec![&mut p];
        let e = ssd_dampen(&mut ps, &[&[0.0; 2]], &[&[0.0; 3]], 1.0, 1.0).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("imp_full: tensor 0: expected 3 elements, got 2"));
        assert!(ssd_dampen(&mut ps, &[&[0.0; 3]], &[], 1.0, 1.0).is_err());
        assert!(ssd_dampen(&mut ps, &[&[0.0; 3]], &[&[0.0; 3]], f32::NAN, 1.0).is_err());
        assert!(ssd_dampen(&mut ps, &[&[0.0; 3]], &[&[0.0; 3]], 1.0, -1.0).is_err());
        let mut a = vec![0.0f32; 2];
        let mut acc: Vec<&mut [f32]> = vec![&mut a];
        assert!(accumulate(&mut acc, &[&[1.0]], 1.0, Mode::Sq).is_err());
        assert!(accumulate(&mut acc, &[&[1.0, 2.0]], f32::INFINITY, Mode::Sq).is_err());
    }

    #[test]
    fn validate_finds_first_bad_value() {
        let a = vec![0.0f32; 100_000];
        let mut b = vec![1.0f32; 70_000];
        assert_eq!(validate(&[&a, &b]), None);
        b[66_000] = -1.0;
        b[40_000] = f32::NAN;
        let (t, i, _) = validate(&[&a, &b]).unwrap();
        assert_eq!((t, i), (1, 40_000));
        assert!(validate(&[&[f32::INFINITY]]).is_some());
        assert!(validate(&[&[f32::NEG_INFINITY]]).is_some());
        assert!(validate(&[&[-1e-45]]).is_some());
        assert_eq!(validate(&[&[-0.0, 0.0, f32::MAX, 1e-45]]), None);
        assert_eq!(validate(&[]), None);
    }

    #[test]
    fn find_nonfinite_allows_negatives_and_finds_the_first() {
        let a = vec![-3.0f32; 100_000];
        let mut b = vec![f32::MAX; 70_000];
        b[0] = -0.0;
        assert_eq!(find_nonfinite(&[&a, &b]), None);
        b[66_000] = f32::NEG_INFINITY;
        b[40_000] = f32::NAN;
        let (t, i, _) = find_nonfinite(&[&a, &b]).unwrap();
        assert_eq!((t, i), (1, 40_000));
        assert_eq!(find_nonfinite(&[&[f32::INFINITY]]).map(|r| r.1), Some(0));
        assert_eq!(find_nonfinite(&[]), None);
    }

    #[test]
    fn empty_lists_and_tensors() {
        let mut ps: Vec<&mut [f32]> = vec![];
        assert_eq!(
            ssd_dampen(&mut ps, &[], &[], 1.0, 1.0).unwrap(),
            Vec::<i64>::new()
        );
        let mut e: Vec<f32> = vec![];
        let mut ps: Vec<&mut [f32]> = vec![&mut e];
        assert_eq!(
            ssd_dampen(&mut ps, &[&[]], &[&[]], 1.0, 1.0).unwrap(),
            vec![0]
        );
    }

    proptest! {
        #![proptest_config(crate::parallel::proptest_cases(256))]
        #[test]
        fn chunked_parallel_equals_scalar(
            n in 0usize..(3 * CHUNK + 37),
            seed in any::<u64>(),
            alpha in 0.0f32..20.0,
            lam in 0.0f32..3.0,
        ) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
            let theta: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let d: Vec<f32> = (0..n).map(|_| if rng.random::<f32>() < 0.1 { 0.0 } else { rng.random::<f32>() }).collect();
            let f: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 10.0).collect();
            let mut want = theta.clone();
            let wc = naive(&mut want, &d, &f, alpha, lam);
            let mut got = theta.clone();
            let mut gs: Vec<&mut [f32]> = vec![&mut got];
            let gc = ssd_dampen(&mut gs, &[&d], &[&f], alpha, lam).unwrap();
            prop_assert_eq!(gc, vec![wc]);
            prop_assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));

            let mut acc = theta.clone();
            let mut accs: Vec<&mut [f32]> = vec![&mut acc];
            accumulate(&mut accs, &[&f], 0.5, Mode::Sq).unwrap();
            for i in 0..n {
                prop_assert_eq!(acc[i].to_bits(), (theta[i] + (f[i] * f[i]) * 0.5).to_bits());
            }
        }
    }

    fn vecs(
        rng: &mut rand_xoshiro::Xoshiro256PlusPlus,
        lens: &[usize],
        special: bool,
    ) -> Vec<Vec<f32>> {
        use rand::Rng;
        lens.iter()
            .map(|&n| {
                (0..n)
                    .map(|_| match rng.random_range(0..40) {
                        0 if special => f32::NAN,
                        1 if special => f32::INFINITY,
                        2 if special => -1.0,
                        _ => rng.random::<f32>() * 4.0,
                    })
                    .collect()
            })
            .collect()
    }

    fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
        v.iter()
            .map(|x| x.iter().map(|f| f.to_bits()).collect())
            .collect()
    }

    proptest! {
        #![proptest_config(crate::parallel::proptest_cases(256))]
        /// The entry points with random tensor counts, lengths (often mismatched), special
        /// values and scalars: an error exactly when the contract is broken, no panic, and
        /// nothing written when it errs; validation finds exactly the first bad importance.
        #[test]
        fn entry_points_refuse_broken_contracts_without_writing(
            lens in proptest::collection::vec(0usize..300, 0..5),
            other in proptest::collection::vec(0usize..300, 0..5),
            same in any::<bool>(),
            seed in any::<u64>(),
            scale in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(-1.0f32), 0.0f32..3.0],
            lam in prop_oneof![Just(f32::NAN), Just(-0.5f32), 0.0f32..3.0],
        ) {
            use rand::SeedableRng;
            let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
            let other = if same { lens.clone() } else { other };
            let acc0 = vecs(&mut rng, &lens, false);
            let g = vecs(&mut rng, &other, false);
            let gs: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();

            let mut acc = acc0.clone();
            let mut accs: Vec<&mut [f32]> = acc.iter_mut().map(|a| a.as_mut_slice()).collect();
            let ok = lens == other && scale.is_finite();
            let r = accumulate(&mut accs, &gs, scale, Mode::Abs);
            prop_assert_eq!(r.is_ok(), ok);
            if !ok {
                prop_assert_eq!(bits(&acc), bits(&acc0));
            }

            let imp = vecs(&mut rng, &other, true);
            let is: Vec<&[f32]> = imp.iter().map(|x| x.as_slice()).collect();
            let want = imp.iter().enumerate().find_map(|(t, x)| {
                x.iter().position(|v| !(*v >= 0.0 && v.is_finite())).map(|i| (t, i))
            });
            prop_assert_eq!(validate(&is).map(|(t, i, _)| (t, i)), want);

            let mut p = acc0.clone();
            let mut ps: Vec<&mut [f32]> = p.iter_mut().map(|a| a.as_mut_slice()).collect();
            let ok = lens == other && lam.is_finite() && lam >= 0.0;
            let r = ssd_dampen(&mut ps, &gs, &gs, 1.0, lam);
            prop_assert_eq!(r.is_ok(), ok);
            if !ok {
                prop_assert_eq!(bits(&p), bits(&acc0));
            }
        }
    }
}
