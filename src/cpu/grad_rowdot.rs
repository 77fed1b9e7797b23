//! CPU twin of `shaders/grad_rowdot.wgsl`: D = rowsum(dO ∘ O) and dO in f32.

use crate::cpu::widen;
use crate::dtype::Storage;
use crate::params::AttnParams;

/// Runs the twin on the kernel's bindings 1.. as words: o, d_o → delta, d_o32.
pub fn run(p: &AttnParams, storage: Storage, buffers: &mut [Vec<u32>]) {
    let [o, d_o, delta, d_o32] = buffers else {
        crate::cpu::arity("grad_rowdot", buffers.len())
    };
    let (o, d_o) = (widen(storage, o), widen(storage, d_o));
    let delta: &mut [f32] = bytemuck::cast_slice_mut(delta);
    let d_o32: &mut [f32] = bytemuck::cast_slice_mut(d_o32);
    let dv = p.d_v as usize;
    for r in 0..(p.batch * p.m * p.q_heads) as usize {
        let (h, bi) = (r % p.q_heads as usize, r / p.q_heads as usize);
        let (b, i) = (bi / p.m as usize, bi % p.m as usize);
        let mut acc = 0.0f32;
        for d in 0..dv {
            let g = d_o[r * dv + d];
            acc = g.mul_add(o[r * dv + d], acc);
            d_o32[r * dv + d] = g;
        }
        delta[(b * p.q_heads as usize + h) * p.m as usize + i] = acc;
    }
}
