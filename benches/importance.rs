//! Criterion benchmark of the importance kernels against a stream triad over the same bytes.
//!
//! `cargo bench --bench importance`. The shapes are those of ResNet-18 with a 10-class head
//! (11.2M float32); GB/s counts 12 bytes per element for every kernel (three streams), plus
//! the writes of the ~1 % dampened elements for SSD, which criterion's throughput ignores.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use forgetcore::importance::{accumulate, ssd_dampen, triad, validate, Mode};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn resnet18_sizes() -> Vec<usize> {
    // conv1 + bn1, 4 stages x 2 basic blocks (conv, bn, conv, bn, optional 1x1 downsample + bn), fc.
    let mut v = vec![64 * 3 * 7 * 7, 64, 64];
    let mut cin = 64;
    for (stage, cout) in [64usize, 128, 256, 512].into_iter().enumerate() {
        for block in 0..2 {
            let c_in = if block == 0 { cin } else { cout };
            v.extend([cout * c_in * 9, cout, cout, cout * cout * 9, cout, cout]);
            if block == 0 && stage > 0 {
                v.extend([cout * c_in, cout, cout]);
            }
        }
        cin = cout;
    }
    v.extend([10 * 512, 10]);
    v
}

fn bench(c: &mut Criterion) {
    let sizes = resnet18_sizes();
    let n: usize = sizes.iter().sum();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0);
    let mk = |rng: &mut Xoshiro256PlusPlus, scale: f32| -> Vec<Vec<f32>> {
        sizes
            .iter()
            .map(|&s| (0..s).map(|_| rng.random::<f32>() * scale).collect())
            .collect()
    };
    let mut params = mk(&mut rng, 1.0);
    let full = mk(&mut rng, 1.0);
    let forget: Vec<Vec<f32>> = full
        .iter()
        .map(|d| d.iter().map(|&x| x * rng.random::<f32>() * 10.1).collect())
        .collect();
    let dref: Vec<&[f32]> = full.iter().map(|v| v.as_slice()).collect();
    let fref: Vec<&[f32]> = forget.iter().map(|v| v.as_slice()).collect();

    let mut g = c.benchmark_group("importance_resnet18_11M");
    g.sample_size(20);
    g.throughput(Throughput::Bytes((12 * n) as u64));
    g.bench_function("ssd_dampen", |b| {
        b.iter(|| {
            let mut p: Vec<&mut [f32]> = params.iter_mut().map(|v| v.as_mut_slice()).collect();
            ssd_dampen(&mut p, &dref, &fref, 10.0, 1.0).unwrap()
        })
    });
    g.throughput(Throughput::Bytes((8 * n) as u64));
    g.bench_function("validate_two_importances", |b| {
        b.iter(|| (validate(&dref), validate(&fref)))
    });
    g.throughput(Throughput::Bytes((12 * n) as u64));
    let mut acc = mk(&mut rng, 1.0);
    g.bench_function("accumulate_sq", |b| {
        b.iter(|| {
            let mut a: Vec<&mut [f32]> = acc.iter_mut().map(|v| v.as_mut_slice()).collect();
            accumulate(&mut a, &fref, 1.0, Mode::Sq).unwrap()
        })
    });
    let mut ta = vec![0.0f32; n];
    let (tb, tc) = (vec![1.0f32; n], vec![2.0f32; n]);
    g.bench_function("stream_triad", |b| b.iter(|| triad(&mut ta, &tb, &tc, 3.0)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
