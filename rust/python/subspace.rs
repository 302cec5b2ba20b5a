//! Bindings of `crate::subspace`: borrow numpy arrays, release the GIL, map errors.

use numpy::ndarray::Array2;
use numpy::{PyArray2, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::{as_slice, as_slice_mut, borrow_ro, borrow_rw, detached};
use crate::subspace::{self as k, Basis, Count, Criterion, GradMut};
use crate::Error;

fn dims2(shape: &[usize], arg: &str) -> PyResult<(usize, usize)> {
    match shape {
        [a, b] => Ok((*a, *b)),
        _ => Err(Error::value(arg, format!("expected a 2-D array, got shape {shape:?}")).into()),
    }
}

/// `G <- G - (G U) U^T` for every (out, in) gradient and its (in, rank) basis, in place.
#[pyfunction]
#[pyo3(name = "project_out_", signature = (grads, bases, check = true))]
fn project_out_py<'py>(
    py: Python<'py>,
    grads: Vec<Bound<'py, PyArrayDyn<f32>>>,
    bases: Vec<Bound<'py, PyArrayDyn<f32>>>,
    check: bool,
) -> PyResult<()> {
    let mut grads = borrow_rw(&grads, "grads")?;
    let bases = borrow_ro(&bases, "bases")?;
    let gshapes = grads
        .iter()
        .enumerate()
        .map(|(i, g)| dims2(g.shape(), &format!("grads[{i}]")))
        .collect::<PyResult<Vec<_>>>()?;
    let bshapes = bases
        .iter()
        .enumerate()
        .map(|(i, b)| dims2(b.shape(), &format!("bases[{i}]")))
        .collect::<PyResult<Vec<_>>>()?;
    let mut views = Vec::with_capacity(grads.len());
    for (i, (g, (rows, cols))) in grads.iter_mut().zip(gshapes).enumerate() {
        views.push(GradMut {
            data: as_slice_mut(g, &format!("grads[{i}]"))?,
            rows,
            cols,
        });
    }
    let mut bs = Vec::with_capacity(bases.len());
    for (i, (b, (dim, rank))) in bases.iter().zip(bshapes).enumerate() {
        bs.push(Basis {
            data: as_slice(b, &format!("bases[{i}]"))?,
            dim,
            rank,
        });
    }
    detached(py, || k::project_out_(&mut views, &bs, check))?;
    Ok(())
}

/// `g <- g - V^T (V g)` for a flat vector g (n,) and orthonormal rows V (rank, n), in place.
#[pyfunction]
#[pyo3(name = "project_out_flat_", signature = (g, vectors, check = true))]
fn project_out_flat_py<'py>(
    py: Python<'py>,
    g: Bound<'py, PyArrayDyn<f32>>,
    vectors: Bound<'py, PyArrayDyn<f32>>,
    check: bool,
) -> PyResult<()> {
    let mut g = borrow_rw(std::slice::from_ref(&g), "g")?.remove(0);
    let vectors = borrow_ro(std::slice::from_ref(&vectors), "vectors")?.remove(0);
    if g.shape().len() != 1 {
        return Err(Error::value(
            "g",
            format!("expected a 1-D array, got shape {:?}", g.shape()),
        )
        .into());
    }
    let (rank, n) = dims2(vectors.shape(), "vectors")?;
    if n != g.shape()[0] {
        return Err(Error::value(
            "vectors",
            format!("expected shape (*, {}), got ({rank}, {n})", g.shape()[0]),
        )
        .into());
    }
    let gs = as_slice_mut(&mut g, "g")?;
    let vs = as_slice(&vectors, "vectors")?;
    detached(py, || k::project_out_flat_(gs, vs, rank, check))?;
    Ok(())
}

