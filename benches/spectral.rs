//! Criterion benches of the spectral kernels: one GPT-2-small layer (4 matrices) by each method,
//! and the power-iteration norm of one 768x3072 matrix. `benches/bench_spectral.py` runs the
//! full sets against torch in the same run.

use criterion::{criterion_group, criterion_main, Criterion};
use forgetcore::spectral::{condition_numbers, spectral_norms, MatView, Method};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn random(m: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..m * n).map(|_| rng.random::<f32>() - 0.5).collect()
}

fn bench(c: &mut Criterion) {
    let shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)];
    let data: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(m, n))| random(m, n, i as u64))
        .collect();
    let mats: Vec<MatView<'_>> = data
        .iter()
        .zip(&shapes)
        .map(|(d, &(m, n))| MatView::new(d, m, n))
        .collect();
    let mut g = c.benchmark_group("kappa_gpt2_layer");
    g.sample_size(10);
    for (name, method) in [
        ("auto", Method::Auto),
        ("gram", Method::Gram),
        ("svd", Method::Svd),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| condition_numbers(&mats, method).unwrap())
        });
    }
    g.finish();
    let one = [mats[2]];
    let mut g = c.benchmark_group("spectral_norm_768x3072");
    g.sample_size(10);
    g.bench_function("power_iteration_tol1e-6", |b| {
        b.iter(|| spectral_norms(&one, 1e-6, 100, 0).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
