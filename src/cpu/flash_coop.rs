//! CPU twin of `shaders/flash_coop.wgsl`: online-softmax attention as the matrix units run it.
//! A workgroup owns `tile` query rows and walks its key range in tiles of `bc` keys; the
//! matrix inputs (Q, K, V, and the weights P) are rounded to f16 where `half_inputs`, products
//! accumulate in f32, S is scaled by scale·log2 e after the product, each row's sum adds the
//! rounded weights (each tile's on its own), and O is rescaled once per tile before P·V is
//! added. V's values that are not finite enter the product as 0 and are added to each row's O
//! afterwards over the keys the row keeps; the block's O and sum fold into the row's every
//! [`fold_tiles`] tiles and after the last (shaders/common/sums.wgsl).

use half::f16;

use crate::cpu::flash::{fold_tiles, weight, write_row};
use crate::cpu::mask::{
    key_range, mask_bit, mask_row_base, shape_logit, workgroup_keys, MaskData, MASKED, MIN_WEIGHT,
    REMOVED_BELOW,
};
use crate::params::{flags, AttnParams};

use crate::cpu::widen;
use crate::dtype::Storage;
use std::f32::consts::{LN_2, LOG2_E};

/// Runs the twin on the kernel's bindings 1.. as words: q, k, v, lens, mask, bias → o, lse.
pub fn run(
    p: &AttnParams,
    (shape, storage): ((u32, u32, bool), Storage),
    buffers: &mut [Vec<u32>],
) {
    let [q, k, v, lens, mask, bias, o, lse] = buffers else {
        crate::cpu::arity("flash_coop", buffers.len())
    };
    let m = MaskData::from_words(lens, mask, bias);
    let (q, k, v) = (widen(storage, q), widen(storage, k), widen(storage, v));
    let out = (bytemuck::cast_slice_mut(o), bytemuck::cast_slice_mut(lse));
    flash_coop(p, shape, (&q, &k, &v), &m, out);
}

