//! forgetcore's Rust core.
//!
//! One module per primitive family (see DESIGN.md): the kernel modules are pure Rust over
//! slices and never import pyo3; everything Python-facing lives in `python/`, so `cargo test`
//! and `cargo bench` exercise the kernels without an interpreter.

pub mod cuda;
pub mod error;
pub mod importance;
pub mod kvscore;
pub mod python;
pub mod replay;
pub mod spectral;
pub mod subspace;

pub use error::{Error, Result};
