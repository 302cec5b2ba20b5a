//! Vitter's Algorithm R ("Random sampling with a reservoir", ACM TOMS 1985), one batch at a time.
//!
//! Item number `t` of the stream (0-based, counted over every batch) goes to slot `t` while the
//! reservoir is filling; afterwards it draws `r` uniform in `[0, t]` and replaces slot `r` when
//! `r < capacity`, else it is dropped. A batch draws in stream order, exactly as the
//! sequential algorithm would, so batching changes nothing: when two items of one batch pick the
//! same slot the later one wins (`last_writer_wins`), and one copy per surviving slot is all
//! that has to happen.

use super::rng::Xoshiro256pp;

/// Decide the slot of each of the next `n` stream items, `seen` items having come before.
///
/// Returns `(slot, row)` for every item that is written, in batch order, before removing
/// the writes that later items of the same batch overwrite. Consumes one draw per item once
/// the reservoir is full, none before.
pub fn decide(rng: &mut Xoshiro256pp, seen: u64, capacity: u64, n: usize) -> Vec<(i64, i64)> {
    let mut out = Vec::with_capacity(n.min(64));
    for row in 0..n {
        let t = seen + row as u64;
        let slot = if t < capacity {
            t
        } else {
            let r = rng.below(t + 1);
            if r >= capacity {
                continue;
            }
            r
        };
        out.push((slot as i64, row as i64));
    }
    out
}

/// Keep, for each slot, only the last row that writes it; the result stays in row order.
///
/// Sorting is skipped when the slots are already strictly increasing (the filling phase and
/// most batches once full), so the common case costs one pass.
pub fn last_writer_wins(pairs: &mut Vec<(i64, i64)>) {
    if pairs.windows(2).all(|w| w[0].0 < w[1].0) {
        return;
    }
    // Sort by slot then row, keep the last of each slot, back to row order.
    pairs.sort_unstable();
    let mut kept: Vec<(i64, i64)> = Vec::with_capacity(pairs.len());
    for &p in pairs.iter() {
        match kept.last_mut() {
            Some(last) if last.0 == p.0 => *last = p,
            _ => kept.push(p),
        }
    }
    kept.sort_unstable_by_key(|&(_, row)| row);
    *pairs = kept;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook algorithm, one item at a time, on a slot -> item array.
    fn sequential(seed: u64, capacity: u64, stream: u64) -> Vec<i64> {
        let mut rng = Xoshiro256pp::seed_from_u64(seed);
        let mut store = vec![-1i64; capacity as usize];
        for t in 0..stream {
            if t < capacity {
                store[t as usize] = t as i64;
            } else {
                let r = rng.below(t + 1);
                if r < capacity {
                    store[r as usize] = t as i64;
                }
            }
        }
        store
    }

    fn batched(seed: u64, capacity: u64, batches: &[usize]) -> Vec<i64> {
        let mut rng = Xoshiro256pp::seed_from_u64(seed);
        let mut store = vec![-1i64; capacity as usize];
        let mut seen = 0u64;
        for &n in batches {
            let mut pairs = decide(&mut rng, seen, capacity, n);
            last_writer_wins(&mut pairs);
            let mut slots: Vec<i64> = pairs.iter().map(|p| p.0).collect();
            slots.sort_unstable();
            slots.dedup();
            assert_eq!(slots.len(), pairs.len(), "slots must be unique");
            assert!(
                pairs.windows(2).all(|w| w[0].1 < w[1].1),
                "rows must stay in order"
            );
            for (slot, row) in pairs {
                store[slot as usize] = seen as i64 + row;
            }
            seen += n as u64;
        }
        store
    }

    #[test]
    fn fills_then_replaces() {
        let mut rng = Xoshiro256pp::seed_from_u64(0);
        assert_eq!(decide(&mut rng, 0, 3, 2), vec![(0, 0), (1, 1)]);
        assert!(decide(&mut rng, 0, 3, 0).is_empty());
        let before = rng.clone();
        // Filling consumes no randomness.
        decide(&mut rng, 0, 5, 5);
        assert_eq!(rng, before);
    }

    #[test]
    fn later_duplicate_wins() {
        let mut p = vec![(4, 0), (2, 1), (4, 2), (1, 3), (2, 5)];
        last_writer_wins(&mut p);
        assert_eq!(p, vec![(4, 2), (1, 3), (2, 5)]);
    }

    proptest! {
        #[test]
        fn batched_equals_sequential(seed in any::<u64>(), capacity in 1u64..40,
                                     batches in proptest::collection::vec(0usize..50, 0..12)) {
            let total: u64 = batches.iter().map(|&b| b as u64).sum();
            prop_assert_eq!(batched(seed, capacity, &batches), sequential(seed, capacity, total));
        }
    }
}
