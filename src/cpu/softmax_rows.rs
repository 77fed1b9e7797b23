//! CPU twin of `shaders/softmax_rows.wgsl`: row softmax of the scratch in place, plus LSE;
//! scores ≤ `REMOVED_BELOW` are removed keys.

use crate::cpu::mask::{MASKED, MIN_WEIGHT, REMOVED_BELOW};
use crate::params::AttnParams;

/// Runs the twin on the kernel's bindings 1.. as words: scores (in place), lse.
pub fn run(p: &AttnParams, buffers: &mut [Vec<u32>]) {
    let [scores, lse] = buffers else {
        crate::cpu::arity("softmax_rows", buffers.len())
    };
    softmax_rows(
        p,
        bytemuck::cast_slice_mut(scores),
        bytemuck::cast_slice_mut(lse),
    );
}

/// Turns `s [bh_count, rows, N]` into weights and writes `lse [batch, q_heads, M]`.
pub fn softmax_rows(p: &AttnParams, s: &mut [f32], lse: &mut [f32]) {
    let n = p.n as usize;
    for lbh in 0..p.bh_count {
        for row in 0..p.rows {
            let base = ((lbh * p.rows + row) * p.n) as usize;
            let r = &mut s[base..base + n];
            let mx = r.iter().fold(MASKED, |a, &x| a.max(x));
            let kept_exp = |x: f32| {
                if x > REMOVED_BELOW {
                    (x - mx).exp()
                } else {
                    0.0
                }
            };
            let sum: f32 = r.iter().map(|&x| kept_exp(x)).sum();
            let (inv, row_lse) = if sum > 0.0 {
                (1.0 / sum, mx + sum.ln())
            } else {
                (0.0, f32::NEG_INFINITY)
            };
            for x in r.iter_mut() {
                *x = if *x > REMOVED_BELOW {
                    (kept_exp(*x) * inv).max(MIN_WEIGHT)
                } else {
                    0.0
                };
            }
            lse[((p.bh_offset + lbh) * p.m + p.row_offset + row) as usize] = row_lse;
        }
    }
}
