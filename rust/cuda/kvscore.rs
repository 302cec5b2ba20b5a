//! Launchers of `cuda/kvscore.cu`: score accumulation and keep/evict selection.
//!
//! Arguments go through the same contract as the CPU kernels (`kvscore::contract`), then the
//! launch limits of a GPU (32-bit counts, shared memory) are checked here; pointers and dtypes
//! are the caller's (`forgetcore._cuda`), which takes them from torch tensors on one device.

use super::{arg, launch, Result};
use crate::error::ensure;
use crate::kvscore::{contract, rows_needed, AttnDims, Dims};

/// Threads per block of each kernel; must equal the .cu file's defines.
const ROWSUM_THREADS: u32 = 256;
const ACC_THREADS: u32 = 256;
const SEL_THREADS: u32 = 1024;
const FUSED_THREADS: u32 = 128;
/// The .cu file's `FUSED_MAX_D`: the query row staged in shared memory.
const FUSED_MAX_D: usize = 256;

pub use crate::kvscore::Dtype;

/// The kernel argument `AttnView`: data pointer, dtype and strides of (batch, q_head, q, slot).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AttnView {
    pub ptr: u64,
    pub dtype: i32,
    pub strides: [i64; 4],
}

/// Shapes of one accumulation: scores (batch, kv_heads, slots), attention (batch,
/// kv_heads * group, q, slots).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub batch: i64,
    pub kv_heads: i64,
    pub group: i64,
    pub q: i64,
    pub slots: i64,
}

/// A dimension as the contract takes it (`usize`): never negative.
fn count(name: &str, v: i64) -> Result<usize> {
    ensure(v >= 0, name, || format!("expected an int >= 0, got {v}"))?;
    Ok(v as usize)
}

fn small(name: &str, v: i64) -> Result<i32> {
    ensure((0..=i32::MAX as i64).contains(&v), name, || {
        format!("expected an int in [0, 2^31), got {v}")
    })?;
    Ok(v as i32)
}

fn grid(name: &str, blocks: i64) -> Result<u32> {
    ensure(blocks <= i32::MAX as i64, name, || {
        format!("too large for one launch ({blocks} blocks)")
    })?;
    Ok(blocks as u32)
}

/// `S <- alpha^q S + sum_i alpha^(q-1-i) A_i` with the group's query heads summed; with
/// `rsum` (a float32 buffer of batch * q_heads * q elements), each query head's row is first
/// renormalised over the valid slots (A2SF), without it added as is (H2O).
///
/// # Safety
/// `scores` (f32), `valid` (u8, or 0 for all valid) hold batch * kv_heads * slots elements,
/// `attn` addresses every element of its shape through its strides, `rsum` (or 0) holds
/// batch * kv_heads * group * q float32; all on `device`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn accumulate(
    device: i32,
    stream: u64,
    scores: u64,
    attn: AttnView,
    valid: u64,
    rsum: u64,
    shape: Shape,
    alpha: f32,
) -> Result<()> {
    let dims = Dims {
        batch: count("batch", shape.batch)?,
        heads: count("kv_heads", shape.kv_heads)?,
        slots: count("slots", shape.slots)?,
    };
    contract::accumulate(
        dims,
        count("group", shape.group)?,
        count("q", shape.q)?,
        alpha,
    )?;
    let kv_heads = small("kv_heads", shape.kv_heads)?;
    let group = small("group", shape.group)?;
    let q = small("q", shape.q)?;
    let t = small("slots", shape.slots)?;
    small("q_heads", shape.kv_heads * shape.group)?;
    let rows = shape.batch * shape.kv_heads;
    if rows == 0 || t == 0 || q == 0 {
        return Ok(());
    }
    let (mut attn, mut valid, mut rsum) = (attn, valid, rsum);
    let (mut kv_heads, mut group, mut q, mut t) = (kv_heads, group, q, t);
    if rsum != 0 {
        let blocks = grid("attn", rows * shape.group * shape.q)?;
        let mut params = [
            arg(&mut attn),
            arg(&mut valid),
            arg(&mut kv_heads),
            arg(&mut group),
            arg(&mut q),
            arg(&mut t),
            arg(&mut rsum),
        ];
        launch(
            device,
            stream,
            "kv_rowsum",
            (blocks, 1, 1),
            ROWSUM_THREADS,
            0,
            &mut params,
        )?;
    }
    let tiles = (shape.slots + ACC_THREADS as i64 - 1) / ACC_THREADS as i64;
    let blocks = grid("scores", rows * tiles)?;
    let (mut scores, mut alpha) = (scores, alpha);
    let mut params = [
        arg(&mut scores),
        arg(&mut attn),
        arg(&mut valid),
        arg(&mut rsum),
        arg(&mut kv_heads),
        arg(&mut group),
        arg(&mut q),
        arg(&mut t),
        arg(&mut alpha),
    ];
    launch(
        device,
        stream,
        "kv_accumulate",
        (blocks, 1, 1),
        ACC_THREADS,
        0,
        &mut params,
    )
}

