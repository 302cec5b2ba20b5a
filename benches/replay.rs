//! Criterion benchmarks of the replay kernels (no Python): the per-batch work behind
//! `ReservoirBuffer.add` and `ClassBalancedReservoir.add` in the steady state (buffer full,
//! 100k items seen), and `sample`. Run with `cargo bench --bench replay`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use forgetcore::replay::{copy, reservoir, sample, Cbrs, Xoshiro256pp};
use std::hint::black_box;

const CAPACITY: u64 = 5000;
const BATCH: usize = 32;
const ROW: usize = 3 * 32 * 32 * 4;

fn reservoir_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("reservoir");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("decide batch 32", |b| {
        let mut rng = Xoshiro256pp::seed_from_u64(0);
        let mut seen = 100_000u64;
        b.iter(|| {
            let mut pairs = reservoir::decide(&mut rng, seen, CAPACITY, BATCH);
            reservoir::last_writer_wins(&mut pairs);
            seen += BATCH as u64;
            black_box(pairs)
        })
    });
    g.bench_function("decide + copy batch 32 of 3x32x32 f32", |b| {
        let mut rng = Xoshiro256pp::seed_from_u64(0);
        let mut seen = 100_000u64;
        let mut storage = vec![0u8; CAPACITY as usize * ROW];
        let batch = vec![1u8; BATCH * ROW];
        b.iter(|| {
            let mut pairs = reservoir::decide(&mut rng, seen, CAPACITY, BATCH);
            reservoir::last_writer_wins(&mut pairs);
            copy::scatter_rows(&mut storage, &batch, ROW, &pairs).unwrap();
            seen += BATCH as u64;
        })
    });
    g.bench_function("fill: copy 32 rows of 3x32x32 f32", |b| {
        let mut storage = vec![0u8; CAPACITY as usize * ROW];
        let batch = vec![1u8; BATCH * ROW];
        let mut start = 0i64;
        b.iter(|| {
            let pairs: Vec<(i64, i64)> = (0..BATCH as i64)
                .map(|r| ((start + r) % CAPACITY as i64, r))
                .collect();
            copy::scatter_rows(&mut storage, &batch, ROW, &pairs).unwrap();
            start = (start + BATCH as i64) % CAPACITY as i64;
        })
    });
    g.finish();
}

fn cbrs_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("cbrs");
    g.throughput(Throughput::Elements(100 * BATCH as u64));
    // Long-tailed labels over 100 classes, p(c) ~ 1/(c+1), from a fixed generator.
    let mut lab = Xoshiro256pp::seed_from_u64(1);
    let weights: Vec<f64> = (1..=100).map(|c| 1.0 / c as f64).collect();
    let total: f64 = weights.iter().sum();
    let labels: Vec<i64> = (0..200_000)
        .map(|_| {
            let mut u = (lab.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
            let mut c = 0;
            while c < 99 && u >= weights[c] {
                u -= weights[c];
                c += 1;
            }
            c as i64
        })
        .collect();
    g.bench_function("decide 100 batches of 32, 100 classes", |b| {
        b.iter_batched_ref(
            || {
                let mut cb = Cbrs::new(CAPACITY as usize).unwrap();
                let mut rng = Xoshiro256pp::seed_from_u64(0);
                cb.decide(&mut rng, &labels[..100_000]);
                (cb, rng, 100_000usize)
            },
            |(cb, rng, at)| {
                for _ in 0..100 {
                    black_box(cb.decide(rng, &labels[*at..*at + BATCH]));
                    *at += BATCH;
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn sample_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("sample");
    g.throughput(Throughput::Elements(32));
    g.bench_function("32 of 5000 without replacement", |b| {
        let mut rng = Xoshiro256pp::seed_from_u64(0);
        b.iter(|| black_box(sample::without_replacement(&mut rng, CAPACITY, 32).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, reservoir_benches, cbrs_benches, sample_benches);
criterion_main!(benches);
