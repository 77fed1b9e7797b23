//! CPU code: the independent reference and the CPU twins of each kernel.
//!
//! The reference ([`mod@reference`]) is naive, accumulates in f64 and shares nothing with the
//! kernels: it is the oracle every GPU path is tested against. The twins mirror the WGSL
//! loops one for one (same tiling, same f32 arithmetic order where it matters) so a reader
//! can hold a shader beside its twin, and so the algorithm of each kernel is tested on its
//! own, without a GPU. [`budget`] holds the error allowed against the reference.

pub mod budget;
pub mod reference;

// The twins: internals, public for the tests.
#[doc(hidden)]
pub mod add;
#[doc(hidden)]
pub mod flash;
#[doc(hidden)]
pub mod flash_coop;
pub mod gca_reference;
#[doc(hidden)]
pub mod grad;
#[doc(hidden)]
pub mod grad_bias;
#[doc(hidden)]
pub mod grad_kv;
#[doc(hidden)]
pub mod grad_q;
#[doc(hidden)]
pub mod grad_rowdot;
#[doc(hidden)]
pub mod graph_attention;
#[doc(hidden)]
pub mod graph_grad_kv;
#[doc(hidden)]
pub mod graph_grad_q;
pub mod graph_grad_reference;
#[doc(hidden)]
pub mod graph_merge;
pub mod graph_reference;
pub mod graph_stats;
#[doc(hidden)]
pub mod key_coverage;
#[doc(hidden)]
pub mod linear;
#[doc(hidden)]
pub mod linear_grad;
#[doc(hidden)]
pub mod mask;
#[doc(hidden)]
pub mod mean_heads;
#[doc(hidden)]
pub mod merge_partials;
#[doc(hidden)]
pub mod pack;
#[doc(hidden)]
pub mod program;
#[doc(hidden)]
pub mod qk_scores;
#[doc(hidden)]
pub mod softmax_rows;
#[doc(hidden)]
pub mod weight_blocks;
#[doc(hidden)]
pub mod weighted_sum;

use crate::dtype::Storage;

/// Every element the words of `storage` hold, widened to f32: a twin's view of an input
/// bound in half precision.
pub(crate) fn widen(storage: Storage, words: &[u32]) -> Vec<f32> {
    let dtype = storage.dtype();
    let elems = words.len() * 4 / dtype.size() as usize;
    dtype.decode(bytemuck::cast_slice(words), elems)
}

/// A twin was handed the wrong number of buffers: a program bug.
pub(crate) fn arity(kernel: &str, got: usize) -> ! {
    panic!("{kernel} got {got} buffers")
}
