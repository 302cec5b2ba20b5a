//! Bindings of the replay kernels: the state objects behind `forgetcore.replay`.
//!
//! The decision state machines (`replay::Reservoir`, `replay::Cbrs`) and the checked copy plan
//! (`replay::CopyPlan`) live in the kernel crate with their unit tests; this file only finds the
//! bytes of arrays and tensors, matches a batch against the registered fields, releases the
//! GIL and maps errors. `ReservoirCore` and `CbrsCore` wrap that decision state and, for CPU
//! storage, copy the surviving rows in the same call. Storage comes as contiguous
//! writable numpy arrays (byte views made once, when the buffer allocates); each batch field
//! comes as the torch tensor itself, whose bytes are found through its own `is_cpu`,
//! `is_contiguous()`, `data_ptr()` and `nbytes` (four attribute look-ups: a tenth of what
//! making a numpy view per field per call costs). Any dtype works: rows are raw bytes,
//! `row_bytes = storage bytes / capacity`. Every argument is checked before any state changes,
//! so a call that raises leaves the object exactly as it was. The GIL is released while
//! copying 256 KiB and more (below that, releasing it costs more than the copy); do not
//! mutate a buffer or a batch from another thread during `add`.

use numpy::npyffi::flags::NPY_ARRAY_WRITEABLE;
use numpy::{
    PyArray1, PyArrayDescrMethods, PyReadonlyArray1, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::replay::plan::DETACH_BYTES;
use crate::replay::{reservoir, sample, Bytes, Cbrs, CbrsState, CopyPlan, Reservoir, Xoshiro256pp};
use crate::Error;

fn raw_bytes(a: &Bound<'_, PyUntypedArray>, arg: &str, writable: bool) -> PyResult<Bytes> {
    if !a.is_c_contiguous() {
        return Err(Error::value(arg, "expected a C-contiguous array").into());
    }
    let obj = a.as_array_ptr();
    // SAFETY: `obj` points to a live ndarray (we hold a reference to it).
    let (data, flags) = unsafe { ((*obj).data as *mut u8, (*obj).flags) };
    if writable && flags & NPY_ARRAY_WRITEABLE == 0 {
        return Err(Error::value(arg, "expected a writable array").into());
    }
    Ok(Bytes {
        ptr: data,
        len: a.len() * a.dtype().itemsize(),
    })
}

/// The bytes of a CPU torch tensor, or None when it is not on the CPU or not contiguous (the
/// Python layer then makes it contiguous, or raises naming the field).
fn tensor_bytes(t: &Bound<'_, PyAny>) -> PyResult<Option<Bytes>> {
    let py = t.py();
    if !t.getattr(intern!(py, "is_cpu"))?.is_truthy()?
        || !t.call_method0(intern!(py, "is_contiguous"))?.is_truthy()?
    {
        return Ok(None);
    }
    let ptr: usize = t.call_method0(intern!(py, "data_ptr"))?.extract()?;
    let len: usize = t.getattr(intern!(py, "nbytes"))?.extract()?;
    if ptr == 0 && len > 0 {
        return Ok(None);
    }
    Ok(Some(Bytes {
        ptr: ptr as *mut u8,
        len,
    }))
}

/// Find the bytes of a batch and its storage and build the checked copy plan; None when a batch
/// tensor is not a contiguous CPU tensor (so that the fast path can hand the batch back).
fn plan(
    n: usize,
    capacity: usize,
    batch: &[Bound<'_, PyAny>],
    storage: &[Bound<'_, PyUntypedArray>],
) -> PyResult<Option<CopyPlan>> {
    if batch.len() != storage.len() {
        return Err(Error::value(
            "batch",
            format!(
                "expected {} arrays (one per stored field), got {}",
                storage.len(),
                batch.len()
            ),
        )
        .into());
    }
    let mut fields = Vec::with_capacity(batch.len());
    for (b, s) in batch.iter().zip(storage) {
        let dst = raw_bytes(s, "storage", true)?;
        let Some(src) = tensor_bytes(b)? else {
            return Ok(None);
        };
        fields.push((dst, src));
    }
    // SAFETY: the arrays and tensors stay alive for the call (the caller holds them), and the
    // class docs ask that no other thread touches a buffer or its batch during `add`.
    Ok(Some(unsafe { CopyPlan::new(n, capacity, &fields) }?))
}

fn plan_or_raise(
    n: usize,
    capacity: usize,
    batch: &[Bound<'_, PyAny>],
    storage: &[Bound<'_, PyUntypedArray>],
) -> PyResult<CopyPlan> {
    plan(n, capacity, batch, storage)?
        .ok_or_else(|| Error::value("batch", "expected contiguous CPU tensors").into())
}

/// Copy the decided rows, with the GIL released when that moves enough bytes.
fn copy(py: Python<'_>, plan: CopyPlan, pairs: &[(i64, i64)]) -> PyResult<()> {
    if plan.bytes(pairs.len()) >= DETACH_BYTES {
        Ok(super::detached(py, move || plan.run(pairs))?)
    } else {
        Ok(plan.run(pairs)?)
    }
}

/// The stored fields as the one-call fast path (`add_fields`) matches a batch against them:
/// names, per-row shapes, dtypes (torch dtypes are singletons: compared by identity), the
/// storage arrays, and (CBRS) which field holds the int64 labels. Empty until the Python layer
/// allocates CPU storage; then `add(**fields)` is one Rust call, with the Python checks (and
/// their messages) run only when this match fails.
#[derive(Default)]
struct Fields {
    names: Vec<Py<PyString>>,
    tails: Vec<Vec<i64>>,
    dtypes: Vec<Py<PyAny>>,
    storage: Vec<Py<PyUntypedArray>>,
    label: Option<usize>,
}

impl Fields {
    fn set(
        names: Vec<Bound<'_, PyString>>,
        tails: Vec<Vec<i64>>,
        dtypes: Vec<Bound<'_, PyAny>>,
        storage: Vec<Bound<'_, PyUntypedArray>>,
        label: Option<usize>,
    ) -> PyResult<Self> {
        let k = names.len();
        if tails.len() != k
            || dtypes.len() != k
            || storage.len() != k
            || label.is_some_and(|l| l >= k)
        {
            return Err(Error::value(
                "fields",
                format!(
                    "expected {k} tails, dtypes and storage arrays and a label index below {k}"
                ),
            )
            .into());
        }
        Ok(Fields {
            names: names.into_iter().map(Bound::unbind).collect(),
            tails,
            dtypes: dtypes.into_iter().map(Bound::unbind).collect(),
            storage: storage.into_iter().map(Bound::unbind).collect(),
            label,
        })
    }

    /// The batch length and tensors in field order when `fields` has exactly the stored names,
    /// dtypes and row shapes and one batch length; None on any difference.
    fn matches<'py>(&self, fields: &Bound<'py, PyDict>) -> Option<(usize, Vec<Bound<'py, PyAny>>)> {
        let py = fields.py();
        if self.names.is_empty() || fields.len() != self.names.len() {
            return None;
        }
        let mut n: Option<usize> = None;
        let mut out = Vec::with_capacity(self.names.len());
        for ((name, tail), dtype) in self.names.iter().zip(&self.tails).zip(&self.dtypes) {
            let t = fields.get_item(name.bind(py)).ok()??;
            if !t.getattr(intern!(py, "dtype")).ok()?.is(dtype) {
                return None;
            }
            let shape = t.getattr(intern!(py, "shape")).ok()?;
            let shape = shape.cast::<PyTuple>().ok()?;
            if shape.len() != tail.len() + 1 {
                return None;
            }
            for (j, &d) in tail.iter().enumerate() {
                if shape.get_borrowed_item(j + 1).ok()?.extract::<i64>().ok()? != d {
                    return None;
                }
            }
            let rows: usize = shape.get_borrowed_item(0).ok()?.extract().ok()?;
            if *n.get_or_insert(rows) != rows {
                return None;
            }
            out.push(t);
        }
        Some((n?, out))
    }

    fn storage<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyUntypedArray>> {
        self.storage.iter().map(|s| s.bind(py).clone()).collect()
    }
}

type Slots<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>);

/// What `add_fields` returns: the slots array alone, or `(slots, rows)` when asked (building
/// one array instead of two is a measurable part of a small batch's fixed cost).
fn to_result<'py>(
    py: Python<'py>,
    pairs: &[(i64, i64)],
    return_rows: bool,
) -> PyResult<Bound<'py, PyAny>> {
    if return_rows {
        return to_arrays(py, pairs).into_pyobject(py).map(|t| t.into_any());
    }
    let slots: Vec<i64> = pairs.iter().map(|p| p.0).collect();
    Ok(PyArray1::from_vec(py, slots).into_any())
}

fn to_arrays<'py>(py: Python<'py>, pairs: &[(i64, i64)]) -> Slots<'py> {
    let slots: Vec<i64> = pairs.iter().map(|p| p.0).collect();
    let rows: Vec<i64> = pairs.iter().map(|p| p.1).collect();
    (
        PyArray1::from_slice(py, &slots),
        PyArray1::from_slice(py, &rows),
    )
}

