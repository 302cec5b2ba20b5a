//! Class-balancing reservoir sampling (CBRS): Chrysakis and Moens, "Online Continual Learning
//! from Imbalanced Data", ICML 2020, Algorithm 1.
//!
//! Per stream item `(x, y)`:
//! - while the memory is not full, store it;
//! - once full, if `y` is not a *full* class, overwrite a random stored item of the *largest*
//!   class (ties: uniform over every instance of every tied class);
//! - if `y` is full, the item goes through `y`'s own reservoir: with `m_y` stored and `n_y`
//!   seen (this one included) it is kept with probability `m_y / n_y`, replacing a random stored
//!   item of `y`.
//!
//! A class is full once it has been the largest (it stays full). The paper leaves open whether
//! "has been the largest" counts the filling phase; here it is judged only once the memory is
//! full (the only time Algorithm 1 asks), at every step, before the item is placed.
//!
//! Everything is O(1) per item except tie handling (O(number of tied classes)): per-class slot
//! lists with each slot's position (a stored item leaves its class by a swap-remove), and
//! classes bucketed by stored count so the largest ones are `bucket[max]`. Randomness is drawn
//! in a fixed order from one xoshiro256++ stream, and tied classes are ordered by label value,
//! so the decisions depend only on the seed and the label sequence (not on hash order): the
//! Python reference (`forgetcore.reference.CbrsReference`) replays them exactly.

use std::collections::HashMap;

use super::rng::Xoshiro256pp;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Cbrs {
    capacity: usize,
    seen: u64,
    /// Per class (in order of first appearance): its label, stream count, full flag, slots.
    labels: Vec<i64>,
    n_seen: Vec<u64>,
    full: Vec<bool>,
    slots: Vec<Vec<u32>>,
    index: HashMap<i64, u32>,
    /// Per stored slot: its class and its position in that class's slot list.
    slot_class: Vec<u32>,
    slot_pos: Vec<u32>,
    /// `bucket[c]`: the classes with exactly `c >= 1` stored items; `max`: the largest such `c`.
    bucket: Vec<Vec<u32>>,
    bucket_pos: Vec<u32>,
    max: usize,
    scratch: Vec<u32>,
}

/// What `Cbrs::state` returns and `Cbrs::from_state` takes: the classes in internal order and
/// their slot lists concatenated (`offsets[k]..offsets[k+1]`), list order included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CbrsState {
    pub capacity: usize,
    pub seen: u64,
    pub labels: Vec<i64>,
    pub n_seen: Vec<u64>,
    pub full: Vec<bool>,
    pub offsets: Vec<usize>,
    pub slots: Vec<u32>,
}

