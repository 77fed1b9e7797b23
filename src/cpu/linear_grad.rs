//! CPU twin of `shaders/linear_grad.wgsl`: one product of `linear`'s backward for a chunk of
//! output rows and a range of reduction terms, in f32. The tiles change where operands live,
//! not the order of each sum: one f32 chain over k, continued by later ranges.

use crate::dtype::Storage;
use crate::params::{linear_grad::WEIGHT, LinearGradParams};

/// Runs the twin on the kernel's bindings 1.. as words: dy, src (W or X) → grad, db.
pub fn run(p: &LinearGradParams, src: Storage, buffers: &mut [Vec<u32>]) {
    let [dy, b, grad, db] = buffers else {
        crate::cpu::arity("linear_grad", buffers.len())
    };
    let b = crate::cpu::widen(src, b);
    linear_grad(
        p,
        bytemuck::cast_slice(dy),
        &b,
        bytemuck::cast_slice_mut(grad),
        bytemuck::cast_slice_mut(db),
    );
}

/// `G[m, c] (+)= Σ_{k_begin ≤ k < k_end} A[m, k]·B[k, c]` for rows `m_offset .. m_offset + m`
/// (see [`LinearGradParams`]): A = dY (input product) or dYᵀ (weight product), B `[K, in_dim]`;
/// the weight product with a bias also sums column `in_dim` of B as ones into `db`.
pub fn linear_grad(p: &LinearGradParams, dy: &[f32], b: &[f32], grad: &mut [f32], db: &mut [f32]) {
    let weight = p.product == WEIGHT;
    let ones = weight && p.has_bias != 0;
    let (in_dim, out_dim) = (p.in_dim as usize, p.out_dim as usize);
    for m in p.m_offset as usize..(p.m_offset + p.m) as usize {
        for c in 0..in_dim + usize::from(ones) {
            let out = if c < in_dim {
                &mut grad[m * in_dim + c]
            } else {
                &mut db[m]
            };
            let mut acc = if p.k_begin > 0 { *out } else { 0.0f32 };
            for k in p.k_begin as usize..p.k_end as usize {
                let a = if weight {
                    dy[k * out_dim + m]
                } else {
                    dy[m * out_dim + k]
                };
                let bv = if c < in_dim { b[k * in_dim + c] } else { 1.0 };
                acc = a.mul_add(bv, acc);
            }
            *out = acc;
        }
    }
}
