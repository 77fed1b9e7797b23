//! CPU twin of `shaders/merge_partials.wgsl`: exact merge of partial (O, LSE) by LSE.

use crate::cpu::softmax_rows::NEG_BIG;
use crate::params::AttnParams;

/// Slices with LSE below this saw no keys, as `EMPTY` in the shader.
const EMPTY: f32 = -1.0e29;

/// Merges `o_parts [n_splits, batch, M, q_heads, d_v]`, `lse_parts [n_splits, batch, q_heads, M]`
/// into `o [batch, M, q_heads, d_v]` and `lse [batch, q_heads, M]`.
pub fn merge_partials(
    p: &AttnParams,
    o_parts: &[f32],
    lse_parts: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
) {
    let rows = (p.batch * p.m * p.q_heads) as usize;
    let dv = p.d_v as usize;
    let lse_stride = (p.batch * p.q_heads * p.m) as usize;
    let splits = p.n_splits as usize;
    for idx in 0..rows {
        let h = idx % p.q_heads as usize;
        let i = (idx / p.q_heads as usize) % p.m as usize;
        let b = idx / (p.q_heads * p.m) as usize;
        let lrow = (b * p.q_heads as usize + h) * p.m as usize + i;
        let part = |s: usize| lse_parts[s * lse_stride + lrow];
        let mx = (0..splits).map(part).fold(NEG_BIG, f32::max);
        let total: f32 = (0..splits)
            .map(part)
            .filter(|&ls| ls > EMPTY)
            .map(|ls| (ls - mx).exp())
            .sum();
        let (inv, out_lse) = if total > 0.0 {
            (1.0 / total, mx + total.ln())
        } else {
            (0.0, f32::NEG_INFINITY)
        };
        for d in 0..dv {
            let mut acc = 0.0f32;
            for s in (0..splits).filter(|&s| part(s) > EMPTY) {
                acc += (part(s) - mx).exp() * inv * o_parts[s * rows * dv + idx * dv + d];
            }
            o[idx * dv + d] = acc;
        }
        lse[lrow] = out_lse;
    }
}
