//! Bindings of the spectral family: lists of float32 matrices in, float64 results out.

use numpy::{PyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::detached;
use crate::spectral::{self, MatView, Method};
use crate::Error;

/// Borrow every array as a row-major slice (zero-copy), naming the first that is not contiguous.
fn views<'a>(arrays: &'a [PyReadonlyArray2<'_, f32>]) -> PyResult<Vec<MatView<'a>>> {
    arrays
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (rows, cols) = (a.shape()[0], a.shape()[1]);
            let data = a.as_slice().map_err(|_| {
                Error::value(format!("matrices[{i}]"), "expected a C-contiguous array")
            })?;
            Ok(MatView::new(data, rows, cols))
        })
        .collect()
}

/// Singular values (descending, float64) of every float32 matrix; GIL released.
#[pyfunction]
#[pyo3(signature = (matrices, method = "auto"))]
fn spectral_singular_values<'py>(
    py: Python<'py>,
    matrices: Vec<PyReadonlyArray2<'py, f32>>,
    method: &str,
) -> PyResult<Vec<Bound<'py, PyArray1<f64>>>> {
    let method = Method::parse(method)?;
    let mats = views(&matrices)?;
    let out = detached(py, || spectral::singular_values(&mats, method))?;
    Ok(out.into_iter().map(|s| PyArray1::from_vec(py, s)).collect())
}

/// Condition number of every float32 matrix (inf when singular to working precision); GIL released.
#[pyfunction]
#[pyo3(signature = (matrices, method = "auto"))]
fn spectral_condition_numbers<'py>(
    py: Python<'py>,
    matrices: Vec<PyReadonlyArray2<'py, f32>>,
    method: &str,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let method = Method::parse(method)?;
    let mats = views(&matrices)?;
    let out = detached(py, || spectral::condition_numbers(&mats, method))?;
    Ok(PyArray1::from_vec(py, out))
}

/// Power-iteration estimates of σ_max: (values, iterations, converged); GIL released.
#[pyfunction]
#[pyo3(signature = (matrices, tol = 1e-6, max_iter = 100, seed = 0))]
#[allow(clippy::type_complexity)]
fn spectral_norm_estimates<'py>(
    py: Python<'py>,
    matrices: Vec<PyReadonlyArray2<'py, f32>>,
    tol: f64,
    max_iter: usize,
    seed: u64,
) -> PyResult<(
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray1<u64>>,
    Bound<'py, PyArray1<bool>>,
)> {
    let mats = views(&matrices)?;
    let out = detached(py, || spectral::spectral_norms(&mats, tol, max_iter, seed))?;
    Ok((
        PyArray1::from_vec(py, out.iter().map(|e| e.value).collect()),
        PyArray1::from_vec(py, out.iter().map(|e| e.iterations as u64).collect()),
        PyArray1::from_vec(py, out.iter().map(|e| e.converged).collect()),
    ))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(spectral_singular_values, m)?)?;
    m.add_function(wrap_pyfunction!(spectral_condition_numbers, m)?)?;
    m.add_function(wrap_pyfunction!(spectral_norm_estimates, m)?)?;
    Ok(())
}
