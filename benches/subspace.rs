//! Criterion benches of the subspace kernels without Python: projection of 12 (768 x 3072)
//! gradients at rank 64 and 256, and basis extension of 12 (768 x 512) matrices from rank 64.
//! The comparisons with torch and GPM's own code are in bench_subspace.py.

use criterion::{criterion_group, criterion_main, Criterion};
use faer::Par;
use forgetcore::subspace::{extend_bases, project_out_, Basis, Count, Criterion as Crit, GradMut};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn randn(rng: &mut Xoshiro256PlusPlus, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

fn basis(rng: &mut Xoshiro256PlusPlus, d: usize, r: usize) -> Vec<f32> {
    let a = randn(rng, d * r);
    forgetcore::subspace::extend_basis(
        &Basis {
            data: &[],
            dim: d,
            rank: 0,
        },
        &a,
        r,
        1.0,
        Crit::Energy(Count::Reach),
        Par::rayon(0),
    )
    .unwrap()
    .basis
}

fn bench(c: &mut Criterion) {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0);
    let (layers, out, inp) = (12, 768, 3072);
    let mut grads: Vec<Vec<f32>> = (0..layers).map(|_| randn(&mut rng, out * inp)).collect();
    for rank in [64usize, 256] {
        let bases: Vec<Vec<f32>> = (0..layers).map(|_| basis(&mut rng, inp, rank)).collect();
        c.bench_function(&format!("project_out_ 12x768x3072 rank {rank}"), |b| {
            b.iter(|| {
                let mut views: Vec<GradMut> = grads
                    .iter_mut()
                    .map(|g| GradMut {
                        data: g,
                        rows: out,
                        cols: inp,
                    })
                    .collect();
                let bs: Vec<Basis> = bases
                    .iter()
                    .map(|u| Basis {
                        data: u,
                        dim: inp,
                        rank,
                    })
                    .collect();
                project_out_(&mut views, &bs, true).unwrap();
            })
        });
    }
    let (d, n, r0) = (768, 512, 64);
    let reps: Vec<Vec<f32>> = (0..layers).map(|_| randn(&mut rng, d * n)).collect();
    let bases: Vec<Vec<f32>> = (0..layers).map(|_| basis(&mut rng, d, r0)).collect();
    c.bench_function("extend_bases 12x768x512 from rank 64", |b| {
        b.iter(|| {
            let bs: Vec<Basis> = bases
                .iter()
                .map(|u| Basis {
                    data: u,
                    dim: d,
                    rank: r0,
                })
                .collect();
            let rs: Vec<(&[f32], usize)> = reps.iter().map(|a| (a.as_slice(), n)).collect();
            extend_bases(&bs, &rs, &[0.97; 12], &[Crit::Energy(Count::Official); 12]).unwrap()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);
