//! CPU twin of `shaders/flash.wgsl`: online-softmax attention, one query row at a time,
//! keys in tiles of `bc`, exp2 with Q pre-scaled by scale·log2 e, one rescale per tile.

use crate::cpu::softmax_rows::NEG_BIG;
use crate::params::AttnParams;

/// Writes split `split`'s normalized O into slice `split` of `o [n_splits, batch, M, q_heads, d_v]`
/// and its LSE into `lse [n_splits, batch, q_heads, M]`, for every split of the chunk.
pub fn flash(
    p: &AttnParams,
    bc: u32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
) {
    let (dk, dv) = (p.d_k as usize, p.d_v as usize);
    let qs = p.scale * std::f32::consts::LOG2_E;
    for lbh in 0..p.bh_count {
        let bh = p.bh_offset + lbh;
        let (b, h) = (bh / p.q_heads, bh % p.q_heads);
        let hk = h / (p.q_heads / p.kv_heads);
        for split in 0..p.n_splits {
            let key_begin = split * p.split_len;
            let key_end = p.n.min(key_begin + p.split_len);
            for row in 0..p.rows {
                let grow = p.row_offset + row;
                let qbase = (((b * p.m + grow) * p.q_heads + h) * p.d_k) as usize;
                let qr: Vec<f32> = q[qbase..qbase + dk].iter().map(|&x| x * qs).collect();
                let mut acc = vec![0.0f32; dv];
                let (mut m, mut l) = (NEG_BIG, 0.0f32);
                let mut t0 = key_begin;
                while t0 < key_end {
                    let len = bc.min(key_end - t0);
                    let mut sc = vec![0.0f32; len as usize];
                    let mut tmax = m;
                    for c in 0..len {
                        let kbase = (((b * p.n + t0 + c) * p.kv_heads + hk) * p.d_k) as usize;
                        let dot = qr
                            .iter()
                            .zip(&k[kbase..kbase + dk])
                            .fold(0.0f32, |a, (&x, &y)| x.mul_add(y, a));
                        sc[c as usize] = dot;
                        tmax = tmax.max(dot);
                    }
                    let alpha = (m - tmax).exp2();
                    l *= alpha;
                    acc.iter_mut().for_each(|a| *a *= alpha);
                    for c in 0..len {
                        let pc = (sc[c as usize] - tmax).exp2();
                        l += pc;
                        let vbase = (((b * p.n + t0 + c) * p.kv_heads + hk) * p.d_v) as usize;
                        for (a, &x) in acc.iter_mut().zip(&v[vbase..vbase + dv]) {
                            *a = pc.mul_add(x, *a);
                        }
                    }
                    m = tmax;
                    t0 += bc;
                }
                let (inv, row_lse) = if l > 0.0 {
                    (1.0 / l, (m + l.log2()) * std::f32::consts::LN_2)
                } else {
                    (0.0, f32::NEG_INFINITY)
                };
                let obase =
                    ((((split * p.batch + b) * p.m + grow) * p.q_heads + h) * p.d_v) as usize;
                for (d, a) in acc.iter().enumerate() {
                    o[obase + d] = a * inv;
                }
                lse[((split * p.batch * p.q_heads + bh) * p.m + grow) as usize] = row_lse;
            }
        }
    }
}
