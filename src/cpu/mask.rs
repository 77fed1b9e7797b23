//! CPU twin of `shaders/common/mask.wgsl`: lengths, window, mask bits and logit controls as
//! the kernels read them from params and their three mask buffers.

use crate::params::{flags, AttnParams, UNBOUNDED};

/// Logit of a removed key, as `MASKED` in the shaders; also the start of running maxima.
pub const MASKED: f32 = -3.0e38;
/// Logits at or below this are removed keys, as `REMOVED_BELOW` in the shaders: far below
/// every kept logit in natural and log2 units (the host bounds the factors that shape them).
pub const REMOVED_BELOW: f32 = -1.0e38;
/// The least weight of a kept key and the least factor by which the fused kernels rescale a
/// row's sums, as `MIN_WEIGHT` in shaders/common/params.wgsl: the smallest normal f32, 2⁻¹²⁶, so
/// that a kept key's ±∞ or NaN in V reaches O (p·∞ = ∞ for every p > 0) as in the reference.
pub const MIN_WEIGHT: f32 = f32::MIN_POSITIVE;

/// The kernels' mask buffers: `lens` (`q_lens[batch]` then `kv_lens[batch]`), packed mask bits
/// and bias (placeholders when unused).
#[derive(Clone, Copy, Debug)]
pub struct MaskData<'a> {
    /// Lengths.
    pub lens: &'a [u32],
    /// Mask words.
    pub mask_bits: &'a [u32],
    /// Bias.
    pub bias: &'a [f32],
}

/// Keys `[lo, hi)` of one row; empty when `lo ≥ hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRange {
    /// First key.
    pub lo: u32,
    /// One past the last key.
    pub hi: u32,
}

impl<'a> MaskData<'a> {
    /// The three mask buffers as bound (bindings in words; the bias holds f32 bits).
    pub fn from_words(lens: &'a [u32], mask_bits: &'a [u32], bias: &'a [u32]) -> Self {
        MaskData {
            lens,
            mask_bits,
            bias: bytemuck::cast_slice(bias),
        }
    }
}

impl MaskData<'_> {
    /// `q_len` of batch entry `b`.
    pub fn q_len(&self, b: u32) -> u32 {
        self.lens[b as usize]
    }
    /// `kv_len` of batch entry `b`.
    pub fn kv_len(&self, p: &AttnParams, b: u32) -> u32 {
        self.lens[(p.batch + b) as usize]
    }
}

/// Row i's diagonal key, plus the block's shift (may be negative).
pub fn diagonal(p: &AttnParams, i: u32, ql: u32, kl: u32) -> i32 {
    i as i32
        + if p.bottom_right != 0 {
            kl as i32 - ql as i32
        } else {
            0
        }
        + p.diag_shift
}

/// First key of the window around `dg`.
pub fn window_lo(p: &AttnParams, dg: i32) -> u32 {
    if p.win_left == UNBOUNDED {
        return 0;
    }
    (dg - p.win_left as i32).max(0) as u32
}

/// One past the last key of the window around `dg`, within `kl`.
pub fn window_hi(p: &AttnParams, dg: i32, kl: u32) -> u32 {
    if p.win_right == UNBOUNDED {
        return kl;
    }
    (dg + p.win_right as i32 + 1).clamp(0, kl as i32) as u32
}

/// Keys row `i` may see by lengths and window.
pub fn key_range(p: &AttnParams, i: u32, ql: u32, kl: u32) -> KeyRange {
    if i >= ql {
        return KeyRange { lo: 0, hi: 0 };
    }
    let dg = diagonal(p, i, ql, kl);
    KeyRange {
        lo: window_lo(p, dg),
        hi: window_hi(p, dg, kl),
    }
}

/// First mask word of row `i`.
pub fn mask_row_base(p: &AttnParams, b: u32, h: u32, i: u32) -> u32 {
    b * p.mask_b + h * p.mask_h + i * p.mask_row
}

/// Whether key `j` of the row at `base` may be attended.
pub fn mask_bit(m: &MaskData, base: u32, j: u32) -> bool {
    (m.mask_bits[(base + j / 32) as usize] >> (j % 32)) & 1 != 0
}

