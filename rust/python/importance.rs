//! Bindings of the importance family: lists of numpy arrays in (zero-copy views of torch
//! tensors), the GIL released around the kernels, `crate::Error` mapped to Python exceptions.

use numpy::{PyArray1, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

use super::{as_slice, as_slice_mut};
use crate::importance::{self, Mode};
use crate::Error;

fn slices<'a>(arrs: &'a [PyReadonlyArrayDyn<'_, f32>], arg: &str) -> PyResult<Vec<&'a [f32]>> {
    arrs.iter().map(|a| as_slice(a, arg)).collect()
}

fn slices_mut<'a>(
    arrs: &'a mut [PyReadwriteArrayDyn<'_, f32>],
    arg: &str,
) -> PyResult<Vec<&'a mut [f32]>> {
    arrs.iter_mut().map(|a| as_slice_mut(a, arg)).collect()
}

/// acc[t] += scale * g[t]**2 (mode "sq") or scale * |g[t]| (mode "abs") for every tensor t.
#[pyfunction]
#[pyo3(signature = (acc, grads, scale, mode))]
fn accumulate_(
    py: Python<'_>,
    mut acc: Vec<PyReadwriteArrayDyn<'_, f32>>,
    grads: Vec<PyReadonlyArrayDyn<'_, f32>>,
    scale: f32,
    mode: &str,
) -> PyResult<()> {
    let mode = match mode {
        "sq" => Mode::Sq,
        "abs" => Mode::Abs,
        other => {
            return Err(
                Error::value("mode", format!("expected 'sq' or 'abs', got {other:?}")).into(),
            )
        }
    };
    let mut a = slices_mut(&mut acc, "acc")?;
    let g = slices(&grads, "grads")?;
    py.detach(|| importance::accumulate(&mut a, &g, scale, mode))?;
    Ok(())
}

/// SSD dampening in place; returns the number of selected elements per tensor (int64).
#[pyfunction]
#[pyo3(signature = (params, imp_full, imp_forget, alpha, lam))]
fn ssd_dampen_<'py>(
    py: Python<'py>,
    mut params: Vec<PyReadwriteArrayDyn<'py, f32>>,
    imp_full: Vec<PyReadonlyArrayDyn<'py, f32>>,
    imp_forget: Vec<PyReadonlyArrayDyn<'py, f32>>,
    alpha: f32,
    lam: f32,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let mut p = slices_mut(&mut params, "params")?;
    let d = slices(&imp_full, "imp_full")?;
    let f = slices(&imp_forget, "imp_forget")?;
    let counts = py.detach(|| importance::ssd_dampen(&mut p, &d, &f, alpha, lam))?;
    Ok(PyArray1::from_vec(py, counts))
}

/// (tensor index, element index, value) of the first NaN, infinite or negative value, or None.
#[pyfunction]
fn find_invalid_importance(
    py: Python<'_>,
    imps: Vec<PyReadonlyArrayDyn<'_, f32>>,
) -> PyResult<Option<(usize, usize, f32)>> {
    let s = slices(&imps, "imps")?;
    Ok(py.detach(|| importance::validate(&s)))
}

/// (tensor index, element index, value) of the first NaN or infinity, or None: the check of
/// gradients before `accumulate_` writes anything.
#[pyfunction]
fn find_nonfinite(
    py: Python<'_>,
    xs: Vec<PyReadonlyArrayDyn<'_, f32>>,
) -> PyResult<Option<(usize, usize, f32)>> {
    let s = slices(&xs, "xs")?;
    Ok(py.detach(|| importance::find_nonfinite(&s)))
}

/// Stream triad a = b + s * c on the kernels' threads and chunking: the bandwidth yardstick
/// the benchmarks of memory-bound kernels report against.
#[pyfunction]
fn stream_triad_(
    py: Python<'_>,
    mut a: PyReadwriteArrayDyn<'_, f32>,
    b: PyReadonlyArrayDyn<'_, f32>,
    c: PyReadonlyArrayDyn<'_, f32>,
    s: f32,
) -> PyResult<()> {
    let a = as_slice_mut(&mut a, "a")?;
    let (b, c) = (as_slice(&b, "b")?, as_slice(&c, "c")?);
    if b.len() != a.len() || c.len() != a.len() {
        return Err(Error::value(
            "b",
            format!(
                "expected {} elements like a, got {} and {}",
                a.len(),
                b.len(),
                c.len()
            ),
        )
        .into());
    }
    py.detach(|| importance::triad(a, b, c, s));
    Ok(())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(accumulate_, m)?)?;
    m.add_function(wrap_pyfunction!(ssd_dampen_, m)?)?;
    m.add_function(wrap_pyfunction!(find_invalid_importance, m)?)?;
    m.add_function(wrap_pyfunction!(find_nonfinite, m)?)?;
    m.add_function(wrap_pyfunction!(stream_triad_, m)?)?;
    Ok(())
}
