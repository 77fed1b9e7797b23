//! CPU twin of `shaders/pack.wgsl`: f32 values into half-precision pairs, rounded to nearest.

use crate::dtype::DType;
use crate::params::PackParams;

/// Runs the twin on the kernel's bindings 1.. as words: f32 values → packed words.
pub fn run(p: &PackParams, to: DType, buffers: &mut [Vec<u32>]) {
    let [src, dst] = buffers else {
        crate::cpu::arity("pack", buffers.len())
    };
    pack(p, to, bytemuck::cast_slice(src), dst);
}

/// Writes `p.elems` values of `src` into `dst` as `to` (f16 or bf16) pairs, one word each.
pub fn pack(p: &PackParams, to: DType, src: &[f32], dst: &mut [u32]) {
    let bytes = to.encode(&src[..p.elems as usize]);
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
    dst[..words.len()].copy_from_slice(&words);
}