impl Cbrs {
    pub fn new(capacity: usize) -> Result<Self> {
        if capacity == 0 || capacity > u32::MAX as usize {
            return Err(Error::value(
                "capacity",
                format!("expected an int in [1, {}], got {capacity}", u32::MAX),
            ));
        }
        Ok(Cbrs {
            capacity,
            seen: 0,
            labels: Vec::new(),
            n_seen: Vec::new(),
            full: Vec::new(),
            slots: Vec::new(),
            index: HashMap::new(),
            slot_class: Vec::new(),
            slot_pos: Vec::new(),
            bucket: vec![Vec::new()],
            bucket_pos: Vec::new(),
            max: 0,
            scratch: Vec::new(),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn len(&self) -> usize {
        self.slot_class.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slot_class.is_empty()
    }
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// `(label, stored count, stream count, full)` for every class seen, in order of first appearance.
    pub fn classes(&self) -> Vec<(i64, usize, u64, bool)> {
        (0..self.labels.len())
            .map(|k| {
                (
                    self.labels[k],
                    self.slots[k].len(),
                    self.n_seen[k],
                    self.full[k],
                )
            })
            .collect()
    }

    /// The label stored in each slot, `0..len`.
    pub fn slot_labels(&self) -> Vec<i64> {
        self.slot_class
            .iter()
            .map(|&k| self.labels[k as usize])
            .collect()
    }

    fn class_id(&mut self, label: i64) -> usize {
        if let Some(&k) = self.index.get(&label) {
            return k as usize;
        }
        let k = self.labels.len();
        self.labels.push(label);
        self.n_seen.push(0);
        self.full.push(false);
        self.slots.push(Vec::new());
        self.bucket_pos.push(0);
        self.index.insert(label, k as u32);
        k
    }

    fn bucket_remove(&mut self, k: usize, c: usize) {
        let p = self.bucket_pos[k] as usize;
        let b = &mut self.bucket[c];
        b.swap_remove(p);
        if p < b.len() {
            self.bucket_pos[b[p] as usize] = p as u32;
        }
    }

    fn bucket_push(&mut self, k: usize, c: usize) {
        if self.bucket.len() <= c {
            self.bucket.resize_with(c + 1, Vec::new);
        }
        self.bucket_pos[k] = self.bucket[c].len() as u32;
        self.bucket[c].push(k as u32);
    }

    fn memory_full(&self) -> bool {
        self.len() == self.capacity
    }

    /// Append `slot` to class `k` and move `k` one bucket up; a class that reaches the top
    /// while the memory is full becomes full.
    fn attach(&mut self, k: usize, slot: u32) {
        let c = self.slots[k].len();
        self.slot_pos[slot as usize] = c as u32;
        self.slot_class[slot as usize] = k as u32;
        self.slots[k].push(slot);
        if c > 0 {
            self.bucket_remove(k, c);
        }
        self.bucket_push(k, c + 1);
        if c + 1 > self.max {
            self.max = c + 1;
        }
        if self.memory_full() && c + 1 == self.max {
            self.full[k] = true;
        }
    }

    /// Take the slot at position `pos` out of class `k` and move `k` one bucket down.
    fn detach(&mut self, k: usize, pos: usize) -> u32 {
        let list = &mut self.slots[k];
        let c = list.len();
        let slot = list.swap_remove(pos);
        if pos < list.len() {
            self.slot_pos[list[pos] as usize] = pos as u32;
        }
        self.bucket_remove(k, c);
        if c > 1 {
            self.bucket_push(k, c - 1);
        }
        if c == self.max && self.bucket[c].is_empty() {
            self.max = c - 1;
        }
        slot
    }

    fn mark_largest_full(&mut self) {
        for &j in &self.bucket[self.max] {
            self.full[j as usize] = true;
        }
    }

    /// One stream item: the slot it is written to, or `None` when it is dropped.
    pub fn step(&mut self, rng: &mut Xoshiro256pp, label: i64) -> Option<i64> {
        let k = self.class_id(label);
        self.n_seen[k] += 1;
        self.seen += 1;
        if !self.memory_full() {
            let slot = self.len() as u32;
            self.slot_class.push(0);
            self.slot_pos.push(0);
            self.attach(k, slot);
            if self.memory_full() {
                self.mark_largest_full();
            }
            return Some(slot as i64);
        }
        if self.full[k] {
            // The class's own reservoir: r uniform in [0, n_y); keep when r < m_y, and then r is
            // also uniform over the stored items of y, so it picks the victim too.
            let r = rng.below(self.n_seen[k]) as usize;
            return self.slots[k].get(r).map(|&s| s as i64);
        }
        // Uniform over every stored instance of the largest classes, tied classes ordered by label.
        let m = self.max;
        let tied = self.bucket[m].len();
        let r = rng.below((tied * m) as u64) as usize;
        let (which, pos) = (r / m, r % m);
        let victim_class = if tied == 1 {
            self.bucket[m][0] as usize
        } else {
            self.scratch.clear();
            self.scratch.extend_from_slice(&self.bucket[m]);
            let labels = &self.labels;
            let (_, nth, _) = self
                .scratch
                .select_nth_unstable_by_key(which, |&j| labels[j as usize]);
            *nth as usize
        };
        // Fullness is judged on the state after the whole step: when the victim's class was the
        // only largest one and `y` does not take its place, the next bucket down becomes the
        // largest (all of it); otherwise only `y` can have joined the top (`attach` marks it).
        let slot = self.detach(victim_class, pos);
        self.attach(k, slot);
        if self.max < m {
            self.mark_largest_full();
        }
        Some(slot as i64)
    }

    /// Every item of a batch in order: `(slot, row)` pairs in row order, before removing slots
    /// that later rows overwrite (see `reservoir::last_writer_wins`).
    pub fn decide(&mut self, rng: &mut Xoshiro256pp, labels: &[i64]) -> Vec<(i64, i64)> {
        let mut out = Vec::with_capacity(labels.len().min(64));
        for (row, &y) in labels.iter().enumerate() {
            if let Some(slot) = self.step(rng, y) {
                out.push((slot, row as i64));
            }
        }
        out
    }

    pub fn state(&self) -> CbrsState {
        let mut offsets = vec![0usize];
        let mut slots = Vec::with_capacity(self.len());
        for list in &self.slots {
            slots.extend_from_slice(list);
            offsets.push(slots.len());
        }
        CbrsState {
            capacity: self.capacity,
            seen: self.seen,
            labels: self.labels.clone(),
            n_seen: self.n_seen.clone(),
            full: self.full.clone(),
            offsets,
            slots,
        }
    }

    /// Rebuild from `state`, checking that it is consistent (every stored slot in exactly one
    /// class, counts within what was seen, labels unique).
    pub fn from_state(st: &CbrsState) -> Result<Self> {
        let mut c = Cbrs::new(st.capacity)?;
        let nc = st.labels.len();
        let bad = |msg: String| Error::value("state_dict", msg);
        if st.n_seen.len() != nc || st.full.len() != nc || st.offsets.len() != nc + 1 {
            return Err(bad(format!(
                "expected {nc} entries per class and {} offsets",
                nc + 1
            )));
        }
        let len = st.slots.len();
        if len > st.capacity
            || st.offsets[0] != 0
            || st.offsets[nc] != len
            || st.offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(bad(format!(
                "expected class offsets from 0 to the {len} stored slots (capacity {})",
                st.capacity
            )));
        }
        let total: u64 = st.n_seen.iter().sum();
        if total != st.seen {
            return Err(bad(format!(
                "expected per-class stream counts summing to seen={}, got {total}",
                st.seen
            )));
        }
        c.seen = st.seen;
        c.slot_class = vec![u32::MAX; len];
        c.slot_pos = vec![0; len];
        for k in 0..nc {
            if c.index.insert(st.labels[k], k as u32).is_some() {
                return Err(bad(format!(
                    "expected unique labels, got {} twice",
                    st.labels[k]
                )));
            }
            let list = &st.slots[st.offsets[k]..st.offsets[k + 1]];
            if (list.len() as u64) > st.n_seen[k] {
                return Err(bad(format!(
                    "class {} stores {} items but saw {}",
                    st.labels[k],
                    list.len(),
                    st.n_seen[k]
                )));
            }
            for (p, &s) in list.iter().enumerate() {
                if s as usize >= len || c.slot_class[s as usize] != u32::MAX {
                    return Err(bad(format!(
                        "expected each slot in [0, {len}) once, got slot {s} again or out of range"
                    )));
                }
                c.slot_class[s as usize] = k as u32;
                c.slot_pos[s as usize] = p as u32;
            }
            c.labels.push(st.labels[k]);
            c.n_seen.push(st.n_seen[k]);
            c.full.push(st.full[k]);
            c.slots.push(list.to_vec());
            c.bucket_pos.push(0);
            if !list.is_empty() {
                c.bucket_push(k, list.len());
                c.max = c.max.max(list.len());
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(capacity: usize, seed: u64, labels: &[i64]) -> (Cbrs, Vec<Option<i64>>) {
        let mut c = Cbrs::new(capacity).unwrap();
        let mut rng = Xoshiro256pp::seed_from_u64(seed);
        let out = labels.iter().map(|&y| c.step(&mut rng, y)).collect();
        (c, out)
    }

    fn check_invariants(c: &Cbrs) {
        let counts: Vec<usize> = c.slots.iter().map(|s| s.len()).collect();
        assert_eq!(counts.iter().sum::<usize>(), c.len());
        assert_eq!(c.max, counts.iter().copied().max().unwrap_or(0));
        for (k, list) in c.slots.iter().enumerate() {
            for (p, &s) in list.iter().enumerate() {
                assert_eq!(c.slot_class[s as usize] as usize, k);
                assert_eq!(c.slot_pos[s as usize] as usize, p);
            }
            if !list.is_empty() {
                assert_eq!(c.bucket[list.len()][c.bucket_pos[k] as usize] as usize, k);
            }
            // The class-balancing guarantee: a class that is not full has lost nothing.
            if !c.full[k] {
                assert_eq!(list.len() as u64, c.n_seen[k]);
            }
        }
        if c.memory_full() {
            for &j in &c.bucket[c.max] {
                assert!(c.full[j as usize], "a largest class must be full");
            }
        }
    }

    #[test]
    fn fills_then_balances() {
        // Memory 4: A A A A fills (A is the largest, so full); B then replaces A's items.
        let (c, out) = run(4, 0, &[0, 0, 0, 0, 1, 1]);
        assert_eq!(&out[..4], &[Some(0), Some(1), Some(2), Some(3)]);
        assert!(out[4].is_some() && out[5].is_some());
        assert_eq!(
            c.classes().iter().map(|x| x.1).collect::<Vec<_>>(),
            vec![2, 2]
        );
        // Both classes are now largest, so both are full.
        assert!(c.classes().iter().all(|x| x.3));
        check_invariants(&c);
    }

    #[test]
    fn minority_class_is_kept_whole() {
        let mut labels = vec![0i64; 1000];
        for i in (0..1000).step_by(50) {
            labels[i] = 7;
        }
        let (c, _) = run(100, 5, &labels);
        let minority = c.classes().into_iter().find(|x| x.0 == 7).unwrap();
        assert_eq!(minority.1, 20);
        check_invariants(&c);
    }

    #[test]
    fn state_round_trip() {
        let labels: Vec<i64> = (0..300).map(|i| (i * i % 7) as i64 - 3).collect();
        let (c, _) = run(25, 9, &labels[..150]);
        let d = Cbrs::from_state(&c.state()).unwrap();
        assert_eq!(d.state(), c.state());
        let mut r1 = Xoshiro256pp::seed_from_u64(1);
        let mut r2 = r1.clone();
        let (mut c, mut d) = (c, d);
        assert_eq!(
            c.decide(&mut r1, &labels[150..]),
            d.decide(&mut r2, &labels[150..])
        );
        check_invariants(&d);
        let mut broken = c.state();
        broken.slots[0] = broken.slots[1];
        assert!(Cbrs::from_state(&broken).is_err());
        assert!(Cbrs::new(0).is_err());
    }

    proptest! {
        #[test]
        fn invariants_hold(seed in any::<u64>(), capacity in 1usize..30,
                           labels in proptest::collection::vec(-3i64..6, 0..300)) {
            let mut c = Cbrs::new(capacity).unwrap();
            let mut rng = Xoshiro256pp::seed_from_u64(seed);
            let mut ever_full: Vec<bool> = Vec::new();
            for chunk in labels.chunks(17) {
                let pairs = c.decide(&mut rng, chunk);
                prop_assert!(pairs.iter().all(|&(s, _)| (s as usize) < c.len()));
                check_invariants(&c);
                // Full stays full.
                for (k, &was) in ever_full.iter().enumerate() {
                    prop_assert!(!was || c.full[k]);
                }
                ever_full = c.full.clone();
            }
            prop_assert_eq!(c.seen(), labels.len() as u64);
            prop_assert_eq!(c.len(), capacity.min(labels.len()));
        }
    }
}
