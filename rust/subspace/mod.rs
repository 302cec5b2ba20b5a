//! Orthonormal bases and gradient projection (GPM, FOT, GU).
//!
//! Layout conventions (all row-major `f32`):
//! - a layer gradient `G` is `(rows, cols)` = (out, in); its basis `U` is `(cols, rank)` with
//!   orthonormal columns on the input side, and projection is `G <- G - (G U) U^T`;
//! - the flattened form keeps its orthonormal vectors as the rows of a `(rank, n)` matrix `V`
//!   (a vector over all parameters is contiguous that way) and projects `g <- g - V^T (V g)`.
//!
//! Dense algebra goes through faer; layers run in parallel with rayon when there are at least
//! as many layers as threads, otherwise each layer's matmuls use all threads.
//!
//! Files: [`basis`] (checking and orthonormalising bases), [`project`] (projection of layer
//! gradients and of flat vectors), [`extend`] (GPM/FOT basis growth), [`simd`] (the vector
//! loops shared by them: f64-accumulated dot products and linear combinations).

use faer::{MatRef, Par};

mod basis;
mod extend;
mod project;
mod simd;

pub use basis::{check_basis, orthonormalize};
pub use extend::{count_new, extend_bases, extend_basis};
pub use project::{project_out_, project_out_flat_};

/// Tolerance of the cheap orthonormality check on a basis handed in by the caller.
pub const ORTHONORMAL_TOL: f64 = 1e-3;

/// A writable `(rows, cols)` row-major layer gradient.
pub struct GradMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
}

/// A `(dim, rank)` row-major basis with orthonormal columns.
#[derive(Clone, Copy)]
pub struct Basis<'a> {
    pub data: &'a [f32],
    pub dim: usize,
    pub rank: usize,
}

impl<'a> Basis<'a> {
    fn view(&self) -> MatRef<'a, f32> {
        MatRef::from_row_major_slice(self.data, self.dim, self.rank)
    }
}

/// Which rule `extend_basis` uses to decide how many new directions to add.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Criterion {
    /// GPM (Saha et al. 2021): energies sigma^2 of the residual against the threshold.
    Energy(Count),
    /// FOT (Bakman et al. 2024): the norm ratio r = ||A - U U^T A|| / ||A|| (or the clients'
    /// weighted mean of it, when given) sets eps' = (r - (1 - threshold)) / r; adds the fewest
    /// directions whose energy share exceeds eps', at least one.
    NormRatio { ratio: Option<f64> },
}

/// How GPM's energy criterion counts directions on an empty basis (the first task).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// As GPM's code does: `sum(cumsum(sigma^2)/total < threshold)`, one short of reaching it.
    Official,
    /// The fewest directions whose energy reaches the threshold.
    Reach,
}

/// The result of one `extend_basis`.
pub struct Extension {
    /// `(dim, rank)` row-major; the first columns are the old basis, unchanged.
    pub basis: Vec<f32>,
    pub rank: usize,
    /// Directions added.
    pub added: usize,
}

pub(crate) fn par_for(n_tasks: usize) -> (bool, Par) {
    // Parallel across layers when they can keep every thread busy, else inside each matmul.
    let threads = rayon::current_num_threads();
    if n_tasks >= threads || threads == 1 {
        (true, Par::Seq)
    } else {
        (false, Par::rayon(threads))
    }
}

pub(crate) fn first_non_finite(x: &[f32]) -> Option<usize> {
    x.iter().position(|v| !v.is_finite())
}

#[cfg(test)]
mod tests;
