//! CPU twin of `shaders/add.wgsl`: `acc += x` element by element.

use crate::params::AddParams;

/// Runs the twin on the kernel's bindings 1.. as words: x → acc.
pub fn run(p: &AddParams, buffers: &mut [Vec<u32>]) {
    let [x, acc] = buffers else {
        crate::cpu::arity("add", buffers.len())
    };
    add(p, bytemuck::cast_slice(x), bytemuck::cast_slice_mut(acc));
}

/// `acc[i] += x[i]` for the first `p.elems` elements.
pub fn add(p: &AddParams, x: &[f32], acc: &mut [f32]) {
    let n = p.elems as usize;
    for (a, x) in acc[..n].iter_mut().zip(&x[..n]) {
        *a += x;
    }
}
