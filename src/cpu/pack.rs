//! CPU twin of `shaders/pack.wgsl`: f32 values into half-precision pairs, rounded to nearest.

use crate::dtype::DType;
use crate::params::PackParams;

/// Writes `p.elems` values of `src` into `dst` as `to` (f16 or bf16) pairs, one word each.
pub fn pack(p: &PackParams, to: DType, src: &[f32], dst: &mut [u32]) {
    let bytes = to.encode(&src[..p.elems as usize]);
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
    dst[..words.len()].copy_from_slice(&words);
}
