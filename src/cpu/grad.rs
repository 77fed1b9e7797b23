//! CPU twin of `shaders/common/grad.wgsl`: what the backward kernels share, and the one term
//! of the backward they all compute, for one (row, key) pair.

use crate::cpu::mask::{masked_logit, segment_factor, soft_cap, MaskData, REMOVED_BELOW};
use crate::dropout;
use crate::params::{flags, AttnParams};

/// dy/dx: the segment's factor times the softcap's derivative.
pub fn logit_slope(p: &AttnParams, x: f32, j: u32) -> f32 {
    let mut f = 1.0;
    if p.flags & flags::SEGMENTS != 0 {
        f = segment_factor(p, j);
    }
    if p.flags & flags::SOFTCAP != 0 {
        let c = soft_cap(x * f, p.softcap) / p.softcap;
        f *= 1.0 - c * c;
    }
    f
}

/// `v` times Z/(1 − p) under dropout.
pub fn dropped(p: &AttnParams, v: f32, bh: u32, i: u32, j: u32) -> f32 {
    if p.flags & flags::DROPOUT == 0 {
        return v;
    }
    if dropout::keeps(p, bh, i, j) {
        v * p.keep_scale
    } else {
        0.0
    }
}

/// One (row, key) pair of the backward, P rebuilt from the LSE.
#[derive(Clone, Copy, Debug)]
pub struct Term {
    /// The weight that multiplied V (P, dropped).
    pub p_v: f32,
    /// The gradient of the scaled dot product x (dS·dy/dx).
    pub g: f32,
    /// dS itself, the gradient of the bias.
    pub ds: f32,
}

/// The term of row `i` and key `j` of (b, h) from the scaled dot product `x`, dO·V `dp`
/// (a closure: only kept keys need it), the row's LSE and D; `None` for a removed key or a
/// row that saw none.
#[allow(clippy::too_many_arguments)]
pub fn term(
    p: &AttnParams,
    masks: &MaskData,
    x: f32,
    dp: impl FnOnce() -> f32,
    (row_lse, row_d): (f32, f32),
    [b, h, i, j]: [u32; 4],
) -> Option<Term> {
    let y = masked_logit(p, masks, x, [b, h, i, j]);
    if !(y > REMOVED_BELOW && row_lse > REMOVED_BELOW) {
        return None;
    }
    let bh = b * p.q_heads + h;
    let pr = (y - row_lse).exp();
    let ds = pr * (dropped(p, dp(), bh, i, j) - row_d);
    Some(Term {
        p_v: dropped(p, pr, bh, i, j),
        g: ds * logit_slope(p, x, j) * p.scale,
        ds,
    })
}

/// `a·b` over a row, as the shaders sum it: 4-element dot products, in order.
pub fn dot4(a: &[f32], b: &[f32]) -> f32 {
    a.chunks(4)
        .zip(b.chunks(4))
        .map(|(x, y)| x.iter().zip(y).map(|(u, v)| u * v).sum::<f32>())
        .sum()
}
