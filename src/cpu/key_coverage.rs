//! CPU twin of `shaders/key_coverage.wgsl`: each key's sum of P = exp(s − LSE) over one pass of
//! query rows, its K row pre-scaled, the logit a sum of 4-element dot products as in the shader.

use crate::cpu::mask::{masked_logit, MaskData, REMOVED_BELOW};
use crate::cpu::widen;
use crate::dtype::Storage;
use crate::params::{flags, AttnParams};

/// Runs the twin on the kernel's bindings 1.. as words: q, k, lens, mask, bias, lse →
/// coverage.
pub fn run(p: &AttnParams, storage: Storage, buffers: &mut [Vec<u32>]) {
    let [q, k, lens, mask, bias, lse, out] = buffers else {
        crate::cpu::arity("key_coverage", buffers.len())
    };
    let m = MaskData::from_words(lens, mask, bias);
    let (q, k) = (widen(storage, q), widen(storage, k));
    key_coverage(
        p,
        (&q, &k),
        &m,
        bytemuck::cast_slice(lse),
        bytemuck::cast_slice_mut(out),
    );
}

/// Adds (or with a first pass, writes) rows `row_offset .. row_offset + rows` into
/// `coverage [bh, N]` for the `bh_count` problems from `bh_offset`.
pub fn key_coverage(
    p: &AttnParams,
    (q, k): (&[f32], &[f32]),
    masks: &MaskData,
    lse: &[f32],
    coverage: &mut [f32],
) {
    let dk = p.d_k as usize;
    for bh in p.bh_offset..p.bh_offset + p.bh_count {
        let (b, h) = (bh / p.q_heads, bh % p.q_heads);
        let hk = h / (p.q_heads / p.kv_heads);
        for j in 0..p.n {
            let kbase = (((b * p.n + j) * p.kv_heads + hk) * p.d_k) as usize;
            let kr: Vec<f32> = k[kbase..kbase + dk].iter().map(|&x| x * p.scale).collect();
            let mut acc = 0.0f32;
            for i in p.row_offset..p.row_offset + p.rows {
                let row_lse = lse[(bh * p.m + i) as usize];
                let qbase = (((b * p.m + i) * p.q_heads + h) * p.d_k) as usize;
                let qr = &q[qbase..qbase + dk];
                let s = qr
                    .chunks(4)
                    .zip(kr.chunks(4))
                    .map(|(a, c)| a.iter().zip(c).map(|(x, y)| x * y).sum::<f32>())
                    .sum::<f32>();
                let s = masked_logit(p, masks, s, [b, h, i, j]);
                if s > REMOVED_BELOW && row_lse > REMOVED_BELOW {
                    acc += (s - row_lse).exp();
                }
            }
            let at = (bh * p.n + j) as usize;
            if p.flags & flags::ACCUMULATE != 0 {
                acc += coverage[at];
            }
            coverage[at] = acc;
        }
    }
}
