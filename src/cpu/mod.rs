//! CPU code: the independent reference and the CPU twins of each kernel.
//!
//! The reference ([`reference`]) is naive, accumulates in f64 and shares nothing with the
//! kernels: it is the oracle every GPU path is tested against. The twins mirror the WGSL
//! loops one for one (same tiling, same f32 arithmetic order where it matters) so a reader
//! can hold a shader beside its twin, and so the algorithm of each kernel is tested on its
//! own, without a GPU.

pub mod flash;
pub mod linear;
pub mod mask;
pub mod mean_heads;
pub mod merge_partials;
pub mod qk_scores;
pub mod reference;
pub mod softmax_rows;
pub mod weighted_sum;
