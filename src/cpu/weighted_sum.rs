//! CPU twin of `shaders/weighted_sum.wgsl`: O = P·V for one chunk and key range, in f32.

use crate::cpu::widen;
use crate::dtype::Storage;
use crate::params::AttnParams;

/// Runs the twin on the kernel's bindings 1.. as words: weights, v → o.
pub fn run(p: &AttnParams, (storage, masked): (Storage, bool), buffers: &mut [Vec<u32>]) {
    let [scores, v, o] = buffers else {
        crate::cpu::arity("weighted_sum", buffers.len())
    };
    let v = widen(storage, v);
    weighted_sum(
        p,
        bytemuck::cast_slice(scores),
        &v,
        masked,
        bytemuck::cast_slice_mut(o),
    );
}

/// Reads weights `w [bh_count, rows, N]` over keys `key_begin..key_end` and writes the chunk's
/// rows of `o [batch, M, q_heads, d_v]` (the first key range) or adds to them (later ones).
/// Where `masked`, a weight of exactly 0 (a removed key) adds nothing, whatever V holds.
pub fn weighted_sum(p: &AttnParams, w: &[f32], v: &[f32], masked: bool, o: &mut [f32]) {
    for lbh in 0..p.bh_count {
        let bh = p.bh_offset + lbh;
        let (b, h) = (bh / p.q_heads, bh % p.q_heads);
        let hk = h / (p.q_heads / p.kv_heads);
        for row in 0..p.rows {
            for dim in 0..p.d_v {
                let mut acc = 0.0f32;
                for j in p.key_begin..p.key_end {
                    let pv = w[((lbh * p.rows + row) * p.n + j) as usize];
                    let vv = v[(((b * p.n + j) * p.kv_heads + hk) * p.d_v + dim) as usize];
                    if !(masked && pv == 0.0) {
                        acc = pv.mul_add(vv, acc);
                    }
                }
                let at = (((b * p.m + p.row_offset + row) * p.q_heads + h) * p.d_v + dim) as usize;
                o[at] = if p.key_begin > 0 { acc + o[at] } else { acc };
            }
        }
    }
}
