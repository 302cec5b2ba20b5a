//! Launchers of `cuda/importance.cu`: one launch for a whole list of tensors.
//!
//! The caller (`forgetcore._cuda`) builds the multi-tensor table `meta` as a CUDA int64 tensor
//! (layout in the .cu file) and passes its device pointer with the total number of blocks, and
//! the element counts of every list on the host, which go through the same argument contract
//! as the CPU kernels (`importance::contract`) before anything is launched.

use super::{arg, launch, Result};
use crate::error::ensure;
use crate::importance::{contract, Mode};

/// Threads per block; must equal `THREADS` in the .cu file.
pub const THREADS: u32 = 256;

fn check_table(n: i64, chunk: i64, blocks: i64) -> Result<()> {
    ensure(n >= 0 && n <= i32::MAX as i64, "n", || {
        format!("expected a tensor count in [0, 2^31), got {n}")
    })?;
    ensure(chunk > 0 && chunk % 4 == 0, "chunk", || {
        format!("expected a positive multiple of 4, got {chunk}")
    })?;
    ensure((0..=i32::MAX as i64).contains(&blocks), "blocks", || {
        format!("expected a block count in [0, 2^31), got {blocks}")
    })?;
    Ok(())
}

/// `acc += (g * g) * scale` (`Mode::Sq`) or `|g| * scale` for every tensor of the table.
///
/// # Safety
/// `meta` must point to the table `[acc[n], grad[n], numel[n], dtype[n], block_start[n + 1]]`
/// on `device`, with `numel == acc` (the counts given here), `block_start[n] == blocks` and
/// every pointer valid for its `numel`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn accumulate(
    device: i32,
    stream: u64,
    meta: u64,
    acc: &[usize],
    grads: &[usize],
    chunk: i64,
    blocks: i64,
    scale: f32,
    mode: Mode,
) -> Result<()> {
    contract::accumulate(acc, grads, scale)?;
    let n = acc.len() as i64;
    check_table(n, chunk, blocks)?;
    let (mut meta, mut n, mut chunk, mut scale, mut mode) =
        (meta, n as i32, chunk, scale, (mode == Mode::Abs) as i32);
    let mut params = [
        arg(&mut meta),
        arg(&mut n),
        arg(&mut chunk),
        arg(&mut scale),
        arg(&mut mode),
    ];
    launch(
        device,
        stream,
        "accumulate",
        (blocks as u32, 1, 1),
        THREADS,
        0,
        &mut params,
    )
}

/// SSD dampening over every tensor of the table; adds the selected counts to `counts`.
///
/// # Safety
/// `meta` must point to `[theta[n], imp_full[n], imp_forget[n], numel[n], block_start[n + 1]]`
/// on `device`, with `numel == params` (the counts given here), `block_start[n] == blocks`;
/// `counts` to `n` zeroed int64 on `device`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn ssd_dampen(
    device: i32,
    stream: u64,
    meta: u64,
    params: &[usize],
    imp_full: &[usize],
    imp_forget: &[usize],
    chunk: i64,
    blocks: i64,
    alpha: f32,
    lam: f32,
    counts: u64,
) -> Result<()> {
    contract::ssd_dampen(params, imp_full, imp_forget, alpha, lam)?;
    let n = params.len() as i64;
    check_table(n, chunk, blocks)?;
    let (mut meta, mut n, mut chunk, mut alpha, mut lam, mut counts) =
        (meta, n as i32, chunk, alpha, lam, counts);
    let mut params = [
        arg(&mut meta),
        arg(&mut n),
        arg(&mut chunk),
        arg(&mut alpha),
        arg(&mut lam),
        arg(&mut counts),
    ];
    launch(
        device,
        stream,
        "ssd_dampen",
        (blocks as u32, 1, 1),
        THREADS,
        0,
        &mut params,
    )
}

/// Per tensor the lowest flat index of a NaN, infinite or negative value, into `first`.
///
/// # Safety
/// `meta` must point to `[imp[n], numel[n], block_start[n + 1]]` on `device`, with
/// `block_start[n] == blocks`; `first` to `n` int64 on `device` holding `i64::MAX`.
pub unsafe fn find_invalid(
    device: i32,
    stream: u64,
    meta: u64,
    n: i64,
    chunk: i64,
    blocks: i64,
    first: u64,
) -> Result<()> {
    check_table(n, chunk, blocks)?;
    let (mut meta, mut n, mut chunk, mut first) = (meta, n as i32, chunk, first);
    let mut params = [
        arg(&mut meta),
        arg(&mut n),
        arg(&mut chunk),
        arg(&mut first),
    ];
    launch(
        device,
        stream,
        "find_invalid",
        (blocks as u32, 1, 1),
        THREADS,
        0,
        &mut params,
    )
}
