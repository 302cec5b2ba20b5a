//! Bindings of the importance family: lists of numpy arrays in (zero-copy views of torch
//! tensors), the GIL released around the kernels, `crate::Error` mapped to Python exceptions.

use numpy::{PyArray1, PyArrayDyn, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

use super::{as_slice, as_slice_mut, borrow_ro, borrow_rw, detached};
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
fn accumulate_<'py>(
    py: Python<'py>,
    acc: Vec<Bound<'py, PyArrayDyn<f32>>>,
    grads: Vec<Bound<'py, PyArrayDyn<f32>>>,
    scale: f32,
    mode: &str,
) -> PyResult<()> {
    let mode: Mode = mode.parse()?;
    let mut acc = borrow_rw(&acc, "acc")?;
    let grads = borrow_ro(&grads, "grads")?;
    let mut a = slices_mut(&mut acc, "acc")?;
    let g = slices(&grads, "grads")?;
    detached(py, || importance::accumulate(&mut a, &g, scale, mode))?;
    Ok(())
}

/// SSD dampening in place; returns the number of selected elements per tensor (int64).
#[pyfunction]
#[pyo3(signature = (params, imp_full, imp_forget, alpha, lam))]
fn ssd_dampen_<'py>(
    py: Python<'py>,
    params: Vec<Bound<'py, PyArrayDyn<f32>>>,
    imp_full: Vec<Bound<'py, PyArrayDyn<f32>>>,
    imp_forget: Vec<Bound<'py, PyArrayDyn<f32>>>,
    alpha: f32,
    lam: f32,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let mut params = borrow_rw(&params, "params")?;
    let imp_full = borrow_ro(&imp_full, "imp_full")?;
    let imp_forget = borrow_ro(&imp_forget, "imp_forget")?;
    let mut p = slices_mut(&mut params, "params")?;
    let d = slices(&imp_full, "imp_full")?;
    let f = slices(&imp_forget, "imp_forget")?;
    let counts = detached(py, || importance::ssd_dampen(&mut p, &d, &f, alpha, lam))?;
    Ok(PyArray1::from_vec(py, counts))
}

/// Where the first NaN, infinite or negative importance is: `tensor` (its index in the list),
/// `index` (flat, within that tensor) and the `value` found there.
#[pyclass(module = "forgetcore._core", frozen, get_all)]
pub struct InvalidImportance {
    tensor: usize,
    index: usize,
    value: f32,
}

#[pymethods]
impl InvalidImportance {
    fn __repr__(&self) -> String {
        format!(
            "InvalidImportance(tensor={}, index={}, value={})",
            self.tensor, self.index, self.value
        )
    }
}

/// The first NaN, infinite or negative value of the list, or None.
#[pyfunction]
fn find_invalid_importance(
    py: Python<'_>,
    imps: Vec<PyReadonlyArrayDyn<'_, f32>>,
) -> PyResult<Option<InvalidImportance>> {
    let s = slices(&imps, "imps")?;
    let found = detached(py, || importance::validate(&s));
    Ok(found.map(|(tensor, index, value)| InvalidImportance {
        tensor,
        index,
        value,
    }))
}

/// The first NaN or infinity (tensor index, element index, value), or None: the check of
/// gradients before `accumulate_` writes anything.
#[pyfunction]
fn find_nonfinite(
    py: Python<'_>,
    xs: Vec<PyReadonlyArrayDyn<'_, f32>>,
) -> PyResult<Option<InvalidImportance>> {
    let s = slices(&xs, "xs")?;
    let found = detached(py, || importance::find_nonfinite(&s));
    Ok(found.map(|(tensor, index, value)| InvalidImportance {
        tensor,
        index,
        value,
    }))
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
    detached(py, || importance::triad(a, b, c, s));
    Ok(())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(accumulate_, m)?)?;
    m.add_function(wrap_pyfunction!(ssd_dampen_, m)?)?;
    m.add_function(wrap_pyfunction!(find_invalid_importance, m)?)?;
    m.add_class::<InvalidImportance>()?;
    m.add_function(wrap_pyfunction!(find_nonfinite, m)?)?;
    m.add_function(wrap_pyfunction!(stream_triad_, m)?)?;
    Ok(())
}
