//! CPU twin of `shaders/qk_scores.wgsl`: S = scale·Q·Kᵀ for one chunk, in f32, with masks.
//! The shader's tiles change where operands live, not the order of the sum over d, so the
//! twin is the per-element loop with the shader's index math.

use crate::cpu::mask::{masked_logit, MaskData};
use crate::cpu::widen;
use crate::dtype::Storage;
use crate::params::AttnParams;

/// Runs the twin on the kernel's bindings 1.. as words: q, k, lens, mask, bias → scores.
pub fn run(p: &AttnParams, storage: Storage, buffers: &mut [Vec<u32>]) {
    let [q, k, lens, mask, bias, scores] = buffers else {
        crate::cpu::arity("qk_scores", buffers.len())
    };
    let m = MaskData::from_words(lens, mask, bias);
    let (q, k) = (widen(storage, q), widen(storage, k));
    qk_scores(p, &q, &k, &m, bytemuck::cast_slice_mut(scores));
}

/// Writes the chunk's scores `s [bh_count, rows, N]` (removed keys: `MASKED`).
pub fn qk_scores(p: &AttnParams, q: &[f32], k: &[f32], masks: &MaskData, s: &mut [f32]) {
    for lbh in 0..p.bh_count {
        let bh = p.bh_offset + lbh;
        let (b, h) = (bh / p.q_heads, bh % p.q_heads);
        let hk = h / (p.q_heads / p.kv_heads);
        for row in 0..p.rows {
            for key in 0..p.n {
                let mut acc = 0.0f32;
                for d in 0..p.d_k {
                    let qv =
                        q[(((b * p.m + p.row_offset + row) * p.q_heads + h) * p.d_k + d) as usize];
                    let kv = k[(((b * p.n + key) * p.kv_heads + hk) * p.d_k + d) as usize];
                    acc = qv.mul_add(kv, acc);
                }
                s[((lbh * p.rows + row) * p.n + key) as usize] =
                    masked_logit(p, masks, acc * p.scale, [b, h, p.row_offset + row, key]);
            }
        }
    }
}
