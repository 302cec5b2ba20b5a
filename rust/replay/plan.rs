//! The checked copy plan of one buffer `add`: for each stored field, where its rows go
//! (storage bytes), where they come from (batch bytes) and how long a row is.
//!
//! The binding finds the bytes (numpy storage arrays, torch batch tensors) and hands raw
//! pointers here; everything that makes the later copy sound is checked once, in `CopyPlan::new`,
//! before any state changes: whole rows, one batch length, storage fields that do not overlap
//! each other, and batches that alias some storage (a field re-added from the buffer itself)
//! copied out first. After that the copy cannot fail for pairs that the reservoir or CBRS
//! decided, so a decision is never made without its copy.

use super::copy;
use crate::{Error, Result};

/// A raw byte range of caller-owned memory.
#[derive(Clone, Copy, Debug)]
pub struct Bytes {
    pub ptr: *mut u8,
    pub len: usize,
}

impl Bytes {
    fn overlaps(&self, other: &Bytes) -> bool {
        let (a0, b0) = (self.ptr as usize, other.ptr as usize);
        self.len > 0 && other.len > 0 && a0 < b0 + other.len && b0 < a0 + self.len
    }
}

struct Field {
    dst: Bytes,
    src: Bytes,
    row_bytes: usize,
    /// The batch bytes copied out when they overlap some storage.
    owned: Option<Vec<u8>>,
}

/// Per field, destination storage and source batch, checked against each other.
pub struct CopyPlan {
    fields: Vec<Field>,
    rows: usize,
}

// SAFETY: a plan only carries pointers into memory that the caller of `CopyPlan::new` keeps
// alive and unshared for the plan's life (its contract), and `new` checked that destinations are
// disjoint from each other and that no source overlaps a destination (overlapping sources were
// copied into `owned`). Moving it to another thread (the binding releases the GIL) is sound.
unsafe impl Send for CopyPlan {}

/// Copies of at least this many bytes are worth releasing the GIL for (the binding decides);
/// below it, releasing and re-acquiring costs more than the copy.
pub const DETACH_BYTES: usize = 256 * 1024;

