//! replay: the kernels behind `forgetcore.replay` (reservoir and class-balanced rehearsal
//! buffers). Pure Rust over slices; the bindings live in `rust/python/replay.rs`.
//!
//! - `rng`: xoshiro256++ with a saved/restored state and exact bounded draws;
//! - `reservoir`: Vitter's Algorithm R slot decisions for a whole batch, later writes winning;
//! - `cbrs`: class-balancing reservoir sampling (Chrysakis and Moens, ICML 2020);
//! - `copy`: the row copies into storage, on bytes so every dtype shares them;
//! - `plan`: the checked copy plan of one `add` (storage and batch bytes of every field);
//! - `sample`: `n` distinct indices by a partial Fisher-Yates shuffle.
//!
//! Every decision is a function of the seed and of what was added (batch sizes; labels for
//! CBRS), never of thread timing or hash order, so every rank of a distributed job that adds
//! the same batch sizes from the same seed makes the same choices.

pub mod cbrs;
pub mod copy;
pub mod plan;
pub mod reservoir;
pub mod rng;
pub mod sample;

pub use cbrs::{Cbrs, CbrsState};
pub use plan::{Bytes, CopyPlan};
pub use reservoir::Reservoir;
pub use rng::Xoshiro256pp;