fn rng_words(r: &Xoshiro256pp) -> [i64; 4] {
    r.state().map(|w| w as i64)
}

fn rng_from_words(w: [i64; 4]) -> PyResult<Xoshiro256pp> {
    Ok(Xoshiro256pp::from_state(w.map(|x| x as u64))?)
}

/// Algorithm R decision state (`replay::Reservoir`) and the registered CPU storage.
#[pyclass(module = "forgetcore._core")]
pub struct ReservoirCore {
    inner: Reservoir,
    fields: Fields,
}

impl ReservoirCore {
    fn run(&mut self, py: Python<'_>, plan: CopyPlan) -> PyResult<Vec<(i64, i64)>> {
        // The copy cannot fail after the plan's checks; keep the state whole even if it did.
        let before = self.inner.clone();
        let pairs = self.inner.add(plan.rows())?;
        if let Err(e) = copy(py, plan, &pairs) {
            self.inner = before;
            return Err(e);
        }
        Ok(pairs)
    }
}

#[pymethods]
impl ReservoirCore {
    #[new]
    fn new(capacity: u64, seed: u64) -> PyResult<Self> {
        Ok(ReservoirCore {
            inner: Reservoir::new(capacity, seed)?,
            fields: Fields::default(),
        })
    }

    #[getter]
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    #[getter]
    fn seen(&self) -> u64 {
        self.inner.seen()
    }