impl CopyPlan {
    /// Check `n` batch rows per field against storage of `capacity` rows; `fields` pairs each
    /// storage range with the batch range that fills it.
    ///
    /// # Safety
    /// Every range must be valid memory (storage writable) for as long as the plan lives, and
    /// nothing else may read or write the storage or write the batches meanwhile.
    pub unsafe fn new(n: usize, capacity: usize, fields: &[(Bytes, Bytes)]) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::value("capacity", "expected an int >= 1, got 0"));
        }
        let mut out = Vec::with_capacity(fields.len());
        for (i, &(dst, src)) in fields.iter().enumerate() {
            if dst.len % capacity != 0 {
                return Err(Error::value(
                    "storage",
                    format!(
                        "field {i}: expected a whole number of rows for capacity {capacity}, got {} bytes",
                        dst.len
                    ),
                ));
            }
            let row_bytes = dst.len / capacity;
            if Some(src.len) != n.checked_mul(row_bytes) {
                return Err(Error::value(
                    "batch",
                    format!(
                        "field {i}: expected {n} rows of {row_bytes} bytes, got {} bytes",
                        src.len
                    ),
                ));
            }
            if out.iter().any(|f: &Field| f.dst.overlaps(&dst)) {
                return Err(Error::value(
                    "storage",
                    "expected storage arrays that do not overlap",
                ));
            }
            out.push(Field {
                dst,
                src,
                row_bytes,
                owned: None,
            });
        }
        for i in 0..out.len() {
            let src = out[i].src;
            if out.iter().any(|f| f.dst.overlaps(&src)) {
                // SAFETY: the caller vouches for `src` (this function's contract).
                out[i].owned =
                    Some(unsafe { std::slice::from_raw_parts(src.ptr, src.len) }.to_vec());
            }
        }
        Ok(CopyPlan {
            fields: out,
            rows: n,
        })
    }

    /// The batch length the plan was checked for.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The batch bytes of field `i`.
    pub fn source(&self, i: usize) -> Option<Bytes> {
        self.fields.get(i).map(|f| f.src)
    }

    /// Bytes that copying `pairs` moves (the binding releases the GIL above `DETACH_BYTES`).
    pub fn bytes(&self, pairs: usize) -> usize {
        self.fields.iter().map(|f| f.row_bytes * pairs).sum()
    }

    /// `storage[slot] = batch[row]` for every `(slot, row)` pair (unique slots), every field.
    pub fn run(&self, pairs: &[(i64, i64)]) -> Result<()> {
        for f in &self.fields {
            // SAFETY: the ranges are valid and unshared for the plan's life (contract of `new`),
            // destinations overlap nothing else, and a source that overlaps one was copied out.
            let d = unsafe { std::slice::from_raw_parts_mut(f.dst.ptr, f.dst.len) };
            let s: &[u8] = match &f.owned {
                Some(v) => v,
                None => unsafe { std::slice::from_raw_parts(f.src.ptr, f.src.len) },
            };
            copy::scatter_rows(d, s, f.row_bytes, pairs)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &mut [u8]) -> Bytes {
        Bytes {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    #[test]
    fn overlap_detection() {
        let mut buf = [0u8; 16];
        let p = buf.as_mut_ptr();
        let a = Bytes { ptr: p, len: 8 };
        let b = Bytes {
            ptr: unsafe { p.add(8) },
            len: 8,
        };
        let c = Bytes {
            ptr: unsafe { p.add(4) },
            len: 8,
        };
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&c) && c.overlaps(&b));
        assert!(!a.overlaps(&Bytes { ptr: p, len: 0 }));
    }

    #[test]
    fn copies_every_field() {
        let mut s0 = vec![0u8; 8]; // 4 rows of 2 bytes
        let mut s1 = vec![0u8; 4]; // 4 rows of 1 byte
        let mut b0 = vec![1u8, 2, 3, 4];
        let mut b1 = vec![9u8, 8];
        let plan = unsafe {
            CopyPlan::new(
                2,
                4,
                &[
                    (bytes(&mut s0), bytes(&mut b0)),
                    (bytes(&mut s1), bytes(&mut b1)),
                ],
            )
        }
        .unwrap();
        assert_eq!(plan.bytes(2), 6);
        plan.run(&[(3, 0), (1, 1)]).unwrap();
        drop(plan);
        assert_eq!(s0, vec![0, 0, 3, 4, 0, 0, 1, 2]);
        assert_eq!(s1, vec![0, 8, 0, 9]);
    }

    #[test]
    fn rejects_bad_shapes_and_overlapping_storage() {
        let mut s = vec![0u8; 8];
        let mut b = vec![1u8; 3];
        let e = unsafe { CopyPlan::new(2, 4, &[(bytes(&mut s), bytes(&mut b))]) };
        assert!(matches!(e, Err(Error::Value { ref arg, .. }) if arg == "batch"));
        let e = unsafe { CopyPlan::new(2, 3, &[(bytes(&mut s), bytes(&mut b))]) };
        assert!(matches!(e, Err(Error::Value { ref arg, .. }) if arg == "storage"));
        let (mut b2, mut b3, whole) = (vec![0u8; 4], vec![0u8; 2], bytes(&mut s));
        let half = Bytes {
            ptr: whole.ptr,
            len: 4,
        };
        let e = unsafe { CopyPlan::new(2, 4, &[(whole, bytes(&mut b2)), (half, bytes(&mut b3))]) };
        assert!(matches!(e, Err(Error::Value { ref arg, .. }) if arg == "storage"));
    }

    #[test]
    fn a_batch_read_from_its_own_storage_is_copied_first() {
        // Storage of 4 rows of 1 byte; the batch is rows 0..2 of that same storage.
        let mut s = vec![10u8, 11, 12, 13];
        let whole = bytes(&mut s);
        let src = Bytes {
            ptr: whole.ptr,
            len: 2,
        };
        let plan = unsafe { CopyPlan::new(2, 4, &[(whole, src)]) }.unwrap();
        // Row 0 goes to slot 1 and row 1 to slot 0: without the copy-out, slot 1 would be
        // written before row 1 is read.
        plan.run(&[(1, 0), (0, 1)]).unwrap();
        drop(plan);
        assert_eq!(s, vec![11, 10, 12, 13]);
    }
}
