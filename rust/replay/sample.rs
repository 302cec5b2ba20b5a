//! Drawing `n` distinct indices out of `size`: a partial Fisher-Yates shuffle (Durstenfeld 1964).
//!
//! Step `i` draws `j` uniform in `[i, size)` and swaps positions `i` and `j` of the virtual
//! array `0..size`; the first `n` positions are the sample, in random order. When `n` is much
//! smaller than `size` the virtual array lives in a hash map of the displaced positions, so a
//! draw costs O(n) rather than O(size). Both layouts give the same indices for the same draws.

use std::collections::HashMap;

use super::rng::Xoshiro256pp;
use crate::{Error, Result};

pub fn without_replacement(rng: &mut Xoshiro256pp, size: u64, n: u64) -> Result<Vec<i64>> {
    if n > size {
        return Err(Error::value(
            "n",
            format!("expected at most {size} (the number of items to draw from), got {n}"),
        ));
    }
    let mut out = Vec::with_capacity(n as usize);
    if n.saturating_mul(8) >= size {
        let mut a: Vec<i64> = (0..size as i64).collect();
        for i in 0..n as usize {
            let j = i + rng.below(size - i as u64) as usize;
            a.swap(i, j);
            out.push(a[i]);
        }
    } else {
        let mut moved: HashMap<u64, u64> = HashMap::with_capacity(2 * n as usize);
        for i in 0..n {
            let j = i + rng.below(size - i);
            let at_j = *moved.get(&j).unwrap_or(&j);
            let at_i = *moved.get(&i).unwrap_or(&i);
            moved.insert(j, at_i);
            out.push(at_j as i64);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn edge_cases() {
        let mut r = Xoshiro256pp::seed_from_u64(0);
        assert!(without_replacement(&mut r, 5, 0).unwrap().is_empty());
        let mut all = without_replacement(&mut r, 5, 5).unwrap();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        assert!(without_replacement(&mut r, 3, 4).is_err());
        assert!(without_replacement(&mut r, 0, 0).unwrap().is_empty());
    }

    #[test]
    fn first_position_is_uniform() {
        let mut r = Xoshiro256pp::seed_from_u64(11);
        let mut counts = [0u32; 10];
        for _ in 0..50_000 {
            counts[without_replacement(&mut r, 10, 1).unwrap()[0] as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (c as i64 - 5000).abs() < 350),
            "{counts:?}"
        );
    }

    proptest! {
        #[test]
        fn sparse_and_dense_layouts_agree(seed in any::<u64>(), size in 1u64..500, frac in 0.0f64..1.0) {
            let n = ((size as f64) * frac) as u64;
            let mut a = Xoshiro256pp::seed_from_u64(seed);
            let got = without_replacement(&mut a, size, n).unwrap();
            // The dense layout, always.
            let mut b = Xoshiro256pp::seed_from_u64(seed);
            let mut v: Vec<i64> = (0..size as i64).collect();
            let mut want = Vec::new();
            for i in 0..n as usize {
                let j = i + b.below(size - i as u64) as usize;
                v.swap(i, j);
                want.push(v[i]);
            }
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(a, b);
            let mut s = got.clone();
            s.sort_unstable();
            s.dedup();
            prop_assert_eq!(s.len() as u64, n);
        }
    }
}
