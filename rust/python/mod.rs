//! PyO3 bindings: the only place that knows about Python.
//!
//! Each family has one file here with the same name as its kernel module. A binding converts
//! arrays (zero-copy through numpy), releases the GIL around the kernel (`py.detach`) and maps
//! `crate::Error` to a Python exception. Nothing here panics across the FFI boundary: every
//! fallible step returns `PyResult`.

use numpy::{Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::Error;

mod cuda;
mod importance;
mod kvscore;
mod replay;
mod spectral;
mod subspace;

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Value { .. } => PyValueError::new_err(e.to_string()),
            Error::Type { .. } => PyTypeError::new_err(e.to_string()),
        }
    }
}

/// Borrow arrays for writing, then for reading, through numpy's borrow checker: an array that
/// another argument also borrows (the same memory passed twice) is a `ValueError` naming the
/// argument, never the panic of numpy's own extraction.
pub(crate) fn borrow_rw<'py, T: Element>(
    arrs: &[Bound<'py, PyArrayDyn<T>>],
    arg: &str,
) -> PyResult<Vec<PyReadwriteArrayDyn<'py, T>>> {
    arrs.iter()
        .map(|a| {
            a.try_readwrite().map_err(|e| {
                Error::value(
                    arg,
                    format!("expected writable arrays that share no memory with each other or with the other arguments ({e})"),
                )
                .into()
            })
        })
        .collect()
}

/// See `borrow_rw`; call it after the writable arguments are borrowed.
pub(crate) fn borrow_ro<'py, T: Element>(
    arrs: &[Bound<'py, PyArrayDyn<T>>],
    arg: &str,
) -> PyResult<Vec<PyReadonlyArrayDyn<'py, T>>> {
    arrs.iter()
        .map(|a| {
            a.try_readonly().map_err(|e| {
                Error::value(
                    arg,
                    format!(
                        "expected arrays that share no memory with an array written in place ({e})"
                    ),
                )
                .into()
            })
        })
        .collect()
}

/// Borrow a read-only numpy array as a contiguous slice, or say which argument is not.
pub(crate) fn as_slice<'a, T: Element>(
    arr: &'a PyReadonlyArrayDyn<'_, T>,
    arg: &str,
) -> PyResult<&'a [T]> {
    arr.as_slice()
        .map_err(|_| Error::value(arg, "expected a C-contiguous array").into())
}

/// Borrow a writable numpy array as a contiguous mutable slice, or say which argument is not.
pub(crate) fn as_slice_mut<'a, T: Element>(
    arr: &'a mut PyReadwriteArrayDyn<'_, T>,
    arg: &str,
) -> PyResult<&'a mut [T]> {
    arr.as_slice_mut()
        .map_err(|_| Error::value(arg, "expected a C-contiguous writable array").into())
}

/// Run a kernel with the GIL released, on the kernels' fork-safe thread pool
/// (`crate::parallel`): every binding calls its kernels through this.
pub(crate) fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    py.detach(|| crate::parallel::run(f))
}

/// Number of threads the parallel kernels use (set `RAYON_NUM_THREADS` to change it).
#[pyfunction]
fn num_threads() -> usize {
    crate::parallel::num_threads()
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    cuda::register(m)?;
    replay::register(m)?;
    importance::register(m)?;
    kvscore::register(m)?;
    subspace::register(m)?;
    spectral::register(m)?;
    Ok(())
}
