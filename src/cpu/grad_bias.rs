//! CPU twin of `shaders/grad_bias.wgsl`: each bias element's sum of dS over the (batch, head,
//! row) triples `[key_begin, key_end)` it is broadcast to.

use crate::cpu::grad::{dot4, term};
use crate::cpu::mask::MaskData;
use crate::cpu::widen;
use crate::dtype::Storage;
use crate::params::{flags, AttnParams};

/// Runs the twin on the kernel's bindings 1.. as words: q, k, v, lens, mask, bias, lse, d_o,
/// delta → dbias.
pub fn run(p: &AttnParams, storage: Storage, buffers: &mut [Vec<u32>]) {
    let [q, k, v, lens, mask, bias, lse, d_o, delta, dbias] = buffers else {
        crate::cpu::arity("grad_bias", buffers.len())
    };
    let masks = MaskData::from_words(lens, mask, bias);
    let (q, k, v) = (widen(storage, q), widen(storage, k), widen(storage, v));
    let (lse, d_o, delta): (&[f32], &[f32], &[f32]) = (
        bytemuck::cast_slice(lse),
        bytemuck::cast_slice(d_o),
        bytemuck::cast_slice(delta),
    );
    let dbias: &mut [f32] = bytemuck::cast_slice_mut(dbias);
    let (dk, dv) = (p.d_k as usize, p.d_v as usize);
    let full = |stride: u32, n: u32| if stride != 0 { n } else { 1 };
    let (bb, bhd, bm) = (
        full(p.bias_b, p.batch),
        full(p.bias_h, p.q_heads),
        full(p.bias_row, p.m),
    );
    let (sh, sm) = (p.q_heads / bhd, p.m / bm);
    let group = p.q_heads / p.kv_heads;
    for e in 0..bb * bhd * bm * p.n {
        let j = e % p.n;
        let (ei, eh, eb) = ((e / p.n) % bm, (e / (p.n * bm)) % bhd, e / (p.n * bm * bhd));
        let mut acc = 0.0f32;
        for t in p.key_begin..p.key_end {
            let b = if bb > 1 { eb } else { t / (sh * sm) };
            let h = if bhd > 1 { eh } else { (t / sm) % sh };
            let i = if bm > 1 { ei } else { t % sm };
            let bh = b * p.q_heads + h;
            let (row, key) = (
                ((b * p.m + i) * p.q_heads + h) as usize,
                ((b * p.n + j) * p.kv_heads + h / group) as usize,
            );
            let x = dot4(&q[row * dk..][..dk], &k[key * dk..][..dk]) * p.scale;
            let dp = || {
                d_o[row * dv..][..dv]
                    .iter()
                    .zip(&v[key * dv..][..dv])
                    .fold(0.0f32, |a, (g, x)| g.mul_add(*x, a))
            };
            let stats = (lse[(bh * p.m + i) as usize], delta[(bh * p.m + i) as usize]);
            if let Some(t) = term(p, &masks, x, dp, stats, [b, h, i, j]) {
                acc += t.ds;
            }
        }
        let e = e as usize;
        dbias[e] = if p.flags & flags::ACCUMULATE != 0 {
            acc + dbias[e]
        } else {
            acc
        };
    }
}
