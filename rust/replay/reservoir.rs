//! Vitter's Algorithm R ("Random sampling with a reservoir", ACM TOMS 1985), one batch at a time.
//!
//! Item number `t` of the stream (0-based, counted over every batch) goes to slot `t` while the
//! reservoir is filling; afterwards it draws `r` uniform in `[0, t]` and replaces slot `r` when
//! `r < capacity`, else it is dropped. A batch draws in stream order, exactly as the
//! sequential algorithm would, so batching changes nothing: when two items of one batch pick the
//! same slot the later one wins (`last_writer_wins`), and one copy per surviving slot is all
//! that has to happen.

use super::rng::Xoshiro256pp;
use super::sample;
use crate::{Error, Result};

/// The whole decision state of a reservoir buffer: capacity, items seen, the random stream.
/// Storage lives with the caller; `add` says which rows go where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservoir {
    capacity: u64,
    seen: u64,
    rng: Xoshiro256pp,
}

impl Reservoir {
    pub fn new(capacity: u64, seed: u64) -> Result<Self> {
        if capacity == 0 || capacity > i64::MAX as u64 {
            return Err(Error::value(
                "capacity",
                format!("expected an int in [1, 2**63), got {capacity}"),
            ));
        }
        Ok(Reservoir {
            capacity,
            seen: 0,
            rng: Xoshiro256pp::seed_from_u64(seed),
        })
    }

    /// Restore a saved `(seen, rng)`, as `state` returned it.
    pub fn from_state(capacity: u64, seen: u64, rng: [u64; 4]) -> Result<Self> {
        let mut r = Reservoir::new(capacity, 0)?;
        if seen >= i64::MAX as u64 {
            return Err(Error::value(
                "seen",
                format!("expected a count below 2**63, got {seen}"),
            ));
        }
        r.rng = Xoshiro256pp::from_state(rng)?;
        r.seen = seen;
        Ok(r)
    }

    pub fn state(&self) -> (u64, [u64; 4]) {
        (self.seen, self.rng.state())
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn seen(&self) -> u64 {
        self.seen
    }

    pub fn len(&self) -> u64 {
        self.seen.min(self.capacity)
    }

    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }

    /// Decide the next `n` stream items: unique `(slot, row)` pairs in row order (later rows of
    /// the batch win a slot). Refuses, changing nothing, a batch that would overflow the count.
    pub fn add(&mut self, n: usize) -> Result<Vec<(i64, i64)>> {
        let Some(seen) = self
            .seen
            .checked_add(n as u64)
            .filter(|&s| s < i64::MAX as u64)
        else {
            return Err(Error::value(
                "batch",
                format!(
                    "{n} more items would overflow the count of items seen ({})",
                    self.seen
                ),
            ));
        };
        let mut pairs = decide(&mut self.rng, self.seen, self.capacity, n);
        last_writer_wins(&mut pairs);
        self.seen = seen;
        Ok(pairs)
    }

    /// `n` distinct stored slots, uniformly without replacement, in random order.
    pub fn sample(&mut self, n: u64) -> Result<Vec<i64>> {
        let size = self.len();
        sample::without_replacement(&mut self.rng, size, n)
    }
}

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

    #[test]
    fn state_machine_counts_and_restores() {
        assert!(Reservoir::new(0, 1).is_err());
        let mut r = Reservoir::new(3, 7).unwrap();
        assert_eq!(r.add(2).unwrap(), vec![(0, 0), (1, 1)]);
        assert_eq!((r.seen(), r.len()), (2, 2));
        r.add(10).unwrap();
        assert_eq!((r.seen(), r.len()), (12, 3));
        let (seen, rng) = r.state();
        let mut back = Reservoir::from_state(3, seen, rng).unwrap();
        assert_eq!(back.add(5).unwrap(), r.add(5).unwrap());
        assert_eq!(back.sample(3).unwrap(), r.sample(3).unwrap());
        // A count that would wrap is refused and changes nothing.
        assert!(Reservoir::from_state(3, u64::MAX - 2, rng).is_err());
        let mut big = Reservoir::from_state(3, i64::MAX as u64 - 2, rng).unwrap();
        let before = big.clone();
        assert!(big.add(5).is_err());
        assert_eq!(big, before);
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
