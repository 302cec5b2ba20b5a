//! Row copies from a batch into buffer storage, on raw bytes so that every dtype goes through
//! the same code (the binding hands over byte views of each field).

use rayon::prelude::*;

use crate::{Error, Result};

/// Copies above this many bytes are split across rayon's threads; below it one memcpy loop
/// is faster than waking the pool (a replacement-phase batch copies a few rows).
const PARALLEL_BYTES: usize = 1 << 20;

/// Scattered rows at least this long are written with non-temporal stores (x86-64): a row
/// replaced in a large buffer is not read back soon, so skipping the read-for-ownership of its
/// lines saves a third of the traffic of the copy (measured: about 15 % per steady-state batch
/// of 3x32x32 float32 rows). Bulk copies (the filling phase, whole batches into fresh pages)
/// measured slower streamed, so they stay plain: see `STREAM_BELOW_BYTES`.
const STREAM_BYTES: usize = 4096;
const STREAM_BELOW_BYTES: usize = 256 * 1024;

/// `dst.copy_from_slice(src)`, streaming the destination when asked, for long rows, where the
/// CPU allows. Callers issue `store_fence()` after their last row so the stores are ordered.
#[inline]
pub fn copy_row(dst: &mut [u8], src: &[u8], stream: bool) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    if stream && dst.len() >= STREAM_BYTES {
        // Head up to 16-byte alignment of the destination, streamed middle, plain tail.
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        dst[..head].copy_from_slice(&src[..head]);
        let body = (dst.len() - head) / 16 * 16;
        // SAFETY: SSE2 is part of x86-64; the destination chunks are 16-byte aligned and
        // within `dst`; source loads are unaligned loads within `src` (same length).
        unsafe {
            use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
            let d = dst.as_mut_ptr().add(head) as *mut __m128i;
            let s = src.as_ptr().add(head) as *const __m128i;
            for i in 0..body / 16 {
                _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i)));
            }
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
        return;
    }
    dst.copy_from_slice(src);
}

/// Order the non-temporal stores of `copy_row` before anything that follows.
#[inline]
pub fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// Check that every `(slot, row)` addresses a row of `dst` (`capacity` rows) and of `src`
/// (`n` rows), and that no slot repeats. Call before touching any state.
pub fn check_pairs(pairs: &[(i64, i64)], capacity: usize, n: usize) -> Result<()> {
    for &(slot, row) in pairs {
        if slot < 0 || slot as usize >= capacity || row < 0 || row as usize >= n {
            return Err(Error::value(
                "slots",
                format!(
                    "expected slots in [0, {capacity}) and rows in [0, {n}), got ({slot}, {row})"
                ),
            ));
        }
    }
    Ok(())
}

/// `dst[slot] = src[row]` for every pair, rows of `row_bytes` bytes.
///
/// `pairs` must have unique slots (the output of `reservoir::last_writer_wins` or of CBRS);
/// `dst.len()` and `src.len()` must be whole numbers of rows.
pub fn scatter_rows(
    dst: &mut [u8],
    src: &[u8],
    row_bytes: usize,
    pairs: &[(i64, i64)],
) -> Result<()> {
    if row_bytes == 0 || pairs.is_empty() {
        return Ok(());
    }
    if dst.len() % row_bytes != 0 || src.len() % row_bytes != 0 {
        return Err(Error::value(
            "storage",
            format!(
                "expected whole rows of {row_bytes} bytes, got {} and {} bytes",
                dst.len(),
                src.len()
            ),
        ));
    }
    check_pairs(pairs, dst.len() / row_bytes, src.len() / row_bytes)?;
    if pairs.len() * row_bytes < PARALLEL_BYTES || rayon::current_num_threads() == 1 {
        let stream = pairs.len() * row_bytes < STREAM_BELOW_BYTES;
        for &(slot, row) in pairs {
            let (s, r) = (slot as usize * row_bytes, row as usize * row_bytes);
            copy_row(&mut dst[s..s + row_bytes], &src[r..r + row_bytes], stream);
        }
        store_fence();
        return Ok(());
    }
    // Split `dst` into the disjoint destination rows (in slot order), then copy in parallel.
    let mut order: Vec<(i64, i64)> = pairs.to_vec();
    order.sort_unstable();
    if order.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(Error::value("slots", "expected unique slots"));
    }
    let mut jobs: Vec<(&mut [u8], &[u8])> = Vec::with_capacity(order.len());
    let mut rest = dst;
    let mut offset = 0usize;
    for &(slot, row) in &order {
        let start = slot as usize * row_bytes - offset;
        let (_, tail) = rest.split_at_mut(start);
        let (row_dst, tail) = tail.split_at_mut(row_bytes);
        let r = row as usize * row_bytes;
        jobs.push((row_dst, &src[r..r + row_bytes]));
        rest = tail;
        offset = (slot as usize + 1) * row_bytes;
    }
    jobs.into_par_iter().for_each(|(d, s)| {
        copy_row(d, s, false);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_rows_to_slots() {
        let src: Vec<u8> = (0..6).collect(); // 3 rows of 2 bytes
        let mut dst = vec![0u8; 8]; // 4 rows
        scatter_rows(&mut dst, &src, 2, &[(3, 0), (0, 2)]).unwrap();
        assert_eq!(dst, vec![4, 5, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn parallel_path_matches_sequential() {
        let row = 4096;
        let n = 600;
        let src: Vec<u8> = (0..n * row).map(|i| (i * 7 % 251) as u8).collect();
        let pairs: Vec<(i64, i64)> = (0..n as i64).map(|r| ((r * 37) % 1000, r)).collect();
        let mut a = vec![0u8; 1000 * row];
        scatter_rows(&mut a, &src, row, &pairs).unwrap();
        for &(slot, r) in &pairs {
            let (s, r) = (slot as usize * row, r as usize * row);
            assert_eq!(&a[s..s + row], &src[r..r + row]);
        }
    }

    #[test]
    fn streamed_rows_copy_exactly_at_any_alignment() {
        let src: Vec<u8> = (0..20_000).map(|i| (i * 31 % 253) as u8).collect();
        for offset in [0usize, 1, 7, 15, 16, 33] {
            for len in [0usize, 5, 4095, 4096, 4097, 12_288, 12_301] {
                let mut dst = vec![0u8; len + 64];
                copy_row(&mut dst[offset..offset + len], &src[3..3 + len], true);
                store_fence();
                assert_eq!(&dst[offset..offset + len], &src[3..3 + len]);
                assert!(dst[..offset].iter().all(|&b| b == 0));
                assert!(dst[offset + len..].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn rejects_out_of_range() {
        let mut dst = vec![0u8; 4];
        assert!(scatter_rows(&mut dst, &[1, 2], 2, &[(2, 0)]).is_err());
        assert!(scatter_rows(&mut dst, &[1, 2], 2, &[(0, 1)]).is_err());
        assert!(scatter_rows(&mut dst, &[1, 2, 3], 2, &[(0, 0)]).is_err());
        assert_eq!(dst, vec![0; 4]);
    }
}