/// Writes split `split`'s normalized O and its LSE (or, with `flags::SPLIT_STATS`, its max
/// logit and ln(sum)) for every split of the chunk, as `cpu::flash::flash` does, with the
/// arithmetic of the matrix-unit kernel: tiles of `bc` keys, workgroups of `tile` rows,
/// matrix inputs in f16 where `half_inputs`.
pub fn flash_coop(
    p: &AttnParams,
    (bc, tile, half_inputs): (u32, u32, bool),
    (q, k, v): (&[f32], &[f32], &[f32]),
    masks: &MaskData,
    (o, lse): (&mut [f32], &mut [f32]),
) {
    // The matrix input type CE.
    let input = |x: f32| {
        if half_inputs {
            f16::from_f32(x).to_f32()
        } else {
            x
        }
    };
    let (dk, dv) = (p.d_k as usize, p.d_v as usize);
    let qs = p.scale * LOG2_E;
    let logit_flags = flags::BIAS | flags::SOFTCAP | flags::SEGMENTS;
    let br = tile;
    for lbh in 0..p.bh_count {
        let bh = p.bh_offset + lbh;
        let (b, h) = (bh / p.q_heads, bh % p.q_heads);
        let hk = h / (p.q_heads / p.kv_heads);
        let (ql, kl) = (masks.q_len(b), masks.kv_len(p, b));
        let k_row = |j: u32| (((b * p.n + j) * p.kv_heads + hk) * p.d_k) as usize;
        let v_row = |j: u32| (((b * p.n + j) * p.kv_heads + hk) * p.d_v) as usize;
        for split in 0..p.n_splits {
            let key_begin = split * p.split_len;
            let key_end = p.n.min(key_begin + p.split_len);
            for wgx in 0..p.rows.div_ceil(br) {
                let (lo, hi) = workgroup_keys(p, (ql, kl), (wgx, br), (key_begin, key_end), bc);
                for row in (wgx * br..(wgx + 1) * br).filter(|&row| row < p.rows) {
                    let grow = p.row_offset + row;
                    let rk = key_range(p, grow, ql, kl);
                    let mbase = mask_row_base(p, b, h, grow);
                    let qbase = (((b * p.m + grow) * p.q_heads + h) * p.d_k) as usize;
                    let qr: Vec<f32> = q[qbase..qbase + dk].iter().map(|&x| input(x)).collect();
                    // The row's logit of key j from its plain logit s (log2 units).
                    let logit = |s: f32, j: u32| {
                        if j < rk.lo
                            || j >= rk.hi
                            || (p.flags & flags::MASK != 0 && !mask_bit(masks, mbase, j))
                        {
                            return MASKED;
                        }
                        if p.flags & logit_flags == 0 {
                            return s;
                        }
                        let y = shape_logit(p, masks, s * LN_2, [b, h, grow, j]);
                        if y > REMOVED_BELOW {
                            y * LOG2_E
                        } else {
                            MASKED
                        }
                    };
                    // The block's max, sum and O; the row's folded ones.
                    let (mut m, mut l) = (MASKED, 0.0f32);
                    let mut acc = vec![0.0f32; dv];
                    let (mut m_sum, mut l_sum) = (MASKED, 0.0f32);
                    let mut o_sum = vec![0.0f32; dv];
                    // Blocks of fold_tiles tiles, each folded after its last tile.
                    let block_keys = bc * fold_tiles(hi.saturating_sub(lo), bc);
                    for b0 in (lo..hi).step_by(block_keys as usize) {
                        for t0 in (b0..hi.min(b0 + block_keys)).step_by(bc as usize) {
                            let len = bc.min(hi - t0);
                            let logits: Vec<f32> = (t0..t0 + len)
                                .map(|j| {
                                    let kr = &k[k_row(j)..k_row(j) + dk];
                                    let s = qr
                                        .iter()
                                        .zip(kr)
                                        .fold(0.0f32, |a, (&x, &y)| x.mul_add(input(y), a));
                                    logit(s * qs, j)
                                })
                                .collect();
                            let tmax = logits.iter().fold(m, |a, &x| a.max(x));
                            let alpha = (m - tmax).exp2().max(MIN_WEIGHT);
                            l *= alpha;
                            acc.iter_mut().for_each(|a| *a *= alpha);
                            let mut l_tile = 0.0f32;
                            for (j, &x) in (t0..).zip(&logits) {
                                let w = input(weight(x, tmax));
                                l_tile += w;
                                let vr = &v[v_row(j)..v_row(j) + dv];
                                for (a, &y) in acc.iter_mut().zip(vr) {
                                    let y = if y.is_finite() { y } else { 0.0 };
                                    *a = w.mul_add(input(y), *a);
                                }
                            }
                            l += l_tile;
                            m = tmax;
                            // The values that are not finite, over the keys the row keeps.
                            for (d, a) in acc.iter_mut().enumerate() {
                                let x = (t0..)
                                    .zip(&logits)
                                    .filter(|&(_, &s)| s > REMOVED_BELOW)
                                    .map(|(j, _)| v[v_row(j) + d])
                                    .filter(|y| !y.is_finite())
                                    .fold(0.0f32, |x, y| x + y);
                                *a += x;
                            }
                        }
                        let w = (m_sum - m).exp2().max(MIN_WEIGHT);
                        l_sum = w.mul_add(l_sum, l);
                        l = 0.0;
                        m_sum = m;
                        for (o, a) in o_sum.iter_mut().zip(&mut acc) {
                            *o = w.mul_add(*o, *a);
                            *a = 0.0;
                        }
                    }
                    let out = (&mut *o, &mut *lse);
                    write_row(p, out, ([split, b, h, grow], false), &o_sum, (m_sum, l_sum));
                }
            }
        }
    }
}