    fn __len__(&self) -> usize {
        self.inner.len() as usize
    }

    /// Decide the slots of the next `n` stream items and copy their rows: tensor `batch[i]`
    /// (n rows) into array `storage[i]` (capacity rows). Empty lists: decide only (the caller
    /// copies).
    /// Returns `(slots, rows)`: unique slots written, and the batch row each one takes.
    fn add<'py>(
        &mut self,
        py: Python<'py>,
        n: usize,
        batch: Vec<Bound<'py, PyAny>>,
        storage: Vec<Bound<'py, PyUntypedArray>>,
    ) -> PyResult<Slots<'py>> {
        let plan = plan_or_raise(n, self.inner.capacity() as usize, &batch, &storage)?;
        Ok(to_arrays(py, &self.run(py, plan)?))
    }

    /// Register the stored fields (CPU storage) for `add_fields`; empty lists switch it off.
    #[pyo3(signature = (names, tails, dtypes, storage, label=None))]
    fn set_fields(
        &mut self,
        names: Vec<Bound<'_, PyString>>,
        tails: Vec<Vec<i64>>,
        dtypes: Vec<Bound<'_, PyAny>>,
        storage: Vec<Bound<'_, PyUntypedArray>>,
        label: Option<usize>,
    ) -> PyResult<()> {
        self.fields = Fields::set(names, tails, dtypes, storage, label)?;
        Ok(())
    }

    /// `add` straight from the keyword dict of `ReservoirBuffer.add`: None (nothing done)
    /// unless the batch matches the registered fields exactly and is contiguous on the CPU.
    #[pyo3(signature = (fields, return_rows = false))]
    fn add_fields<'py>(
        &mut self,
        py: Python<'py>,
        fields: Bound<'py, PyDict>,
        return_rows: bool,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some((n, batch)) = self.fields.matches(&fields) else {
            return Ok(None);
        };
        let storage = self.fields.storage(py);
        let Some(plan) = plan(n, self.inner.capacity() as usize, &batch, &storage)? else {
            return Ok(None);
        };
        let pairs = self.run(py, plan)?;
        to_result(py, &pairs, return_rows).map(Some)
    }

    /// `n` distinct stored slots, uniformly without replacement, in random order.
    fn sample<'py>(&mut self, py: Python<'py>, n: u64) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let idx = self.inner.sample(n)?;
        Ok(PyArray1::from_vec(py, idx))
    }

    /// `{"seen", "rng"}`: everything that changes after construction.
    fn get_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (seen, rng) = self.inner.state();
        let d = PyDict::new(py);
        d.set_item("seen", seen)?;
        d.set_item("rng", rng.map(|w| w as i64))?;
        Ok(d)
    }

    fn set_state(&mut self, seen: u64, rng: [i64; 4]) -> PyResult<()> {
        self.inner = Reservoir::from_state(self.inner.capacity(), seen, rng.map(|w| w as u64))?;
        Ok(())
    }
}

