//! CPU twin of `shaders/softmax_rows.wgsl`: row softmax of the scratch in place, plus LSE.

use crate::params::AttnParams;

/// Finite running-max start, as `NEG_BIG` in the shaders.
pub const NEG_BIG: f32 = -1.0e30;

/// Turns `s [bh_count, rows, N]` into weights and writes `lse [batch, q_heads, M]`.
pub fn softmax_rows(p: &AttnParams, s: &mut [f32], lse: &mut [f32]) {
    let n = p.n as usize;
    for lbh in 0..p.bh_count {
        for row in 0..p.rows {
            let base = ((lbh * p.rows + row) * p.n) as usize;
            let r = &mut s[base..base + n];
            let mx = r.iter().fold(NEG_BIG, |a, &x| a.max(x));
            let sum: f32 = r.iter().map(|&x| (x - mx).exp()).sum();
            let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            for x in r.iter_mut() {
                *x = (*x - mx).exp() * inv;
            }
            lse[((p.bh_offset + lbh) * p.m + p.row_offset + row) as usize] = mx + sum.ln();
        }
    }
}
