//! The random source of the replay family: xoshiro256++ (Blackman and Vigna, "Scrambled linear
//! pseudorandom number generators", 2021), seeded through SplitMix64.
//!
//! Written out here rather than taken from `rand_xoshiro` because the buffers save and restore
//! the four state words (`state_dict`), which that crate does not expose; a unit test checks
//! that both produce the same stream. Bounded integers use Lemire's multiply-and-reject
//! ("Fast random integer generation in an interval", 2019), which is exact (no modulo bias)
//! and identical on every platform, so the same seed gives the same decisions everywhere
//! (every rank of a DDP job, every machine).

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xoshiro256pp {
    s: [u64; 4],
}

/// One step of SplitMix64 (Steele, Lea and Flood 2014): the seeding recommended by the authors.
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Xoshiro256pp {
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut x = seed;
        let s = [
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
        ];
        Xoshiro256pp { s }
    }

    /// Restore a saved state; the all-zero state is the generator's one fixed point.
    pub fn from_state(s: [u64; 4]) -> Result<Self> {
        if s == [0; 4] {
            return Err(Error::value(
                "rng",
                "expected a xoshiro256++ state that is not all zeros",
            ));
        }
        Ok(Xoshiro256pp { s })
    }

    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform integer in `[0, n)`; `n` must be positive (callers guarantee it).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            // Reject the low products that would make some values more likely than others.
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_xoshiro::rand_core::{RngCore, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    #[test]
    fn same_stream_as_rand_xoshiro() {
        for seed in [0u64, 1, 42, u64::MAX] {
            let mut ours = Xoshiro256pp::seed_from_u64(seed);
            let mut theirs = Xoshiro256PlusPlus::seed_from_u64(seed);
            for _ in 0..1000 {
                assert_eq!(ours.next_u64(), theirs.next_u64());
            }
        }
    }

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut a = Xoshiro256pp::seed_from_u64(7);
        a.below(10);
        let mut b = Xoshiro256pp::from_state(a.state()).unwrap();
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert!(Xoshiro256pp::from_state([0; 4]).is_err());
    }

    #[test]
    fn below_is_in_range_and_uniform() {
        let mut r = Xoshiro256pp::seed_from_u64(3);
        assert_eq!(r.below(1), 0);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[r.below(6) as usize] += 1;
        }
        // Each face expects 10,000; 5 standard deviations is about 456.
        assert!(
            counts.iter().all(|&c| (c as i64 - 10_000).abs() < 460),
            "{counts:?}"
        );
        for n in [2u64, 3, 1 << 63, u64::MAX] {
            for _ in 0..100 {
                assert!(r.below(n) < n);
            }
        }
    }
}