/// Class-balancing reservoir (CBRS) decision state.
#[pyclass(module = "forgetcore._core")]
pub struct CbrsCore {
    inner: Cbrs,
    rng: Xoshiro256pp,
    fields: Fields,
}

impl CbrsCore {
    fn run(&mut self, py: Python<'_>, labels: &[i64], plan: CopyPlan) -> PyResult<Vec<(i64, i64)>> {
        if labels.len() != plan.rows() {
            return Err(Error::value(
                "labels",
                format!("expected {} labels, got {}", plan.rows(), labels.len()),
            )
            .into());
        }
        let mut pairs = self.inner.decide(&mut self.rng, labels);
        reservoir::last_writer_wins(&mut pairs);
        copy(py, plan, &pairs)?;
        Ok(pairs)
    }
}

type CbrsClasses<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<bool>>,
);

#[pymethods]
impl CbrsCore {
    #[new]
    fn new(capacity: i64, seed: u64) -> PyResult<Self> {
        if capacity <= 0 {
            return Err(
                Error::value("capacity", format!("expected an int >= 1, got {capacity}")).into(),
            );
        }
        Ok(CbrsCore {
            inner: Cbrs::new(capacity as usize)?,
            rng: Xoshiro256pp::seed_from_u64(seed),
            fields: Fields::default(),
        })
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    #[getter]
    fn seen(&self) -> u64 {
        self.inner.seen()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// As `ReservoirCore.add`, the decisions driven by `labels` (one int64 per batch row).
    fn add<'py>(
        &mut self,
        py: Python<'py>,
        labels: PyReadonlyArray1<'py, i64>,
        batch: Vec<Bound<'py, PyAny>>,
        storage: Vec<Bound<'py, PyUntypedArray>>,
    ) -> PyResult<Slots<'py>> {
        let labels = labels
            .as_slice()
            .map_err(|_| Error::value("labels", "expected a contiguous array"))?;
        let plan = plan_or_raise(labels.len(), self.inner.capacity(), &batch, &storage)?;
        Ok(to_arrays(py, &self.run(py, labels, plan)?))
    }

    /// As `ReservoirCore.set_fields`; `label` is the index of the int64 label field, without
    /// which the fast path stays off.
    #[pyo3(signature = (names, tails, dtypes, storage, label=None))]
    fn set_fields(
        &mut self,
        names: Vec<Bound<'_, PyString>>,
        tails: Vec<Vec<i64>>,
        dtypes: Vec<Bound<'_, PyAny>>,
        storage: Vec<Bound<'_, PyUntypedArray>>,
        label: Option<usize>,
    ) -> PyResult<()> {
        self.fields = Fields::set(names, tails, dtypes, storage, label)?;
        Ok(())
    }

