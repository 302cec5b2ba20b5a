//! Bindings for `crate::kvscore`: numpy in (zero-copy), GIL released around the kernels.

use numpy::{
    IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::{as_slice, as_slice_mut, detached};
use crate::kvscore::{self, Attn, AttnDims, Dims};
use crate::Error;

fn dims3(shape: &[usize], arg: &str) -> PyResult<Dims> {
    match shape {
        [b, h, t] => Ok(Dims {
            batch: *b,
            heads: *h,
            slots: *t,
        }),
        _ => Err(Error::value(
            arg,
            format!("expected a 3-D array (batch, kv_heads, slots), got shape {shape:?}"),
        )
        .into()),
    }
}

fn same_shape(shape: &[usize], want: &Dims, arg: &str) -> PyResult<()> {
    if shape != [want.batch, want.heads, want.slots] {
        return Err(Error::value(
            arg,
            format!(
                "expected shape ({}, {}, {}) like scores, got {shape:?}",
                want.batch, want.heads, want.slots
            ),
        )
        .into());
    }
    Ok(())
}

/// scores (B, H, T) f32 <- alpha-weighted accumulation of attn (B, H*group, q, T).
/// `attn_dtype` says how to read `attn`: "float32" (a float32 array) or "float16"/"bfloat16"
/// (an int16 array holding the raw bits).
#[pyfunction]
#[pyo3(signature = (scores, attn, attn_dtype, valid, group, alpha, renorm))]
#[allow(clippy::too_many_arguments)]
fn kv_accumulate_(
    py: Python<'_>,
    mut scores: PyReadwriteArrayDyn<'_, f32>,
    attn: &Bound<'_, PyAny>,
    attn_dtype: &str,
    valid: Option<PyReadonlyArrayDyn<'_, bool>>,
    group: usize,
    alpha: f32,
    renorm: bool,
) -> PyResult<()> {
    let dims = dims3(scores.shape(), "scores")?;
    if let Some(v) = &valid {
        same_shape(v.shape(), &dims, "valid")?;
    }
    let (a32, a16);
    let (ashape, view): (Vec<usize>, Attn<'_>) = match attn_dtype {
        "float32" => {
            a32 = attn.extract::<PyReadonlyArrayDyn<'_, f32>>()?;
            (a32.shape().to_vec(), Attn::F32(as_slice(&a32, "attn")?))
        }
        "float16" | "bfloat16" => {
            a16 = attn.extract::<PyReadonlyArrayDyn<'_, i16>>()?;
            let s = as_slice(&a16, "attn")?;
            // i16 and u16 have the same layout; the kernel reads raw bits
            let bits: &[u16] =
                unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) };
            let v = if attn_dtype == "float16" {
                Attn::F16(bits)
            } else {
                Attn::Bf16(bits)
            };
            (a16.shape().to_vec(), v)
        }
        other => return Err(kvscore::unsupported_dtype("attn", other).into()),
    };
    let q = match ashape.as_slice() {
        [b, hq, q, t] if *b == dims.batch && *hq == dims.heads * group && *t == dims.slots => *q,
        _ => {
            let (b, hq, t) = (dims.batch, dims.heads * group, dims.slots);
            let want =
                format!("expected shape ({b}, {hq}, q, {t}) (batch, kv_heads*group, q, slots)");
            return Err(Error::value("attn", format!("{want}, got {ashape:?}")).into());
        }
    };
    let vs = match &valid {
        Some(v) => Some(as_slice(v, "valid")?),
        None => None,
    };
    let s = as_slice_mut(&mut scores, "scores")?;
    detached(py, || {
        kvscore::accumulate(s, view, vs, dims, group, q, alpha, renorm)
    })?;
    Ok(())
}

/// Slots to keep per (batch, kv-head), ascending: int64 (B, H, budget).
#[pyfunction]
fn kv_select_keep<'py>(
    py: Python<'py>,
    scores: PyReadonlyArrayDyn<'py, f32>,
    positions: PyReadonlyArrayDyn<'py, i64>,
    valid: PyReadonlyArrayDyn<'py, bool>,
    budget: usize,
    n_sink: usize,
    n_recent: usize,
) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
    let dims = dims3(scores.shape(), "scores")?;
    same_shape(positions.shape(), &dims, "positions")?;
    same_shape(valid.shape(), &dims, "valid")?;
    let (s, p, v) = (
        as_slice(&scores, "scores")?,
        as_slice(&positions, "positions")?,
        as_slice(&valid, "valid")?,
    );
    let mut out = vec![0i64; dims.batch * dims.heads * budget.min(dims.slots)];
    detached(py, || {
        kvscore::select_keep(s, p, v, dims, budget, n_sink, n_recent, &mut out)
    })?;
    let arr = numpy::ndarray::ArrayD::from_shape_vec(vec![dims.batch, dims.heads, budget], out)
        .map_err(|e| Error::value("budget", e.to_string()))?;
    Ok(arr.into_pyarray(py))
}