/// Gram-Schmidt twice over the rows of `vectors` (k, n); returns (kept rows (m, n), kept indices).
#[pyfunction]
#[pyo3(name = "orthonormalize")]
fn orthonormalize_py<'py>(
    py: Python<'py>,
    vectors: PyReadonlyArrayDyn<'py, f32>,
    tol: f64,
) -> PyResult<(Bound<'py, PyArray2<f32>>, Vec<usize>)> {
    let (rows, n) = dims2(vectors.shape(), "vectors")?;
    let vs = as_slice(&vectors, "vectors")?;
    let (out, kept) = detached(py, || k::orthonormalize(vs, rows, n, tol))?;
    let arr = Array2::from_shape_vec((kept.len(), n), out)
        .map_err(|e| Error::value("vectors", e.to_string()))?;
    Ok((PyArray2::from_owned_array(py, arr), kept))
}

fn criterion(name: &str, count: &str, ratio: Option<f64>) -> PyResult<Criterion> {
    let count = match count {
        "official" => Count::Official,
        "reach" => Count::Reach,
        other => {
            return Err(Error::value(
                "count",
                format!("expected 'official' or 'reach', got {other:?}"),
            )
            .into())
        }
    };
    match name {
        "energy" => {
            if ratio.is_some() {
                return Err(Error::value(
                    "ratios",
                    "only the 'norm_ratio' criterion takes a ratio",
                )
                .into());
            }
            Ok(Criterion::Energy(count))
        }
        "norm_ratio" => Ok(Criterion::NormRatio { ratio }),
        other => Err(Error::value(
            "criterion",
            format!("expected 'energy' or 'norm_ratio', got {other:?}"),
        )
        .into()),
    }
}

/// Extend every (dim, rank) basis with the leading directions of its (dim, n) representation
/// matrix that lie outside it; returns the new (dim, rank') bases (old columns first, unchanged).
#[pyfunction]
#[pyo3(name = "extend_bases", signature = (bases, reps, thresholds, criterion = "energy", count = "official", ratios = None))]
fn extend_bases_py<'py>(
    py: Python<'py>,
    bases: Vec<PyReadonlyArrayDyn<'py, f32>>,
    reps: Vec<PyReadonlyArrayDyn<'py, f32>>,
    thresholds: Vec<f64>,
    criterion: &str,
    count: &str,
    ratios: Option<Vec<Option<f64>>>,
) -> PyResult<Vec<Bound<'py, PyArray2<f32>>>> {
    let l = bases.len();
    let ratios = ratios.unwrap_or_else(|| vec![None; l]);
    if ratios.len() != l {
        return Err(Error::value(
            "ratios",
            format!("expected one ratio per basis ({l}), got {}", ratios.len()),
        )
        .into());
    }
    let crits = ratios
        .iter()
        .map(|r| self::criterion(criterion, count, *r))
        .collect::<PyResult<Vec<_>>>()?;
    let mut bs = Vec::with_capacity(l);
    for (i, b) in bases.iter().enumerate() {
        let (dim, rank) = dims2(b.shape(), &format!("bases[{i}]"))?;
        bs.push(Basis {
            data: as_slice(b, &format!("bases[{i}]"))?,
            dim,
            rank,
        });
    }
    let mut rs = Vec::with_capacity(reps.len());
    for (i, a) in reps.iter().enumerate() {
        let (dim, n) = dims2(a.shape(), &format!("reps[{i}]"))?;
        if i < l && dim != bs[i].dim {
            return Err(Error::value(
                format!("reps[{i}]"),
                format!(
                    "expected {} rows (the basis dimension), got ({dim}, {n})",
                    bs[i].dim
                ),
            )
            .into());
        }
        rs.push((as_slice(a, &format!("reps[{i}]"))?, n));
    }
    let exts = detached(py, || k::extend_bases(&bs, &rs, &thresholds, &crits))?;
    exts.into_iter()
        .zip(&bs)
        .map(|(e, b)| {
            let arr = Array2::from_shape_vec((b.dim, e.rank), e.basis)
                .map_err(|er| PyErr::from(Error::value("bases", er.to_string())))?;
            Ok(PyArray2::from_owned_array(py, arr))
        })
        .collect()
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(project_out_py, m)?)?;
    m.add_function(wrap_pyfunction!(project_out_flat_py, m)?)?;
    m.add_function(wrap_pyfunction!(orthonormalize_py, m)?)?;
    m.add_function(wrap_pyfunction!(extend_bases_py, m)?)?;
    Ok(())
}
