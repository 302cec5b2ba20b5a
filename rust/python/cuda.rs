//! Bindings of the CUDA path (`rust/cuda/`).
//!
//! The launchers take raw device pointers and torch's stream handle as integers, so they are
//! private (underscore names, outside `__all__`): only `forgetcore._cuda` calls them, after
//! checking every tensor (device, dtype, layout, shape).
//!
//! Errors are typed here, once: a missing libnvrtc, driver or device raises
//! `CudaUnavailableError`; NVRTC rejecting a source raises `CudaCompileError`, whose `log`
//! attribute holds the compiler log (both subclasses of `RuntimeError`, re-exported by
//! `forgetcore._cuda`); any other failing CUDA call raises `RuntimeError`; bad arguments
//! `ValueError`/`TypeError`, as everywhere else.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::cuda::{self, kvscore, CudaError, Output};
use crate::importance::Mode;

pyo3::create_exception!(
    forgetcore._core,
    CudaUnavailableError,
    PyRuntimeError,
    "libnvrtc or the CUDA driver cannot be loaded, or there is no CUDA device."
);
pyo3::create_exception!(
    forgetcore._core,
    CudaCompileError,
    PyRuntimeError,
    "NVRTC could not compile a kernel source; `log` holds the compiler log."
);

impl From<CudaError> for PyErr {
    fn from(e: CudaError) -> PyErr {
        match e {
            CudaError::Arg(e) => e.into(),
            CudaError::Unavailable(m) => CudaUnavailableError::new_err(m),
            CudaError::Compile { ref log, .. } => {
                let err = CudaCompileError::new_err(e.to_string());
                Python::attach(|py| match err.value(py).setattr("log", log.as_str()) {
                    Ok(()) => err,
                    Err(set) => set,
                })
            }
            other => PyRuntimeError::new_err(other.to_string()),
        }
    }
}

/// NVRTC's (major, minor) version; RuntimeError when libnvrtc cannot be loaded.
#[pyfunction]
fn cuda_nvrtc_version(py: Python<'_>) -> PyResult<(i32, i32)> {
    Ok(py.detach(cuda::nvrtc_version)?)
}

/// Compile one embedded source (``"importance"`` or ``"kvscore"``) for sm_``arch``: PTX text,
/// or with ``cubin=True`` the SASS binary that launches use.
#[pyfunction]
#[pyo3(signature = (source, arch, cubin = false))]
fn cuda_compile<'py>(
    py: Python<'py>,
    source: &str,
    arch: u32,
    cubin: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let out = if cubin { Output::Cubin } else { Output::Ptx };
    let bin = py.detach(|| cuda::compile(source, arch, out))?;
    Ok(PyBytes::new(py, &bin))
}

/// Compile every embedded source for sm_``arch`` (PTX; with ``cubin=True`` also SASS); returns
/// (name, PTX bytes) per source. The compile test CI runs without a GPU.
#[pyfunction]
#[pyo3(signature = (arch, cubin = false))]
fn cuda_compile_check(py: Python<'_>, arch: u32, cubin: bool) -> PyResult<Vec<(String, usize)>> {
    Ok(py.detach(|| cuda::compile_check(arch, cubin))?)
}

/// (compute capability as 90, driver version as 13000) of CUDA device ``device``.
#[pyfunction]
fn cuda_device_info(py: Python<'_>, device: i32) -> PyResult<(u32, i32)> {
    Ok(py.detach(|| cuda::device_info(device))?)
}

/// Fused accumulate over the multi-tensor table ``meta`` (see cuda/importance.cu).
#[pyfunction(name = "_cuda_accumulate_")]
#[allow(clippy::too_many_arguments)]
fn cuda_accumulate_(
    py: Python<'_>,
    device: i32,
    stream: u64,
    meta: u64,
    acc: Vec<usize>,
    grads: Vec<usize>,
    chunk: i64,
    blocks: i64,
    scale: f32,
    mode: &str,
) -> PyResult<()> {
    let mode: Mode = mode.parse()?;
    // SAFETY: forgetcore._cuda builds `meta` from live CUDA tensors of `device`.
    Ok(py.detach(|| unsafe {
        cuda::importance::accumulate(
            device, stream, meta, &acc, &grads, chunk, blocks, scale, mode,
        )
    })?)
}

/// Fused SSD dampening over the multi-tensor table ``meta``; counts land in ``counts``.
#[pyfunction(name = "_cuda_ssd_dampen_")]
#[allow(clippy::too_many_arguments)]
fn cuda_ssd_dampen_(
    py: Python<'_>,
    device: i32,
    stream: u64,
    meta: u64,
    numels: [Vec<usize>; 3],
    chunk: i64,
    blocks: i64,
    alpha: f32,
    lam: f32,
    counts: u64,
) -> PyResult<()> {
    let [params, imp_full, imp_forget] = numels;
    // SAFETY: forgetcore._cuda builds `meta` and `counts` from live CUDA tensors of `device`.
    Ok(py.detach(|| unsafe {
        cuda::importance::ssd_dampen(
            device,
            stream,
            meta,
            &params,
            &imp_full,
            &imp_forget,
            chunk,
            blocks,
            alpha,
            lam,
            counts,
        )
    })?)
}

