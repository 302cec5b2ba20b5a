#![no_main]
//! The reservoir: no panic for any capacity, counter or batch size; every decision names a slot
//! below the capacity; `seen` and `len` keep the reservoir invariant.

#[path = "bytes.rs"]
mod bytes;

use bytes::Bytes;
use forgetcore::replay::Reservoir;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let capacity = if b.flag() {
        b.u64()
    } else {
        u64::from(b.byte())
    };
    let seen = if b.flag() {
        b.u64()
    } else {
        u64::from(b.byte())
    };
    let rng = [b.u64(), b.u64(), b.u64(), b.u64()];
    let Ok(mut r) = Reservoir::from_state(capacity, seen, rng) else {
        return;
    };
    for _ in 0..4 {
        let n = usize::from(b.byte());
        let seen_before = r.seen();
        match r.add(n) {
            Ok(writes) => {
                assert!(writes.iter().all(|&(slot, row)| slot >= 0
                    && (slot as u64) < r.capacity()
                    && row >= 0
                    && (row as usize) < n));
                assert_eq!(r.seen(), seen_before + n as u64);
                assert_eq!(r.len(), r.seen().min(r.capacity()));
            }
            Err(_) => assert_eq!(r.seen(), seen_before),
        }
        let k = u64::from(b.byte());
        if let Ok(idx) = r.sample(k) {
            assert!(idx.iter().all(|&i| i >= 0 && (i as u64) < r.len()));
        }
    }
});
