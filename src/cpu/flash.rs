//! CPU twin of `shaders/flash.wgsl`: online-softmax attention, `r` query rows at a time (one
//! invocation's block), keys in tiles of `bc` within the workgroup's key range (lengths and
//! window), exp2 with Q pre-scaled by scale·log2 e, one rescale per tile, tiles that none of
//! the block's rows may see skipped, removed keys adding nothing (also where V is ±∞), kept
//! keys weighing at least [`MIN_WEIGHT`]. The sums in the levels of shaders/common/sums.wgsl:
//! each tile's l and t summed on their own, the block's (l, t, O) folded into the row's every
//! [`fold_tiles`] tiles and after the last. With `lanes` > 1, each lane of the block takes the
//! pairs of keys lane, lane + lanes, … of every tile with its own state, and the lanes are
//! merged at the end (the shader's subgroup reductions). With dropout, O takes the weights
//! after dropout (the dropped ones adding nothing) and is scaled by `keep_scale` at the end;
//! the sums, the LSE and the row statistics are those before dropout.

use crate::cpu::mask::{
    key_range, mask_any, mask_bit, mask_row_base, shape_logit, workgroup_keys, MaskData, MASKED,
    MIN_WEIGHT, REMOVED_BELOW,
};
use crate::dropout::keeps;
use crate::params::{flags, AttnParams};

use crate::cpu::widen;
use crate::dtype::Storage;
use std::f32::consts::{LN_2, LOG2_E};

/// One row of an invocation's block: its key range, mask base, query index and state.
#[derive(Clone)]
struct Row {
    live: bool,
    grow: u32,
    lo: u32,
    hi: u32,
    mbase: u32,
    qr: Vec<f32>,
    /// The block's O, max and sums (relative to `m`).
    acc: Vec<f32>,
    m: f32,
    l: f32,
    /// Σ p·(m − s), log2 units (the row statistics).
    t: f32,
    /// The row's folded O, max and sums (relative to `m_sum`).
    o_sum: Vec<f32>,
    m_sum: f32,
    l_sum: f32,
    t_sum: f32,
}

impl Row {
    /// Takes a tile's `keys` (the lane's: each key and this row's logit) as the shader's
    /// rescale and accumulate loop does: the block rebased to the new max, the tile's l and t
    /// summed on their own, O by each key in turn (the shader takes them two at a time, key c
    /// then key c + 1); keys of weight 0 (removed) leave O alone, as the shader's zero V rows
    /// past a tile and its kept variant. `kept(grow, j)` is false for a weight dropped out
    /// (always true without dropout): it adds to l and t, not to O.
    fn add_tile<'a>(
        &mut self,
        keys: &[(u32, f32)],
        v_row: impl Fn(u32) -> &'a [f32],
        kept: impl Fn(u32, u32) -> bool,
    ) {
        let tmax = keys.iter().fold(self.m, |a, &(_, s)| a.max(s));
        let alpha = (self.m - tmax).exp2().max(MIN_WEIGHT);
        let rebase = if self.l > 0.0 {
            (tmax - self.m) * self.l
        } else {
            0.0
        };
        self.t = alpha * (self.t + rebase);
        self.l *= alpha;
        self.acc.iter_mut().for_each(|a| *a *= alpha);
        let (mut l_tile, mut t_tile) = (0.0f32, 0.0f32);
        for &(j, s) in keys {
            let p = weight(s, tmax);
            l_tile += p;
            t_tile += p * (tmax - s);
            let p = if kept(self.grow, j) { p } else { 0.0 };
            if p == 0.0 {
                continue;
            }
            for (a, &x) in self.acc.iter_mut().zip(v_row(j)) {
                *a = p.mul_add(x, *a);
            }
        }
        self.l += l_tile;
        self.t += t_tile;
        self.m = tmax;
    }

    /// Folds the block's sums into the row's, rebased from `m_sum` to `m`, and clears them.
    fn fold(&mut self) {
        let w = (self.m_sum - self.m).exp2().max(MIN_WEIGHT);
        let rebase = if self.l_sum > 0.0 {
            (self.m - self.m_sum) * self.l_sum
        } else {
            0.0
        };
        self.t_sum = w.mul_add(self.t_sum + rebase, self.t);
        self.t = 0.0;
        self.l_sum = w.mul_add(self.l_sum, self.l);
        self.l = 0.0;
        for (o, a) in self.o_sum.iter_mut().zip(&mut self.acc) {
            *o = w.mul_add(*o, *a);
            *a = 0.0;
        }
        self.m_sum = self.m;
    }
}

