//! CPU twin of `shaders/softmax_rows.wgsl`: row softmax of the scratch in place, plus LSE;
//! scores ≤ `REMOVED_BELOW` are removed keys; with `dropout`, the weights written are dropped
//! out after the LSE is taken.

use crate::cpu::mask::{MASKED, MIN_WEIGHT, REMOVED_BELOW};
use crate::dropout::keeps;
use crate::params::AttnParams;

/// Runs the twin on the kernel's bindings 1.. as words: scores (in place), lse.
pub fn run(p: &AttnParams, dropout: bool, buffers: &mut [Vec<u32>]) {
    let [scores, lse] = buffers else {
        crate::cpu::arity("softmax_rows", buffers.len())
    };
    softmax_rows(
        p,
        dropout,
        bytemuck::cast_slice_mut(scores),
        bytemuck::cast_slice_mut(lse),
    );
}

/// Turns `s [bh_count, rows, N]` into weights (dropped out where `dropout`: kept ones times
/// `keep_scale`, dropped ones 0) and writes `lse [batch, q_heads, M]` (before dropout).
pub fn softmax_rows(p: &AttnParams, dropout: bool, s: &mut [f32], lse: &mut [f32]) {
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
            let (bh, grow) = (p.bh_offset + lbh, p.row_offset + row);
            for (j, x) in r.iter_mut().enumerate() {
                let mut w = if *x > REMOVED_BELOW {
                    (kept_exp(*x) * inv).max(MIN_WEIGHT)
                } else {
                    0.0
                };
                if dropout {
                    w = if keeps(p, bh, grow, j as u32) {
                        w * p.keep_scale
                    } else {
                        0.0
                    };
                }
                *x = w;
            }
            lse[(bh * p.m + grow) as usize] = row_lse;
        }
    }
}