/// First invalid (NaN, infinite, negative) flat index per tensor of ``meta`` into ``first``.
#[pyfunction(name = "_cuda_find_invalid")]
#[allow(clippy::too_many_arguments)]
fn cuda_find_invalid(
    py: Python<'_>,
    device: i32,
    stream: u64,
    meta: u64,
    n: i64,
    chunk: i64,
    blocks: i64,
    first: u64,
) -> PyResult<()> {
    // SAFETY: forgetcore._cuda builds `meta` and `first` from live CUDA tensors of `device`.
    Ok(py.detach(|| unsafe {
        cuda::importance::find_invalid(device, stream, meta, n, chunk, blocks, first)
    })?)
}

/// Score accumulation; ``inv`` (0 for none) is the renormalisation buffer.
#[pyfunction(name = "_cuda_kv_accumulate_")]
#[allow(clippy::too_many_arguments)]
fn cuda_kv_accumulate_(
    py: Python<'_>,
    device: i32,
    stream: u64,
    scores: u64,
    attn: u64,
    attn_dtype: &str,
    attn_strides: [i64; 4],
    valid: u64,
    inv: u64,
    shape: [i64; 5],
    alpha: f32,
) -> PyResult<()> {
    let view = kvscore::AttnView {
        ptr: attn,
        dtype: attn_dtype.parse::<kvscore::Dtype>()? as i32,
        strides: attn_strides,
    };
    let [batch, kv_heads, group, q, slots] = shape;
    let shape = kvscore::Shape {
        batch,
        kv_heads,
        group,
        q,
        slots,
    };
    // SAFETY: forgetcore._cuda passes pointers of live CUDA tensors of these shapes.
    Ok(py.detach(|| unsafe {
        kvscore::accumulate(device, stream, scores, view, valid, inv, shape, alpha)
    })?)
}

/// Keep selection into ``out`` (rows, budget) int64.
#[pyfunction(name = "_cuda_kv_select_keep")]
#[allow(clippy::too_many_arguments)]
fn cuda_kv_select_keep(
    py: Python<'_>,
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
) -> PyResult<()> {
    // SAFETY: forgetcore._cuda passes pointers of live CUDA tensors of these shapes.
    Ok(py.detach(|| unsafe {
        kvscore::select_keep(
            device, stream, scores, positions, valid, rows, slots, budget, n_sink, n_recent, out,
        )
    })?)
}

/// One slot to evict per row (or -1) into ``out`` (rows,) int64.
#[pyfunction(name = "_cuda_kv_evict_one")]
#[allow(clippy::too_many_arguments)]
fn cuda_kv_evict_one(
    py: Python<'_>,
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
) -> PyResult<()> {
    // SAFETY: forgetcore._cuda passes pointers of live CUDA tensors of these shapes.
    Ok(py.detach(|| unsafe {
        kvscore::evict_one(
            device, stream, scores, positions, valid, rows, slots, n_sink, n_recent, out,
        )
    })?)
}

/// Fused scoring; ``ptrs`` = scores, query, keys, key_pos, key_valid, query_pos, query_valid,
/// stats; ``dims`` = batch, q_heads, kv_heads, q_len, slots, head_dim.
#[pyfunction(name = "_cuda_kv_attention_scores_")]
#[allow(clippy::too_many_arguments)]
fn cuda_kv_attention_scores_(
    py: Python<'_>,
    device: i32,
    stream: u64,
    ptrs: [u64; 8],
    dims: [usize; 6],
    scaling: f32,
    alpha: f32,
    tol: f32,
) -> PyResult<()> {
    let [batch, q_heads, kv_heads, q_len, slots, head_dim] = dims;
    let d = crate::kvscore::AttnDims {
        batch,
        q_heads,
        kv_heads,
        q_len,
        slots,
        head_dim,
    };
    // SAFETY: forgetcore._cuda passes pointers of live contiguous CUDA tensors of these shapes.
    Ok(py.detach(|| unsafe {
        kvscore::attention_scores(device, stream, ptrs, d, scaling, alpha, tol)
    })?)
}

/// Attach a function under its (underscore) name without listing it in `__all__`.
fn private<'py>(m: &Bound<'py, PyModule>, f: Bound<'py, pyo3::types::PyCFunction>) -> PyResult<()> {
    let name: String = f.getattr("__name__")?.extract()?;
    m.setattr(name, f)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add(
        "CudaUnavailableError",
        py.get_type::<CudaUnavailableError>(),
    )?;
    m.add("CudaCompileError", py.get_type::<CudaCompileError>())?;
    m.add_function(wrap_pyfunction!(cuda_nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile_check, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_info, m)?)?;
    private(m, wrap_pyfunction!(cuda_accumulate_, m)?)?;
    private(m, wrap_pyfunction!(cuda_ssd_dampen_, m)?)?;
    private(m, wrap_pyfunction!(cuda_find_invalid, m)?)?;
    private(m, wrap_pyfunction!(cuda_kv_accumulate_, m)?)?;
    private(m, wrap_pyfunction!(cuda_kv_select_keep, m)?)?;
    private(m, wrap_pyfunction!(cuda_kv_evict_one, m)?)?;
    private(m, wrap_pyfunction!(cuda_kv_attention_scores_, m)?)?;
    Ok(())
}
