//! Row copies from a batch into buffer storage, on raw bytes so that every dtype goes through
//! the same code (the binding hands over byte views of each field).

use rayon::prelude::*;

use crate::{Error, Result};

/// Copies above this many bytes are split across rayon's threads; below it one memcpy loop
/// is faster than waking the pool (a replacement-phase batch copies a few rows).
const PARALLEL_BYTES: usize = 1 << 20;

/// Check that every `(slot, row)` addresses a row of `dst` (`capacity` rows) and of `src`
/// (`n` rows), and that no slot repeats. Call before touching any state.
pub fn check_pairs(pairs: &[(i64, i64)], capacity: usize, n: usize) -> Result<()> {
    for &(slot, row) in pairs {
        if slot < 0 || slot as usize >= capacity || row < 0 || row as usize >= n {
            return Err(Error::value("slots", format!(
                "expected slots in [0, {capacity}) and rows in [0, {n}), got ({slot}, {row})")));
        }
    }
    Ok(())
}

/// `dst[slot] = src[row]` for every pair, rows of `row_bytes` bytes.
///
/// `pairs` must have unique slots (the output of `reservoir::last_writer_wins` or of CBRS);
/// `dst.len()` and `src.len()` must be whole numbers of rows.
pub fn scatter_rows(dst: &mut [u8], src: &[u8], row_bytes: usize, pairs: &[(i64, i64)]) -> Result<()> {
    if row_bytes == 0 || pairs.is_empty() {
        return Ok(());
    }
    if dst.len() % row_bytes != 0 || src.len() % row_bytes != 0 {
        return Err(Error::value("storage", format!(
            "expected whole rows of {row_bytes} bytes, got {} and {} bytes", dst.len(), src.len())));
    }
    check_pairs(pairs, dst.len() / row_bytes, src.len() / row_bytes)?;
    if pairs.len() * row_bytes < PARALLEL_BYTES || rayon::current_num_threads() == 1 {
        for &(slot, row) in pairs {
            let (s, r) = (slot as usize * row_bytes, row as usize * row_bytes);
            dst[s..s + row_bytes].copy_from_slice(&src[r..r + row_bytes]);
        }
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
    jobs.into_par_iter().for_each(|(d, s)| d.copy_from_slice(s));
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
    fn rejects_out_of_range() {
        let mut dst = vec![0u8; 4];
        assert!(scatter_rows(&mut dst, &[1, 2], 2, &[(2, 0)]).is_err());
        assert!(scatter_rows(&mut dst, &[1, 2], 2, &[(0, 1)]).is_err());
        assert!(scatter_rows(&mut dst, &[1, 2, 3], 2, &[(0, 0)]).is_err());
        assert_eq!(dst, vec![0; 4]);
    }
}
