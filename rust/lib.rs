//! forgetcore's Rust core.
//!
//! One module per primitive family: the kernel modules are pure Rust over
//! slices and never import pyo3. Everything Python-facing lives in `python/`, compiled only
//! with the `python` feature (maturin turns it on), so `cargo test` and `cargo bench` build
//! and run the kernels without pyo3, numpy or libpython.

pub mod cuda;
pub mod error;
pub mod importance;
pub mod kvscore;
pub mod parallel;
#[cfg(feature = "python")]
pub mod python;
pub mod replay;
pub mod spectral;
pub mod subspace;

pub use error::{Error, Result};
