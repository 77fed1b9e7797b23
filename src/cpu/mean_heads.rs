//! CPU twin of `shaders/mean_heads.wgsl`: attention weights averaged over heads.

use crate::params::AttnParams;

/// Runs the twin on the kernel's bindings 1.. as words: weights → mean.
pub fn run(p: &AttnParams, buffers: &mut [Vec<u32>]) {
    let [w, mean] = buffers else {
        crate::cpu::arity("mean_heads", buffers.len())
    };
    mean_heads(p, bytemuck::cast_slice(w), bytemuck::cast_slice_mut(mean));
}

/// `mean [batch, M, N]` from `w [batch, q_heads, M, N]`.
pub fn mean_heads(p: &AttnParams, w: &[f32], mean: &mut [f32]) {
    let mn = (p.m * p.n) as usize;
    for b in 0..p.batch as usize {
        for ij in 0..mn {
            let sum: f32 = (0..p.q_heads as usize)
                .map(|h| w[(b * p.q_heads as usize + h) * mn + ij])
                .sum();
            mean[b * mn + ij] = sum / p.q_heads as f32;
        }
    }
}