/// Fused scoring (`crate::kvscore::attention_scores` on the GPU): `kv_row_stats` then
/// `kv_colsum` over the newest `rows_needed(alpha, tol, q_len)` query rows; see the .cu file.
///
/// # Safety
/// `scores` (f32, B*Hkv*S), `query` (f32, B*Hq*Lq*D), `keys` (f32, B*Hkv*S*D), `key_pos` (i64)
/// and `key_valid` (u8) (B*Hkv*S), `query_pos` (i64) and `query_valid` (u8) (B*Lq), `stats`
/// (f32, 2*B*Hq*rows_needed) are contiguous, on `device`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_scores(
    device: i32,
    stream: u64,
    ptrs: [u64; 8],
    d: AttnDims,
    scaling: f32,
    alpha: f32,
    tol: f32,
) -> Result<()> {
    contract::attention_scores(d, scaling, alpha, tol)?;
    ensure(d.head_dim <= FUSED_MAX_D, "query", || {
        format!(
            "expected head_dim <= {FUSED_MAX_D} on the GPU, got {}",
            d.head_dim
        )
    })?;
    let mut qh = small("query", d.q_heads as i64)?;
    let mut kvh = small("keys", d.kv_heads as i64)?;
    let mut lq = small("query", d.q_len as i64)?;
    let mut s = small("keys", d.slots as i64)?;
    let mut dh = small("query", d.head_dim as i64)?;
    if d.batch == 0 || d.slots == 0 || d.q_len == 0 {
        return Ok(());
    }
    let w = rows_needed(alpha, tol, d.q_len);
    let (mut first, mut w32) = ((d.q_len - w) as i32, w as i32);
    let decay = if alpha == 0.0 {
        0.0
    } else {
        alpha.powi(d.q_len as i32)
    };
    let [mut sc, mut q, mut k, mut kp, mut kv, mut qp, mut qv, mut st] = ptrs;
    let (mut scaling, mut alpha, mut decay) = (scaling, alpha, decay);
    let blocks = grid("query", (d.batch * d.q_heads * w) as i64)?;
    let mut params = [
        arg(&mut q),
        arg(&mut k),
        arg(&mut kp),
        arg(&mut kv),
        arg(&mut qp),
        arg(&mut qv),
        arg(&mut qh),
        arg(&mut kvh),
        arg(&mut lq),
        arg(&mut s),
        arg(&mut dh),
        arg(&mut first),
        arg(&mut w32),
        arg(&mut scaling),
        arg(&mut st),
    ];
    launch(
        device,
        stream,
        "kv_row_stats",
        (blocks, 1, 1),
        FUSED_THREADS,
        0,
        &mut params,
    )?;
    let tiles = d.slots.div_ceil(FUSED_THREADS as usize);
    let blocks = grid("scores", (d.batch * d.kv_heads * tiles) as i64)?;
    let mut params = [
        arg(&mut sc),
        arg(&mut q),
        arg(&mut k),
        arg(&mut kp),
        arg(&mut kv),
        arg(&mut qp),
        arg(&mut qv),
        arg(&mut st),
        arg(&mut qh),
        arg(&mut kvh),
        arg(&mut lq),
        arg(&mut s),
        arg(&mut dh),
        arg(&mut first),
        arg(&mut w32),
        arg(&mut scaling),
        arg(&mut alpha),
        arg(&mut decay),
    ];
    launch(
        device,
        stream,
        "kv_colsum",
        (blocks, 1, 1),
        FUSED_THREADS,
        0,
        &mut params,
    )
}

/// Dynamic shared memory of the selection kernels: the kept bitmask, one bit per slot.
fn bitmask_bytes(slots: i64) -> Result<u32> {
    let bytes = (slots + 31) / 32 * 4;
    // 227 KiB is the most any current GPU gives one block; the driver checks the real limit.
    ensure(bytes <= 227 * 1024, "scores", || {
        format!(
            "expected at most {} slots per row on the GPU, got {slots}",
            227 * 1024 * 8
        )
    })?;
    Ok(bytes as u32)
}

