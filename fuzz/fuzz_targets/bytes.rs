//! Turns the fuzzer's bytes into sizes and values (every f32 bit pattern, NaN and inf included).
//! Shared by the targets through `#[path]`; each uses part of it.
#![allow(dead_code)]

pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |acc, _| (acc << 8) | u64::from(self.byte()))
    }

    /// A size in `0..=max`, now and then a huge one (sizes the contract must refuse).
    pub fn size(&mut self, max: usize) -> usize {
        match self.byte() {
            255 => self.u64() as usize,
            b => usize::from(b) % (max + 1),
        }
    }

    pub fn f32(&mut self) -> f32 {
        f32::from_bits((0..4).fold(0u32, |acc, _| (acc << 8) | u32::from(self.byte())))
    }

    /// A "nice" float most of the time (small, finite), any bit pattern otherwise.
    pub fn value(&mut self) -> f32 {
        match self.byte() % 8 {
            0 => self.f32(),
            b => f32::from(b) * 0.25 - 1.0,
        }
    }

    pub fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }

    pub fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }
}

/// Bitwise equality (NaN equal to itself): "unchanged" means unchanged bits.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