/// The tiles per block of a key loop over `keys` keys in tiles of `bc` (a power of two), as
/// `fold_tiles` in shaders/common/sums.wgsl: 2^⌊(2·⌊log2 T⌋ − log2 bc + 1) / 3⌋ for T tiles,
/// at least 4.
pub fn fold_tiles(keys: u32, bc: u32) -> u32 {
    let tiles = keys.div_ceil(bc).max(1);
    let log2 = |x: u32| 31 - x.leading_zeros() as i32;
    1 << ((2 * log2(tiles) - log2(bc) + 1).max(6) / 3)
}

/// The weight of logit `s` against the max `tmax`: 0 for a removed key, at least
/// [`MIN_WEIGHT`] else.
pub fn weight(s: f32, tmax: f32) -> f32 {
    if s > REMOVED_BELOW {
        (s - tmax).exp2().max(MIN_WEIGHT)
    } else {
        0.0
    }
}

/// Runs the twin on the kernel's bindings 1.. as words: q, k, v, lens, mask, bias → o, lse
/// (and row_stats where the kernel writes them); with `dropout`, O after dropout.
pub fn run(
    p: &AttnParams,
    (tiles, storage, dropout): ((u32, u32, u32, u32), Storage, bool),
    buffers: &mut [Vec<u32>],
) {
    let count = buffers.len();
    let (inputs, outputs) = buffers.split_at_mut(6.min(count));
    let [q, k, v, lens, mask, bias] = inputs else {
        crate::cpu::arity("flash", count)
    };
    let (o, lse, row_stats) = match outputs {
        [o, lse] => (o, lse, None),
        [o, lse, row_stats] => (o, lse, Some(bytemuck::cast_slice_mut(row_stats))),
        _ => crate::cpu::arity("flash", count),
    };
    let m = MaskData::from_words(lens, mask, bias);
    let (q, k, v) = (widen(storage, q), widen(storage, k), widen(storage, v));
    let out = (
        bytemuck::cast_slice_mut(o),
        bytemuck::cast_slice_mut(lse),
        row_stats,
    );
    flash(p, (tiles, dropout), (&q, &k, &v), &m, out);
}