/// The slot to evict per (batch, kv-head), or -1: int64 (B, H).
#[pyfunction]
fn kv_evict_one<'py>(
    py: Python<'py>,
    scores: PyReadonlyArrayDyn<'py, f32>,
    positions: PyReadonlyArrayDyn<'py, i64>,
    valid: PyReadonlyArrayDyn<'py, bool>,
    n_sink: usize,
    n_recent: usize,
) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
    let dims = dims3(scores.shape(), "scores")?;
    same_shape(positions.shape(), &dims, "positions")?;
    same_shape(valid.shape(), &dims, "valid")?;
    let (s, p, v) = (
        as_slice(&scores, "scores")?,
        as_slice(&positions, "positions")?,
        as_slice(&valid, "valid")?,
    );
    let mut out = vec![0i64; dims.batch * dims.heads];
    detached(py, || {
        kvscore::evict_one(s, p, v, dims, n_sink, n_recent, &mut out)
    })?;
    let arr = numpy::ndarray::ArrayD::from_shape_vec(vec![dims.batch, dims.heads], out)
        .map_err(|e| Error::value("scores", e.to_string()))?;
    Ok(arr.into_pyarray(py))
}

/// scores (B, Hkv, S) f32 += alpha-weighted softmax column sums of query (B, Hq, Lq, D) over
/// keys (B, Hkv, S, D), never forming the Lq x S matrix (`crate::kvscore::attention_scores`).
#[pyfunction]
#[pyo3(signature = (scores, query, keys, key_pos, key_valid, query_pos, query_valid, scaling, alpha, tol))]
#[allow(clippy::too_many_arguments)]
fn kv_attention_scores_(
    py: Python<'_>,
    mut scores: PyReadwriteArrayDyn<'_, f32>,
    query: PyReadonlyArrayDyn<'_, f32>,
    keys: PyReadonlyArrayDyn<'_, f32>,
    key_pos: PyReadonlyArrayDyn<'_, i64>,
    key_valid: PyReadonlyArrayDyn<'_, bool>,
    query_pos: PyReadonlyArrayDyn<'_, i64>,
    query_valid: PyReadonlyArrayDyn<'_, bool>,
    scaling: f32,
    alpha: f32,
    tol: f32,
) -> PyResult<()> {
    let sd = dims3(scores.shape(), "scores")?;
    let d = match (query.shape(), keys.shape()) {
        ([b, hq, lq, dq], [bk, hk, sk, dk])
            if *b == sd.batch
                && *bk == sd.batch
                && *hk == sd.heads
                && *sk == sd.slots
                && dq == dk =>
        {
            AttnDims {
                batch: *b,
                q_heads: *hq,
                kv_heads: *hk,
                q_len: *lq,
                slots: *sk,
                head_dim: *dk,
            }
        }
        (qs, ks) => {
            let msg = format!(
                "expected query (batch, q_heads, q, d) and keys (batch, kv_heads, slots, d) matching scores \
                 {:?}, got {qs:?} and {ks:?}",
                scores.shape()
            );
            return Err(Error::value("query", msg).into());
        }
    };
    same_shape(key_pos.shape(), &sd, "key_pos")?;
    same_shape(key_valid.shape(), &sd, "key_valid")?;
    for (name, sh) in [
        ("query_pos", query_pos.shape()),
        ("query_valid", query_valid.shape()),
    ] {
        if sh != [d.batch, d.q_len] {
            let msg = format!("expected shape ({}, {}), got {sh:?}", d.batch, d.q_len);
            return Err(Error::value(name, msg).into());
        }
    }
    let (q, k, kp, kv, qp, qv) = (
        as_slice(&query, "query")?,
        as_slice(&keys, "keys")?,
        as_slice(&key_pos, "key_pos")?,
        as_slice(&key_valid, "key_valid")?,
        as_slice(&query_pos, "query_pos")?,
        as_slice(&query_valid, "query_valid")?,
    );
    let s = as_slice_mut(&mut scores, "scores")?;
    detached(py, || {
        kvscore::attention_scores(s, q, k, kp, kv, qp, qv, d, scaling, alpha, tol)
    })?;
    Ok(())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(kv_accumulate_, m)?)?;
    m.add_function(wrap_pyfunction!(kv_select_keep, m)?)?;
    m.add_function(wrap_pyfunction!(kv_evict_one, m)?)?;
    m.add_function(wrap_pyfunction!(kv_attention_scores_, m)?)?;
    Ok(())
}