/// The `budget` slots to keep per row, ascending, into `out` (rows * budget int64).
///
/// # Safety
/// `scores` (f32), `positions` (i64, or 0 for "slot index"), `valid` (u8, or 0 for all valid)
/// hold rows * slots elements and `out` rows * budget int64, on `device`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn select_keep(
    device: i32,
    stream: u64,
    scores: u64,
    positions: u64,
    valid: u64,
    rows: i64,
    slots: i64,
    budget: i64,
    n_sink: i64,
    n_recent: i64,
    out: u64,
) -> Result<()> {
    let dims = Dims {
        batch: count("scores", rows)?,
        heads: 1,
        slots: count("slots", slots)?,
    };
    contract::select_keep(
        dims,
        count("budget", budget)?,
        count("n_sink", n_sink)?,
        count("n_recent", n_recent)?,
    )?;
    let t = small("slots", slots)?;
    let b = small("budget", budget)?;
    let ns = small("n_sink", n_sink)?;
    let nr = small("n_recent", n_recent)?;
    if rows == 0 || budget == 0 {
        return Ok(());
    }
    let smem = bitmask_bytes(slots)?;
    let blocks = grid("scores", rows)?;
    let (mut scores, mut positions, mut valid, mut out) = (scores, positions, valid, out);
    let (mut t, mut b, mut ns, mut nr) = (t, b, ns, nr);
    let mut params = [
        arg(&mut scores),
        arg(&mut positions),
        arg(&mut valid),
        arg(&mut t),
        arg(&mut b),
        arg(&mut ns),
        arg(&mut nr),
        arg(&mut out),
    ];
    launch(
        device,
        stream,
        "kv_select_keep",
        (blocks, 1, 1),
        SEL_THREADS,
        smem,
        &mut params,
    )
}

/// Per row the slot to evict (lowest score among unprotected valid slots), or -1, into `out`.
///
/// # Safety
/// As [`select_keep`], with `out` holding rows int64.
#[allow(clippy::too_many_arguments)]
pub unsafe fn evict_one(
    device: i32,
    stream: u64,
    scores: u64,
    positions: u64,
    valid: u64,
    rows: i64,
    slots: i64,
    n_sink: i64,
    n_recent: i64,
    out: u64,
) -> Result<()> {
    contract::evict_one(Dims {
        batch: count("scores", rows)?,
        heads: 1,
        slots: count("slots", slots)?,
    })?;
    let t = small("slots", slots)?;
    let ns = small("n_sink", n_sink)?;
    let nr = small("n_recent", n_recent)?;
    if rows == 0 {
        return Ok(());
    }
    let smem = bitmask_bytes(slots)?;
    let blocks = grid("scores", rows)?;
    let (mut scores, mut positions, mut valid, mut out) = (scores, positions, valid, out);
    let (mut t, mut ns, mut nr) = (t, ns, nr);
    let mut params = [
        arg(&mut scores),
        arg(&mut positions),
        arg(&mut valid),
        arg(&mut t),
        arg(&mut ns),
        arg(&mut nr),
        arg(&mut out),
    ];
    launch(
        device,
        stream,
        "kv_evict_one",
        (blocks, 1, 1),
        SEL_THREADS,
        smem,
        &mut params,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attn_view_matches_the_kernel_struct() {
        // struct AttnView { const void* p; int dt; i64 sb, sh, sq, st; }: 8 + 4 (+4 pad) + 32.
        assert_eq!(std::mem::size_of::<AttnView>(), 48);
        assert_eq!(std::mem::align_of::<AttnView>(), 8);
    }

    #[test]
    fn shape_errors_come_before_any_cuda_call() {
        let s = Shape {
            batch: 1,
            kv_heads: 1,
            group: 0,
            q: 1,
            slots: 4,
        };
        let a = AttnView {
            ptr: 0,
            dtype: 0,
            strides: [0; 4],
        };
        let e = unsafe { accumulate(0, 0, 0, a, 0, 0, s, 0.5) }.unwrap_err();
        assert!(e.to_string().starts_with("group:"));
        let e = unsafe { accumulate(0, 0, 0, a, 0, 0, Shape { group: 1, ..s }, 1.5) }.unwrap_err();
        assert!(e.to_string().starts_with("alpha:"));
        let e = unsafe { select_keep(0, 0, 0, 0, 0, 1, 4, 5, 0, 0, 0) }.unwrap_err();
        assert!(e.to_string().starts_with("budget:"));
        let e = unsafe { select_keep(0, 0, 0, 0, 0, 1, 4, 2, 2, 1, 0) }.unwrap_err();
        assert!(e.to_string().starts_with("budget:"));
        assert!("float64".parse::<Dtype>().is_err());
        let d = AttnDims {
            batch: 1,
            q_heads: 2,
            kv_heads: 1,
            q_len: 3,
            slots: 4,
            head_dim: 300,
        };
        let e = unsafe { attention_scores(0, 0, [0; 8], d, 1.0, 0.5, 0.0) }.unwrap_err();
        assert!(e.to_string().starts_with("query:"));
        let e =
            unsafe { attention_scores(0, 0, [0; 8], AttnDims { head_dim: 8, ..d }, 1.0, 2.0, 0.0) }
                .unwrap_err();
        assert!(e.to_string().starts_with("alpha:"));
        // Nothing to do: no launch, no driver needed.
        assert!(unsafe { select_keep(0, 0, 0, 0, 0, 0, 4, 2, 1, 1, 0) }.is_ok());
    }
}
