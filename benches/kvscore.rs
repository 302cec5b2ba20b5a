//! Criterion benchmarks of the kvscore kernels at the decode-step shape:
//! batch 1, 32 kv heads, T = 4096 slots, keep 1,024 + 128 recent (+ 4 sinks).

use criterion::{criterion_group, criterion_main, Criterion};
use forgetcore::kvscore::{accumulate, evict_one, select_keep, Attn, Dims};

fn rnd(n: usize, mut x: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (h, t, budget) = (32usize, 4096usize, 1024 + 128 + 4);
    let dims = Dims {
        batch: 1,
        heads: h,
        slots: t,
    };
    let mut scores = rnd(h * t, 1);
    let row = rnd(h * t, 2);
    let pos: Vec<i64> = (0..h).flat_map(|_| 0..t as i64).collect();
    let valid = vec![true; h * t];
    let mut out = vec![0i64; h * budget];
    c.bench_function("accumulate q=1 (1x32x4096)", |b| {
        b.iter(|| accumulate(&mut scores, Attn::F32(&row), None, dims, 1, 1, 0.9, false).unwrap())
    });
    c.bench_function("select_keep 4096 -> 1156 (32 heads)", |b| {
        b.iter(|| select_keep(&scores, &pos, &valid, dims, budget, 4, 128, &mut out).unwrap())
    });
    let sd = Dims {
        batch: 1,
        heads: h,
        slots: budget + 1,
    };
    let s2 = rnd(h * (budget + 1), 3);
    let p2: Vec<i64> = (0..h).flat_map(|_| 0..(budget + 1) as i64).collect();
    let v2 = vec![true; h * (budget + 1)];
    let mut ev = vec![0i64; h];
    c.bench_function("evict_one at budget 1156 (32 heads)", |b| {
        b.iter(|| evict_one(&s2, &p2, &v2, sd, 4, 128, &mut ev).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
