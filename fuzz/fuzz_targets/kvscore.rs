#![no_main]
//! kvscore's `accumulate`, `select_keep` and `evict_one`: no panic on any dims (overflowing
//! products included), positions, validity or scores; an error leaves the output as it was; a
//! success names slots inside the row.

#[path = "bytes.rs"]
mod bytes;

use bytes::{same_bits, Bytes};
use forgetcore::kvscore::{accumulate, evict_one, select_keep, Attn, Dims};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let dims = Dims {
        batch: b.size(3),
        heads: b.size(3),
        slots: b.size(12),
    };
    let small = dims.batch <= 3 && dims.heads <= 3 && dims.slots <= 12;
    let n = if small {
        dims.batch * dims.heads * dims.slots
    } else {
        0
    };
    let off = usize::from(b.byte() % 16 == 0); // now and then one element too many
    let scores = b.values(n + off);
    let positions: Vec<i64> = (0..n).map(|_| i64::from(b.byte() % 24) - 2).collect();
    let valid: Vec<bool> = (0..n).map(|_| b.byte() % 4 != 0).collect();
    let (budget, n_sink, n_recent) = (b.size(12), b.size(4), b.size(4));

    let rows = if small { dims.batch * dims.heads } else { 0 };
    let extra = usize::from(b.byte() % 16 == 0);
    let mut out = vec![-7i64; rows * budget.min(12) + extra];
    let before = out.clone();
    match select_keep(
        &scores, &positions, &valid, dims, budget, n_sink, n_recent, &mut out,
    ) {
        Ok(()) => assert!(out.iter().all(|&s| s >= 0 && (s as usize) < dims.slots)),
        Err(_) => assert_eq!(out, before),
    }
    let extra = usize::from(b.byte() % 16 == 0);
    let mut out = vec![-7i64; rows + extra];
    let before = out.clone();
    match evict_one(
        &scores, &positions, &valid, dims, n_sink, n_recent, &mut out,
    ) {
        Ok(()) => assert!(out.iter().all(|&s| s >= -1 && s < dims.slots as i64)),
        Err(_) => assert_eq!(out, before),
    }

    let (group, q) = (b.size(2), b.size(3));
    let attn_len = if small && group <= 2 && q <= 3 {
        rows * group * q * dims.slots
    } else {
        0
    };
    let attn_len = attn_len + usize::from(b.byte() % 16 == 0);
    let attn = b.values(attn_len);
    let mut acc = b.values(n);
    let with_valid = b.flag();
    let valid_opt = if with_valid {
        Some(valid.as_slice())
    } else {
        None
    };
    let (alpha, renorm) = (b.value(), b.flag());
    let before = acc.clone();
    if accumulate(
        &mut acc,
        Attn::F32(&attn),
        valid_opt,
        dims,
        group,
        q,
        alpha,
        renorm,
    )
    .is_err()
    {
        assert!(same_bits(&acc, &before));
    }
});