/// Writes split `split`'s normalized O into slice `split` of `o [n_splits, batch, M, q_heads, d_v]`
/// and its LSE into `lse [n_splits, batch, q_heads, M]` (with `flags::SPLIT_STATS`, its max
/// logit and ln(sum) into `lse [n_splits, 2, batch, q_heads, M]`), for every split of the
/// chunk; `br` rows share a workgroup's key range, `r` rows an invocation's tiles. With
/// `row_stats`, each row's entropy and focus over the split's keys into `row_stats [n_splits,
/// 2, rows]`. With `dropout`, O takes the weights after dropout ([`crate::dropout`]).
pub fn flash(
    p: &AttnParams,
    ((bc, br, r, lanes), dropout): ((u32, u32, u32, u32), bool),
    (q, k, v): (&[f32], &[f32], &[f32]),
    masks: &MaskData,
    (o, lse, mut row_stats): (&mut [f32], &mut [f32], Option<&mut [f32]>),
) {
    assert!(
        r > 0 && br % r == 0,
        "rows per invocation divide rows per workgroup"
    );
    let (dk, dv) = (p.d_k as usize, p.d_v as usize);
    let qs = p.scale * LOG2_E;
    let logit_flags = flags::BIAS | flags::SOFTCAP | flags::SEGMENTS;
    for lbh in 0..p.bh_count {
        let bh = p.bh_offset + lbh;
        let (b, h) = (bh / p.q_heads, bh % p.q_heads);
        let hk = h / (p.q_heads / p.kv_heads);
        let (ql, kl) = (masks.q_len(b), masks.kv_len(p, b));
        let score = |qr: &[f32], j: u32| {
            let kbase = (((b * p.n + j) * p.kv_heads + hk) * p.d_k) as usize;
            qr.iter()
                .zip(&k[kbase..kbase + dk])
                .fold(0.0f32, |a, (&x, &y)| x.mul_add(y, a))
        };
        let v_row = |j: u32| {
            let vbase = (((b * p.n + j) * p.kv_heads + hk) * p.d_v) as usize;
            &v[vbase..vbase + dv]
        };
        let drop_kept = |grow: u32, j: u32| !dropout || keeps(p, bh, grow, j);
        for split in 0..p.n_splits {
            let key_begin = split * p.split_len;
            let key_end = p.n.min(key_begin + p.split_len);
            for wgx in 0..p.rows.div_ceil(br) {
                let (lo, hi) = workgroup_keys(p, (ql, kl), (wgx, br), (key_begin, key_end), bc);
                for row0 in (wgx * br..(wgx + 1) * br).step_by(r as usize) {
                    if row0 >= p.rows {
                        break;
                    }
                    // The invocation's rows; tiles inside [whole_lo, whole_hi) are whole for
                    // every live one.
                    let (mut whole_lo, mut whole_hi) = (0u32, u32::MAX);
                    let rows: Vec<Row> = (row0..row0 + r)
                        .map(|row| {
                            let grow = p.row_offset + row;
                            let live = row < p.rows;
                            let (mut lo, mut hi, mut qr) = (0, 0, vec![0.0; dk]);
                            if live {
                                let rk = key_range(p, grow, ql, kl);
                                (lo, hi) = (rk.lo, rk.hi);
                                whole_lo = whole_lo.max(lo);
                                whole_hi = whole_hi.min(hi);
                                let qbase = (((b * p.m + grow) * p.q_heads + h) * p.d_k) as usize;
                                qr = q[qbase..qbase + dk].iter().map(|&x| x * qs).collect();
                            }
                            Row {
                                live,
                                grow,
                                lo,
                                hi,
                                mbase: mask_row_base(p, b, h, grow),
                                qr,
                                acc: vec![0.0; dv],
                                m: MASKED,
                                l: 0.0,
                                t: 0.0,
                                o_sum: vec![0.0; dv],
                                m_sum: MASKED,
                                l_sum: 0.0,
                                t_sum: 0.0,
                            }
                        })
                        .collect();
                    // [lane][row]: each lane's state of the block's rows.
                    let mut lane_rows = vec![rows; lanes as usize];
                    let kept = |row: &Row, j: u32| {
                        j >= row.lo
                            && j < row.hi
                            && (p.flags & flags::MASK == 0 || mask_bit(masks, row.mbase, j))
                    };
                    // Blocks of fold_tiles tiles, each folded into the rows' sums after its
                    // last tile, taken or not.
                    let block_keys = bc * fold_tiles(hi.saturating_sub(lo), bc);
                    for b0 in (lo..hi).step_by(block_keys as usize) {
                        let b1 = hi.min(b0 + block_keys);
                        for t0 in (b0..b1).step_by(bc as usize) {
                            let len = bc.min(hi - t0);
                            let t1 = t0 + len;
                            let sees = lane_rows[0].iter().any(|row| {
                                let (a, z) = (t0.max(row.lo), t1.min(row.hi));
                                a < z
                                    && (p.flags & flags::MASK == 0
                                        || mask_any(masks, row.mbase, a, z))
                            });
                            if sees {
                                let whole = p.flags & (flags::MASK | logit_flags) == 0
                                    && whole_lo <= t0
                                    && whole_hi >= t1;
                                let rows = &lane_rows[0];
                                // Scores [key][row], as the shader's sc.
                                let sc: Vec<Vec<f32>> = (t0..t1)
                                    .map(|j| {
                                        if whole {
                                            return rows
                                                .iter()
                                                .map(|row| score(&row.qr, j))
                                                .collect();
                                        }
                                        if !rows.iter().any(|row| kept(row, j)) {
                                            return vec![MASKED; rows.len()];
                                        }
                                        rows.iter()
                                            .map(|row| {
                                                let s = score(&row.qr, j);
                                                if !kept(row, j) {
                                                    return MASKED;
                                                }
                                                if p.flags & logit_flags == 0 {
                                                    return s;
                                                }
                                                // Shaped in natural units, as in the shader.
                                                let y = shape_logit(
                                                    p,
                                                    masks,
                                                    s * LN_2,
                                                    [b, h, row.grow, j],
                                                );
                                                if y > REMOVED_BELOW {
                                                    y * LOG2_E
                                                } else {
                                                    MASKED
                                                }
                                            })
                                            .collect()
                                    })
                                    .collect();
                                for (lane, rows) in lane_rows.iter_mut().enumerate() {
                                    for (i, row) in rows.iter_mut().enumerate() {
                                        // The lane's keys: the pairs lane, lane + lanes, … of
                                        // the tile, with this row's logits.
                                        let keys: Vec<(u32, f32)> = (t0..t1)
                                            .zip(&sc)
                                            .enumerate()
                                            .filter(|(c, _)| (c / 2) % lanes as usize == lane)
                                            .map(|(_, (j, s))| (j, s[i]))
                                            .collect();
                                        row.add_tile(&keys, v_row, drop_kept);
                                    }
                                }
                            }
                        }
                        lane_rows.iter_mut().flatten().for_each(Row::fold);
                    }
                    let rows = merge_lanes(lane_rows);
                    for row in rows.iter().filter(|row| row.live) {
                        let (grow, l) = (row.grow, row.l_sum);
                        let at = [split, b, h, grow];
                        let inv = write_row(p, (o, lse), (at, dropout), &row.o_sum, (row.m_sum, l));
                        let rows = p.batch * p.q_heads * p.m;
                        let at = bh * p.m + grow;
                        if let Some(out) = row_stats.as_deref_mut() {
                            let entropy = if l > 0.0 {
                                LN_2 * (l.log2() + row.t_sum / l)
                            } else {
                                0.0
                            };
                            out[(2 * split * rows + at) as usize] = entropy;
                            out[((2 * split + 1) * rows + at) as usize] = inv;
                        }
                    }
                }
            }
        }
    }
}

