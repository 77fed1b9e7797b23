//! CPU twin of `shaders/grad_kv.wgsl`: dK and dV over one pass of rows, per key, summed over
//! the query heads of its K/V head (the shader's row tiles and window bounds skip only
//! removed pairs).

use crate::cpu::grad::{dot4, term};
use crate::cpu::mask::MaskData;
use crate::cpu::widen;
use crate::dtype::Storage;
use crate::params::{flags, AttnParams};

/// Runs the twin on the kernel's bindings 1.. as words: q, k, v, lens, mask, bias, lse, d_o,
/// delta → dk, dv. `bh_offset`/`bh_count` count (batch, kv head) pairs, `key_begin ..
/// key_end` the pass's heads within the group.
pub fn run(p: &AttnParams, storage: Storage, buffers: &mut [Vec<u32>]) {
    let [q, k, v, lens, mask, bias, lse, d_o, delta, dk_out, dv_out] = buffers else {
        crate::cpu::arity("grad_kv", buffers.len())
    };
    let masks = MaskData::from_words(lens, mask, bias);
    let (q, k, v) = (widen(storage, q), widen(storage, k), widen(storage, v));
    let (lse, d_o, delta): (&[f32], &[f32], &[f32]) = (
        bytemuck::cast_slice(lse),
        bytemuck::cast_slice(d_o),
        bytemuck::cast_slice(delta),
    );
    let dk_out: &mut [f32] = bytemuck::cast_slice_mut(dk_out);
    let dv_out: &mut [f32] = bytemuck::cast_slice_mut(dv_out);
    let (dk, dv) = (p.d_k as usize, p.d_v as usize);
    let group = p.q_heads / p.kv_heads;
    let accumulate = p.flags & flags::ACCUMULATE != 0;
    for bk in p.bh_offset..p.bh_offset + p.bh_count {
        let (b, hk) = (bk / p.kv_heads, bk % p.kv_heads);
        for j in 0..p.n {
            let key = ((b * p.n + j) * p.kv_heads + hk) as usize;
            let (kr, vr) = (&k[key * dk..][..dk], &v[key * dv..][..dv]);
            let (mut dk_acc, mut dv_acc) = (vec![0.0f32; dk], vec![0.0f32; dv]);
            for h in hk * group + p.key_begin..hk * group + p.key_end {
                let bh = b * p.q_heads + h;
                for i in p.row_offset..p.row_offset + p.rows {
                    let row = ((b * p.m + i) * p.q_heads + h) as usize;
                    let (qr, dor) = (&q[row * dk..][..dk], &d_o[row * dv..][..dv]);
                    let stats = (lse[(bh * p.m + i) as usize], delta[(bh * p.m + i) as usize]);
                    let x = dot4(qr, kr) * p.scale;
                    let Some(t) = term(p, &masks, x, || dot4(dor, vr), stats, [b, h, i, j]) else {
                        continue;
                    };
                    for (a, &g) in dv_acc.iter_mut().zip(dor) {
                        *a += t.p_v * g;
                    }
                    for (a, &qv) in dk_acc.iter_mut().zip(qr) {
                        *a += t.g * qv;
                    }
                }
            }
            for (out, acc, width) in [(&mut *dk_out, dk_acc, dk), (&mut *dv_out, dv_acc, dv)] {
                for (d, a) in acc.into_iter().enumerate() {
                    let at = key * width + d;
                    out[at] = if accumulate { a + out[at] } else { a };
                }
            }
        }
    }
}
