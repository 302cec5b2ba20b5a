#![no_main]
//! `project_out_` and `project_out_flat_`: no panic (sizes that overflow included); an error
//! leaves every gradient as it was.

#[path = "bytes.rs"]
mod bytes;

use bytes::{same_bits, Bytes};
use forgetcore::subspace::{project_out_, project_out_flat_, Basis, GradMut};
use libfuzzer_sys::fuzz_target;

/// A (dim, rank) row-major basis: the first `rank` unit vectors (orthonormal) or fuzzed values.
fn basis_values(b: &mut Bytes, dim: usize, rank: usize) -> Vec<f32> {
    if b.flag() && rank <= dim {
        (0..dim * rank)
            .map(|k| if k / rank == k % rank { 1.0 } else { 0.0 })
            .collect()
    } else {
        b.values(dim * rank)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let n = usize::from(b.byte()) % 4;
    // (rows, cols, dim, rank, grad values): cols == dim unless the fuzzer says otherwise
    let shapes: Vec<(usize, usize, usize, usize)> = (0..n)
        .map(|_| {
            let (rows, cols) = (b.size(6), b.size(6));
            let dim = if b.byte() % 8 == 0 { b.size(6) } else { cols };
            (rows, cols, dim, b.size(6))
        })
        .collect();
    if shapes
        .iter()
        .any(|&(r, c, d, k)| r.saturating_mul(c) > 64 || d.saturating_mul(k) > 64)
    {
        return; // the kernel only sees what numpy could hold: keep the buffers small
    }
    let mut grads: Vec<Vec<f32>> = shapes.iter().map(|&(r, c, _, _)| b.values(r * c)).collect();
    let bases: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(_, _, d, k)| basis_values(&mut b, d, k))
        .collect();
    let check = b.flag();
    let before = grads.clone();
    let mut views: Vec<GradMut> = grads
        .iter_mut()
        .zip(&shapes)
        .map(|(g, &(rows, cols, _, _))| GradMut {
            data: g.as_mut_slice(),
            rows,
            cols,
        })
        .collect();
    let basis_views: Vec<Basis> = bases
        .iter()
        .zip(&shapes)
        .map(|(u, &(_, _, dim, rank))| Basis {
            data: u.as_slice(),
            dim,
            rank,
        })
        .collect();
    if project_out_(&mut views, &basis_views, check).is_err() {
        assert!(grads.iter().zip(&before).all(|(g, g0)| same_bits(g, g0)));
    }

    let len = usize::from(b.byte()) % 17; // a buffer that exists; rank may be huge
    let rank = b.size(4);
    let mut g = b.values(len);
    let vectors = b.values(len * rank.min(4));
    let before = g.clone();
    if project_out_flat_(&mut g, &vectors, rank, b.flag()).is_err() {
        assert!(same_bits(&g, &before));
    }
});
