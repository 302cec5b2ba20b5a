#![no_main]
//! `accumulate` and `ssd_dampen`: no panic; an error leaves every accumulator / parameter as it was.

#[path = "bytes.rs"]
mod bytes;

use bytes::{same_bits, Bytes};
use forgetcore::importance::{accumulate, ssd_dampen, Mode};
use libfuzzer_sys::fuzz_target;

/// Lengths for `n` tensors: mostly equal pairs, sometimes one element off.
fn lengths(b: &mut Bytes, n: usize) -> Vec<(usize, usize)> {
    (0..n)
        .map(|_| {
            let len = usize::from(b.byte()) % 80;
            let other = if b.byte() % 16 == 0 { len + 1 } else { len };
            (len, other)
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let n = usize::from(b.byte()) % 5;
    let lens = lengths(&mut b, n);
    let scale = b.value();
    let mode = if b.flag() { Mode::Sq } else { Mode::Abs };
    let mut acc: Vec<Vec<f32>> = lens.iter().map(|&(l, _)| b.values(l)).collect();
    let grads: Vec<Vec<f32>> = lens.iter().map(|&(_, l)| b.values(l)).collect();
    let before = acc.clone();
    let grad_refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
    let extra = b.flag(); // one gradient too many or too few
    let grad_refs = if extra && !grad_refs.is_empty() {
        &grad_refs[1..]
    } else {
        &grad_refs[..]
    };
    let mut acc_refs: Vec<&mut [f32]> = acc.iter_mut().map(Vec::as_mut_slice).collect();
    if accumulate(&mut acc_refs, grad_refs, scale, mode).is_err() {
        assert!(acc.iter().zip(&before).all(|(a, b)| same_bits(a, b)));
    }

    let n = usize::from(b.byte()) % 5;
    let lens = lengths(&mut b, n);
    let (alpha, lam) = (b.value(), b.value());
    let mut params: Vec<Vec<f32>> = lens.iter().map(|&(l, _)| b.values(l)).collect();
    let full: Vec<Vec<f32>> = lens.iter().map(|&(_, l)| b.values(l)).collect();
    let forget: Vec<Vec<f32>> = lens.iter().map(|&(l, _)| b.values(l)).collect();
    let before = params.clone();
    let full_refs: Vec<&[f32]> = full.iter().map(Vec::as_slice).collect();
    let forget_refs: Vec<&[f32]> = forget.iter().map(Vec::as_slice).collect();
    let mut param_refs: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
    match ssd_dampen(&mut param_refs, &full_refs, &forget_refs, alpha, lam) {
        Ok(counts) => {
            assert_eq!(counts.len(), n);
            assert!(counts
                .iter()
                .zip(&lens)
                .all(|(&c, &(l, _))| c >= 0 && c as usize <= l));
        }
        Err(_) => assert!(params.iter().zip(&before).all(|(a, b)| same_bits(a, b))),
    }
});
