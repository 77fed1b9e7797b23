//! CPU twin of `shaders/weighted_sum.wgsl`: O = P·V for one chunk, in f32.

use crate::params::AttnParams;

/// Reads weights `w [bh_count, rows, N]` and writes the chunk's rows of `o [batch, M, q_heads, d_v]`.
pub fn weighted_sum(p: &AttnParams, w: &[f32], v: &[f32], o: &mut [f32]) {
    for lbh in 0..p.bh_count {
        let bh = p.bh_offset + lbh;
        let (b, h) = (bh / p.q_heads, bh % p.q_heads);
        let hk = h / (p.q_heads / p.kv_heads);
        for row in 0..p.rows {
            for dim in 0..p.d_v {
                let mut acc = 0.0f32;
                for j in 0..p.n {
                    let pv = w[((lbh * p.rows + row) * p.n + j) as usize];
                    let vv = v[(((b * p.n + j) * p.kv_heads + hk) * p.d_v + dim) as usize];
                    acc = pv.mul_add(vv, acc);
                }
                o[(((b * p.m + p.row_offset + row) * p.q_heads + h) * p.d_v + dim) as usize] = acc;
            }
        }
    }
}