/// Whether the row at `base` may attend any key of `lo..hi` (non-empty) by its mask bits.
pub fn mask_any(m: &MaskData, base: u32, lo: u32, hi: u32) -> bool {
    (lo / 32..=(hi - 1) / 32).any(|w| {
        let first = lo.max(w * 32) - w * 32;
        let last = hi.min(w * 32 + 32) - w * 32;
        let ones = if last == 32 {
            u32::MAX
        } else {
            (1 << last) - 1
        };
        m.mask_bits[(base + w) as usize] & ones & !((1u32 << first) - 1) != 0
    })
}

/// The logit factor of key j's segment (1 outside every segment).
pub fn segment_factor(p: &AttnParams, j: u32) -> f32 {
    (0..p.n_segments as usize)
        .find(|&g| j >= p.seg_start[g] && j < p.seg_end[g])
        .map_or(1.0, |g| p.seg_factor[g])
}

/// `cap·tanh(y/cap)` in f32 as `soft_cap` in the shader: the odd series of tanh(t)/t below
/// |t| = 0.5, `1 − 2/(e^{2|t|} + 1)` up to 15, ±1 beyond.
pub fn soft_cap(y: f32, cap: f32) -> f32 {
    let a = y.abs();
    if a < 0.5 * cap {
        let t2 = (y / cap) * (y / cap);
        let r = 1.0
            + t2 * (-1.0 / 3.0
                + t2 * (2.0 / 15.0
                    + t2 * (-17.0 / 315.0
                        + t2 * (62.0 / 2835.0
                            + t2 * (-1382.0 / 155925.0
                                + t2 * (21844.0 / 6081075.0 + t2 * (-929569.0 / 638512875.0)))))));
        return y * r;
    }
    let th = if a < 15.0 * cap {
        1.0 - 2.0 / ((2.0 * (a / cap)).exp() + 1.0)
    } else {
        1.0
    };
    y.signum() * cap * th
}

/// The logit `x` of key `j` after segment factor, softcap and bias, or [`MASKED`] when its
/// bias (≤ `mask::BIAS_REMOVES`) removes the key.
pub fn shape_logit(p: &AttnParams, m: &MaskData, x: f32, [b, h, i, j]: [u32; 4]) -> f32 {
    let mut y = x;
    if p.flags & flags::SEGMENTS != 0 {
        y *= segment_factor(p, j);
    }
    if p.flags & flags::SOFTCAP != 0 {
        y = soft_cap(y, p.softcap);
    }
    if p.flags & flags::BIAS != 0 {
        let bias = m.bias[(b * p.bias_b + h * p.bias_h + i * p.bias_row + j) as usize];
        if bias <= crate::mask::BIAS_REMOVES {
            return MASKED;
        }
        y += bias;
    }
    y
}

/// The logit key `j` gives row `i`, or [`MASKED`].
pub fn masked_logit(p: &AttnParams, m: &MaskData, x: f32, [b, h, i, j]: [u32; 4]) -> f32 {
    let r = key_range(p, i, m.q_len(b), m.kv_len(p, b));
    if j < r.lo || j >= r.hi {
        return MASKED;
    }
    if p.flags & flags::MASK != 0 && !mask_bit(m, mask_row_base(p, b, h, i), j) {
        return MASKED;
    }
    shape_logit(p, m, x, [b, h, i, j])
}

/// The keys `[lo, hi)` of workgroup `wgx` (rows `wgx·br …`) in the split `[key_begin,
/// key_end)`: the union of its rows' ranges by lengths `(ql, kl)` and window, from a boundary
/// of `bc`-key tiles (`workgroup_keys` in common/mask.wgsl, which flash and flash_coop call).
pub fn workgroup_keys(
    p: &AttnParams,
    (ql, kl): (u32, u32),
    (wgx, br): (u32, u32),
    (key_begin, key_end): (u32, u32),
    bc: u32,
) -> (u32, u32) {
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
    (key_begin + (lo - key_begin) / bc * bc, hi)
}
