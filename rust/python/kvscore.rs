//! Bindings for `crate::kvscore`: numpy in (zero-copy), GIL released around the kernels.
//!
//! Arrays come in as plain objects and are borrowed here with the fallible calls (a wrong dtype
//! is a `TypeError`, an array that another argument also borrows a `ValueError`, each naming the
//! argument), never through numpy's extraction, which panics on a borrow conflict. Every check
//! of values and shapes is the kernels' own (`crate::kvscore::contract`).

use numpy::{
    Element, IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::{as_slice, as_slice_mut, detached};
use crate::kvscore::{self, contract, Attn, AttnDims, Dims, Dtype};
use crate::Error;

fn array<'a, 'py, T: Element>(
    obj: &'a Bound<'py, PyAny>,
    arg: &str,
) -> PyResult<&'a Bound<'py, PyArrayDyn<T>>> {
    obj.cast::<PyArrayDyn<T>>().map_err(|_| {
        let got = obj
            .getattr("dtype")
            .map_or_else(|_| obj.get_type().to_string(), |d| d.to_string());
        Error::type_(
            arg,
            format!(
                "expected a numpy array of {}, got {got}",
                std::any::type_name::<T>()
            ),
        )
        .into()
    })
}

/// Borrow `obj` for reading, or name `arg` (wrong type; shares memory with a written array).
fn ro<'py, T: Element>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    array::<T>(obj, arg)?.try_readonly().map_err(|e| {
        Error::value(
            arg,
            format!("expected an array that shares no memory with an array written in place ({e})"),
        )
        .into()
    })
}

/// Borrow `obj` for writing, or name `arg`; call before the read-only borrows.
fn rw<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    array::<T>(obj, arg)?.try_readwrite().map_err(|e| {
        Error::value(
            arg,
            format!(
                "expected a writable array that shares no memory with the other arguments ({e})"
            ),
        )
        .into()
    })
}

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
    scores: &Bound<'_, PyAny>,
    attn: &Bound<'_, PyAny>,
    attn_dtype: &str,
    valid: Option<&Bound<'_, PyAny>>,
    group: usize,
    alpha: f32,
    renorm: bool,
) -> PyResult<()> {
    let dtype: Dtype = attn_dtype.parse()?;
    let mut scores = rw::<f32>(scores, "scores")?;
    let dims = dims3(scores.shape(), "scores")?;
    let valid = valid.map(|v| ro::<bool>(v, "valid")).transpose()?;
    if let Some(v) = &valid {
        same_shape(v.shape(), &dims, "valid")?;
    }
    let (a32, a16);
    let (ashape, view): (Vec<usize>, Attn<'_>) = match dtype {
        Dtype::F32 => {
            a32 = ro::<f32>(attn, "attn")?;
            (a32.shape().to_vec(), Attn::F32(as_slice(&a32, "attn")?))
        }
        Dtype::F16 | Dtype::Bf16 => {
            a16 = ro::<i16>(attn, "attn")?;
            let s = as_slice(&a16, "attn")?;
            // SAFETY: i16 and u16 have the same size and alignment; the kernel reads raw bits
            let bits: &[u16] =
                unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) };
            let v = if dtype == Dtype::F16 {
                Attn::F16(bits)
            } else {
                Attn::Bf16(bits)
            };
            (a16.shape().to_vec(), v)
        }
    };
    let q = match ashape.as_slice() {
        [b, hq, q, t]
            if *b == dims.batch
                && Some(*hq) == dims.heads.checked_mul(group)
                && *t == dims.slots =>
        {
            *q
        }
        _ => {
            let (b, t) = (dims.batch, dims.slots);
            let hq = dims.heads as u128 * group as u128;
            let want =
                format!("expected shape ({b}, {hq}, q, {t}) (batch, kv_heads*group, q, slots)");
            return Err(Error::value("attn", format!("{want}, got {ashape:?}")).into());
        }
    };
    contract::accumulate(dims, group, q, alpha)?;
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
    scores: &Bound<'py, PyAny>,
    positions: &Bound<'py, PyAny>,
    valid: &Bound<'py, PyAny>,
    budget: usize,
    n_sink: usize,
    n_recent: usize,
) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
    let (scores, positions, valid) = (
        ro::<f32>(scores, "scores")?,
        ro::<i64>(positions, "positions")?,
        ro::<bool>(valid, "valid")?,
    );
    let dims = dims3(scores.shape(), "scores")?;
    same_shape(positions.shape(), &dims, "positions")?;
    same_shape(valid.shape(), &dims, "valid")?;
    // before the output is allocated: budget <= slots bounds it by the inputs' size
    contract::select_keep(dims, budget, n_sink, n_recent)?;
    let (s, p, v) = (
        as_slice(&scores, "scores")?,
        as_slice(&positions, "positions")?,
        as_slice(&valid, "valid")?,
    );
    let mut out = vec![0i64; dims.batch * dims.heads * budget];
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
    scores: &Bound<'py, PyAny>,
    positions: &Bound<'py, PyAny>,
    valid: &Bound<'py, PyAny>,
    n_sink: usize,
    n_recent: usize,
) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
    let (scores, positions, valid) = (
        ro::<f32>(scores, "scores")?,
        ro::<i64>(positions, "positions")?,
        ro::<bool>(valid, "valid")?,
    );
    let dims = dims3(scores.shape(), "scores")?;
    same_shape(positions.shape(), &dims, "positions")?;
    same_shape(valid.shape(), &dims, "valid")?;
    contract::evict_one(dims)?;
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
    scores: &Bound<'_, PyAny>,
    query: &Bound<'_, PyAny>,
    keys: &Bound<'_, PyAny>,
    key_pos: &Bound<'_, PyAny>,
    key_valid: &Bound<'_, PyAny>,
    query_pos: &Bound<'_, PyAny>,
    query_valid: &Bound<'_, PyAny>,
    scaling: f32,
    alpha: f32,
    tol: f32,
) -> PyResult<()> {
    let mut scores = rw::<f32>(scores, "scores")?;
    let (query, keys) = (ro::<f32>(query, "query")?, ro::<f32>(keys, "keys")?);
    let (key_pos, key_valid) = (
        ro::<i64>(key_pos, "key_pos")?,
        ro::<bool>(key_valid, "key_valid")?,
    );
    let (query_pos, query_valid) = (
        ro::<i64>(query_pos, "query_pos")?,
        ro::<bool>(query_valid, "query_valid")?,
    );
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
    contract::attention_scores(d, scaling, alpha, tol)?;
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