/// Writes a row's O, `acc / l`, into slice `split` of `o` and its LSE into `lse` (with
/// `flags::SPLIT_STATS` its max logit and ln(sum) into two rows), from its max `m` (log2 units)
/// and sum `l`; a row that saw no key (l = 0) gets 0 and LSE −∞, never 0/0. Returns 1 / l, or
/// 0. As flash.wgsl and flash_coop.wgsl end; with `dropout` (flash only), O is `acc ·
/// (keep_scale / l)`, as flash.wgsl scales its 1/l.
pub fn write_row(
    p: &AttnParams,
    (o, lse): (&mut [f32], &mut [f32]),
    ([split, b, h, grow], dropout): ([u32; 4], bool),
    acc: &[f32],
    (m, l): (f32, f32),
) -> f32 {
    let (inv, row_max, log_sum) = if l > 0.0 {
        (1.0 / l, m * LN_2, l.ln())
    } else {
        (0.0, f32::NEG_INFINITY, 0.0)
    };
    let inv_o = if dropout { inv * p.keep_scale } else { inv };
    let obase = ((((split * p.batch + b) * p.m + grow) * p.q_heads + h) * p.d_v) as usize;
    for (d, a) in acc.iter().enumerate() {
        o[obase + d] = a * inv_o;
    }
    let rows = p.batch * p.q_heads * p.m;
    let at = (b * p.q_heads + h) * p.m + grow;
    if p.flags & flags::SPLIT_STATS != 0 {
        lse[(2 * split * rows + at) as usize] = row_max;
        lse[((2 * split + 1) * rows + at) as usize] = log_sum;
    } else {
        lse[(split * rows + at) as usize] = row_max + log_sum;
    }
    inv
}

/// The lanes' folded states of a block's rows merged into one per row (lane order): each
/// lane's sum, O and Σ p·(m − s) rebased from its own max to the rows' max.
fn merge_lanes(lane_rows: Vec<Vec<Row>>) -> Vec<Row> {
    let mut rows = lane_rows[0].clone();
    if lane_rows.len() == 1 {
        return rows;
    }
    for (i, row) in rows.iter_mut().enumerate() {
        let mx = lane_rows
            .iter()
            .fold(MASKED, |a, lane| a.max(lane[i].m_sum));
        row.l_sum = 0.0;
        row.t_sum = 0.0;
        row.o_sum.iter_mut().for_each(|a| *a = 0.0);
        for lane in &lane_rows {
            let x = &lane[i];
            let w = (x.m_sum - mx).exp2().max(MIN_WEIGHT);
            let rebase = if x.l_sum > 0.0 {
                (mx - x.m_sum) * x.l_sum
            } else {
                0.0
            };
            row.t_sum += w * (x.t_sum + rebase);
            row.l_sum += w * x.l_sum;
            for (a, &y) in row.o_sum.iter_mut().zip(&x.o_sum) {
                *a += y * w;
            }
        }
        row.m_sum = mx;
    }
    rows
}