    /// As `ReservoirCore.add_fields`, the labels read from the registered int64 label field.
    #[pyo3(signature = (fields, return_rows = false))]
    fn add_fields<'py>(
        &mut self,
        py: Python<'py>,
        fields: Bound<'py, PyDict>,
        return_rows: bool,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(label) = self.fields.label else {
            return Ok(None);
        };
        let Some((n, batch)) = self.fields.matches(&fields) else {
            return Ok(None);
        };
        let storage = self.fields.storage(py);
        let Some(plan) = plan(n, self.inner.capacity(), &batch, &storage)? else {
            return Ok(None);
        };
        let Some(src) = plan.source(label) else {
            return Ok(None);
        };
        if src.len != n * 8 {
            return Ok(None);
        }
        let mut labels = vec![0i64; n];
        // SAFETY: `src` is the checked byte range of the label tensor (n int64 values); the copy
        // goes byte-wise into our own vector, so the tensor's alignment does not matter.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr, labels.as_mut_ptr() as *mut u8, n * 8) };
        let pairs = self.run(py, &labels, plan)?;
        to_result(py, &pairs, return_rows).map(Some)
    }

    fn sample<'py>(&mut self, py: Python<'py>, n: u64) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let idx = sample::without_replacement(&mut self.rng, self.inner.len() as u64, n)?;
        Ok(PyArray1::from_slice(py, &idx))
    }

    /// Per class, in order of first appearance: `(labels, stored, seen, full)`.
    fn classes<'py>(&self, py: Python<'py>) -> CbrsClasses<'py> {
        let c = self.inner.classes();
        (
            PyArray1::from_vec(py, c.iter().map(|x| x.0).collect()),
            PyArray1::from_vec(py, c.iter().map(|x| x.1 as i64).collect()),
            PyArray1::from_vec(py, c.iter().map(|x| x.2 as i64).collect()),
            PyArray1::from_vec(py, c.iter().map(|x| x.3).collect()),
        )
    }

    /// The label held by each stored slot.
    fn slot_labels<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_vec(py, self.inner.slot_labels())
    }

    /// `{"seen", "rng", "labels", "n_seen", "full", "offsets", "slots"}`; see `CbrsState`.
    fn get_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = self.inner.state();
        let d = PyDict::new(py);
        d.set_item("seen", st.seen)?;
        d.set_item("rng", rng_words(&self.rng))?;
        d.set_item("labels", PyArray1::from_vec(py, st.labels))?;
        let n_seen: Vec<i64> = st.n_seen.iter().map(|&x| x as i64).collect();
        d.set_item("n_seen", PyArray1::from_vec(py, n_seen))?;
        d.set_item("full", PyArray1::from_vec(py, st.full))?;
        let offsets: Vec<i64> = st.offsets.iter().map(|&x| x as i64).collect();
        d.set_item("offsets", PyArray1::from_vec(py, offsets))?;
        let slots: Vec<i64> = st.slots.iter().map(|&x| x as i64).collect();
        d.set_item("slots", PyArray1::from_vec(py, slots))?;
        Ok(d)
    }

    #[allow(clippy::too_many_arguments)]
    fn set_state(
        &mut self,
        seen: u64,
        rng: [i64; 4],
        labels: Vec<i64>,
        n_seen: Vec<i64>,
        full: Vec<bool>,
        offsets: Vec<i64>,
        slots: Vec<i64>,
    ) -> PyResult<()> {
        let bad = |what: &str| Error::value("state_dict", format!("expected non-negative {what}"));
        let st = CbrsState {
            capacity: self.inner.capacity(),
            seen,
            labels,
            n_seen: n_seen
                .iter()
                .map(|&x| u64::try_from(x).map_err(|_| bad("class counts")))
                .collect::<Result<_, _>>()?,
            full,
            offsets: offsets
                .iter()
                .map(|&x| usize::try_from(x).map_err(|_| bad("offsets")))
                .collect::<Result<_, _>>()?,
            slots: slots
                .iter()
                .map(|&x| u32::try_from(x).map_err(|_| bad("slots")))
                .collect::<Result<_, _>>()?,
        };
        let inner = Cbrs::from_state(&st)?;
        self.rng = rng_from_words(rng)?;
        self.inner = inner;
        Ok(())
    }
}

/// A seedable xoshiro256++ stream with saved state (the power-law scheduler's sampler; tests
/// use it to check the Python reference generator draw for draw).
#[pyclass(module = "forgetcore._core")]
pub struct ReplayRng {
    rng: Xoshiro256pp,
}

#[pymethods]
impl ReplayRng {
    #[new]
    fn new(seed: u64) -> Self {
        ReplayRng {
            rng: Xoshiro256pp::seed_from_u64(seed),
        }
    }

    /// The next raw 64-bit outputs.
    fn next_u64<'py>(&mut self, py: Python<'py>, n: usize) -> Bound<'py, PyArray1<u64>> {
        let v: Vec<u64> = (0..n).map(|_| self.rng.next_u64()).collect();
        PyArray1::from_vec(py, v)
    }

    /// One uniform integer in `[0, bound)` per entry of `bounds` (each >= 1).
    fn below<'py>(
        &mut self,
        py: Python<'py>,
        bounds: PyReadonlyArray1<'py, i64>,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let b = bounds
            .as_slice()
            .map_err(|_| Error::value("bounds", "expected a contiguous array"))?;
        if let Some(&bad) = b.iter().find(|&&x| x < 1) {
            return Err(
                Error::value("bounds", format!("expected every bound >= 1, got {bad}")).into(),
            );
        }
        let v: Vec<i64> = b.iter().map(|&x| self.rng.below(x as u64) as i64).collect();
        Ok(PyArray1::from_vec(py, v))
    }

    /// `n` distinct integers of `[0, size)` in random order (partial Fisher-Yates).
    fn sample<'py>(
        &mut self,
        py: Python<'py>,
        size: u64,
        n: u64,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let idx = sample::without_replacement(&mut self.rng, size, n)?;
        Ok(PyArray1::from_vec(py, idx))
    }

    fn get_state(&self) -> [i64; 4] {
        rng_words(&self.rng)
    }

    fn set_state(&mut self, rng: [i64; 4]) -> PyResult<()> {
        self.rng = rng_from_words(rng)?;
        Ok(())
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ReservoirCore>()?;
    m.add_class::<CbrsCore>()?;
    m.add_class::<ReplayRng>()?;
    Ok(())
}
