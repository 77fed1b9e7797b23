//! CPU twin of `shaders/flash.wgsl`: online-softmax attention, one query row at a time,
//! keys in tiles of `bc` within the workgroup's key range (lengths and window), exp2 with Q
//! pre-scaled by scale·log2 e, one rescale per tile, removed keys skipped.

use crate::cpu::mask::{
    diagonal, key_range, mask_any, mask_bit, mask_row_base, shape_logit, window_hi, window_lo,
    MaskData, MASKED, REMOVED_BELOW,
};
use crate::params::{flags, AttnParams};

use std::f32::consts::{LN_2, LOG2_E};

/// Writes split `split`'s normalized O into slice `split` of `o [n_splits, batch, M, q_heads, d_v]`
/// and its LSE into `lse [n_splits, batch, q_heads, M]` (with `flags::SPLIT_STATS`, its max
/// logit and ln(sum) into `lse [n_splits, 2, batch, q_heads, M]`), for every split of the
/// chunk; `br` rows share a workgroup's key range.
#[allow(clippy::too_many_arguments)]
pub fn flash(
    p: &AttnParams,
    (bc, br): (u32, u32),
    q: &[f32],
    k: &[f32],
    v: &[f32],
    masks: &MaskData,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let (dk, dv) = (p.d_k as usize, p.d_v as usize);
    let qs = p.scale * LOG2_E;
    let logit_flags = flags::BIAS | flags::SOFTCAP | flags::SEGMENTS;
    for lbh in 0..p.bh_count {
        let bh = p.bh_offset + lbh;
        let (b, h) = (bh / p.q_heads, bh % p.q_heads);
        let hk = h / (p.q_heads / p.kv_heads);
        let (ql, kl) = (masks.q_len(b), masks.kv_len(p, b));
        for split in 0..p.n_splits {
            let key_begin = split * p.split_len;
            let key_end = p.n.min(key_begin + p.split_len);
            for wgx in 0..p.rows.div_ceil(br) {
                // The workgroup's key range, as in the shader.
                let first = p.row_offset + wgx * br;
                let mut lo = key_begin;
                let mut hi = key_end.min(kl);
                if first >= ql {
                    hi = lo;
                } else {
                    let last = (p.row_offset + (wgx * br + br).min(p.rows)).min(ql) - 1;
                    lo = lo.max(window_lo(p, diagonal(p, first, ql, kl)));
                    hi = hi.min(window_hi(p, diagonal(p, last, ql, kl), kl));
                }
                lo = key_begin + (lo - key_begin) / bc * bc;
                for row in wgx * br..((wgx + 1) * br).min(p.rows) {
                    let grow = p.row_offset + row;
                    let rk = key_range(p, grow, ql, kl);
                    let mbase = mask_row_base(p, b, h, grow);
                    let qbase = (((b * p.m + grow) * p.q_heads + h) * p.d_k) as usize;
                    let qr: Vec<f32> = q[qbase..qbase + dk].iter().map(|&x| x * qs).collect();
                    let score = |j: u32| {
                        let kbase = (((b * p.n + j) * p.kv_heads + hk) * p.d_k) as usize;
                        qr.iter()
                            .zip(&k[kbase..kbase + dk])
                            .fold(0.0f32, |a, (&x, &y)| x.mul_add(y, a))
                    };
                    let mut acc = vec![0.0f32; dv];
                    let (mut m, mut l) = (MASKED, 0.0f32);
                    let mut t0 = lo;
                    while t0 < hi {
                        let len = bc.min(hi - t0);
                        let t1 = t0 + len;
                        let mut row_sees = rk.lo < t1 && rk.hi > t0;
                        if row_sees && p.flags & flags::MASK != 0 {
                            row_sees = mask_any(masks, mbase, t0.max(rk.lo), t1.min(rk.hi));
                        }
                        if row_sees {
                            let whole = p.flags & (flags::MASK | logit_flags) == 0
                                && rk.lo <= t0
                                && rk.hi >= t1;
                            let sc: Vec<f32> = (t0..t1)
                                .map(|j| {
                                    if whole {
                                        return score(j);
                                    }
                                    let kept = j >= rk.lo
                                        && j < rk.hi
                                        && (p.flags & flags::MASK == 0
                                            || mask_bit(masks, mbase, j));
                                    if !kept {
                                        return MASKED;
                                    }
                                    let s = score(j);
                                    if p.flags & logit_flags == 0 {
                                        return s;
                                    }
                                    // Shaped in natural units, as in the shader.
                                    let y = shape_logit(p, masks, s * LN_2, [b, h, grow, j]);
                                    if y > REMOVED_BELOW {
                                        y * LOG2_E
                                    } else {
                                        MASKED
                                    }
                                })
                                .collect();
                            let tmax = sc.iter().fold(m, |a, &s| a.max(s));
                            let alpha = (m - tmax).exp2();
                            l *= alpha;
                            acc.iter_mut().for_each(|a| *a *= alpha);
                            for (j, &s) in (t0..t1).zip(&sc) {
                                // Removed keys add 0 (branchless, as in the shader).
                                let pc = if s > REMOVED_BELOW {
                                    (s - tmax).exp2()
                                } else {
                                    0.0
                                };
                                l += pc;
                                let vbase = (((b * p.n + j) * p.kv_heads + hk) * p.d_v) as usize;
                                for (a, &x) in acc.iter_mut().zip(&v[vbase..vbase + dv]) {
                                    *a = pc.mul_add(x, *a);
                                }
                            }
                            m = tmax;
                        }
                        t0 += bc;
                    }
                    let (inv, row_max, log_sum) = if l > 0.0 {
                        (1.0 / l, m * LN_2, l.ln())
                    } else {
                        (0.0, f32::NEG_INFINITY, 0.0)
                    };
                    let obase =
                        ((((split * p.batch + b) * p.m + grow) * p.q_heads + h) * p.d_v) as usize;
                    for (d, a) in acc.iter().enumerate() {
                        o[obase + d] = a * inv;
                    }
                    let rows = p.batch * p.q_heads * p.m;
                    let at = bh * p.m + grow;
                    if p.flags & flags::SPLIT_STATS != 0 {
                        lse[(2 * split * rows + at) as usize] = row_max;
                        lse[((2 * split + 1) * rows + at) as usize] = log_sum;
                    } else {
                        lse[(split * rows + at) as usize] = row_max + log_sum;
                    }
                }
            }
        }
    }
}
