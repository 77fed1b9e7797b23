//! CPU twin of `shaders/graph_merge.wgsl`: the exact merge of each destination's chunks, one
//! output element at a time.

use crate::cpu::mask::{MASKED, MIN_WEIGHT, REMOVED_BELOW};
use crate::params::GraphParams;

/// Runs the twin on the kernel's bindings 1.. as words: o_parts, stats, chunk_ptr → o, lse.
pub fn run(p: &GraphParams, buffers: &mut [Vec<u32>]) {
    let [o_parts, stats, chunk_ptr, o, lse] = buffers else {
        crate::cpu::arity("graph_merge", buffers.len())
    };
    let o_parts: &[f32] = bytemuck::cast_slice(o_parts);
    let stats: &[f32] = bytemuck::cast_slice(stats);
    let o: &mut [f32] = bytemuck::cast_slice_mut(o);
    let lse: &mut [f32] = bytemuck::cast_slice_mut(lse);
    let (heads, dv) = (p.heads as usize, p.d_v as usize);
    for (at, out_at) in o.iter_mut().enumerate().take(p.m as usize * heads * dv) {
        let (r, d) = (at / dv, at % dv);
        let (h, dst) = (r % heads, r / heads);
        let chunks = chunk_ptr[dst] as usize..chunk_ptr[dst + 1] as usize;
        let mx = chunks
            .clone()
            .map(|c| stats[2 * (c * heads + h)])
            .fold(MASKED, f32::max);
        let (mut total, mut acc) = (0.0f32, 0.0f32);
        for c in chunks {
            let (max, log_sum) = (stats[2 * (c * heads + h)], stats[2 * (c * heads + h) + 1]);
            if max > REMOVED_BELOW {
                let w = ((max - mx) + log_sum).exp().max(MIN_WEIGHT);
                total += w;
                acc += w * o_parts[(c * heads + h) * dv + d];
            }
        }
        let (out, out_lse) = if total > 0.0 {
            (acc / total, mx + total.ln())
        } else {
            (0.0, f32::NEG_INFINITY)
        };
        *out_at = out;
        if d == 0 {
            lse[h * p.m as usize + dst] = out_lse;
        }
    }
}
