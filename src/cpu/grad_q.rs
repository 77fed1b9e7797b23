//! CPU twin of `shaders/grad_q.wgsl`: dQ over one pass of keys, per row, P rebuilt from the
//! LSE (the shader's key tiles and window bounds skip only removed keys).

use crate::cpu::grad::{dot4, term};
use crate::cpu::mask::MaskData;
use crate::cpu::widen;
use crate::dtype::Storage;
use crate::params::{flags, AttnParams};

/// Runs the twin on the kernel's bindings 1.. as words: q, k, v, lens, mask, bias, lse, d_o,
/// delta → dq.
pub fn run(p: &AttnParams, storage: Storage, buffers: &mut [Vec<u32>]) {
    let [q, k, v, lens, mask, bias, lse, d_o, delta, dq] = buffers else {
        crate::cpu::arity("grad_q", buffers.len())
    };
    let masks = MaskData::from_words(lens, mask, bias);
    let (q, k, v) = (widen(storage, q), widen(storage, k), widen(storage, v));
    let (lse, d_o, delta): (&[f32], &[f32], &[f32]) = (
        bytemuck::cast_slice(lse),
        bytemuck::cast_slice(d_o),
        bytemuck::cast_slice(delta),
    );
    let dq: &mut [f32] = bytemuck::cast_slice_mut(dq);
    let (dk, dv) = (p.d_k as usize, p.d_v as usize);
    for bh in p.bh_offset..p.bh_offset + p.bh_count {
        let (b, h) = (bh / p.q_heads, bh % p.q_heads);
        let hk = h / (p.q_heads / p.kv_heads);
        for i in p.row_offset..p.row_offset + p.rows {
            let row = ((b * p.m + i) * p.q_heads + h) as usize;
            let (qr, dor) = (&q[row * dk..][..dk], &d_o[row * dv..][..dv]);
            let stats = (lse[(bh * p.m + i) as usize], delta[(bh * p.m + i) as usize]);
            let mut acc = vec![0.0f32; dk];
            for j in p.key_begin..p.key_end {
                let key = ((b * p.n + j) * p.kv_heads + hk) as usize;
                let (kr, vr) = (&k[key * dk..][..dk], &v[key * dv..][..dv]);
                let x = dot4(qr, kr) * p.scale;
                if let Some(t) = term(p, &masks, x, || dot4(dor, vr), stats, [b, h, i, j]) {
                    for (a, &kv) in acc.iter_mut().zip(kr) {
                        *a += t.g * kv;
                    }
                }
            }
            for (d, a) in acc.into_iter().enumerate() {
                let at = row * dk + d;
                dq[at] = if p.flags & flags::ACCUMULATE != 0 {
                    a + dq[at]
                } else {
                    a
                };
            }
        }
    }
}
