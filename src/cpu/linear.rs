//! CPU twin of `shaders/linear.wgsl`: `Y = X·Wᵀ + b` for a chunk of rows, in f32. The tiles
//! change where operands live, not the order of the sum over input features.

use crate::dtype::Storage;
use crate::params::LinearParams;

/// Runs the twin on the kernel's bindings 1.. as words: x, w, b → y.
pub fn run(p: &LinearParams, (xs, ws): (Storage, Storage), buffers: &mut [Vec<u32>]) {
    let [x, w, b, y] = buffers else {
        crate::cpu::arity("linear", buffers.len())
    };
    let (x, w, b) = (
        crate::cpu::widen(xs, x),
        crate::cpu::widen(ws, w),
        crate::cpu::widen(ws, b),
    );
    linear(p, &x, &w, &b, bytemuck::cast_slice_mut(y));
}

/// Writes rows `row_offset .. row_offset + rows` of `y [rows, out_dim]`.
pub fn linear(p: &LinearParams, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
    for row in p.row_offset..p.row_offset + p.rows {
        for col in 0..p.out_dim {
            let mut acc = 0.0f32;
            for d in 0..p.in_dim {
                acc =
                    x[(row * p.in_dim + d) as usize].mul_add(w[(col * p.in_dim + d) as usize], acc);
            }
            let bias = if p.has_bias != 0 {
                b[col as usize]
            } else {
                0.0
            };
            y[(row * p.out_dim + col) as usize] = acc + bias;
        }
    }
}
