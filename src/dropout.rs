//! Dropout of the attention weights, forward and backward, from a counter-based RNG.
//!
//! With [`Attention::with_dropout(p, seed, offset)`](crate::Attention::with_dropout), the
//! weight `P[b, h, i, j]` is dropped (set to 0) when word 0 of Philox4x32-10 (as Random123,
//! cuRAND and PyTorch define it) with key `seed` and counter `(index, offset)` is below
//! `round(p·2³²)`, where `index = ((b·q_heads + h)·M + i)·N + j` (64 bits; `seed` and
//! `offset` as low word then high word); a kept weight is multiplied by `1/(1 − p)`. So
//! `O = (P ∘ Z)·V / (1 − p)` with the keep mask Z a pure function of `(seed, offset, b, h,
//! i, j)`: the backward regenerates it instead of storing it, the CPU twin ([`keeps`])
//! produces the same bits, and a caller advances `offset` (by at least B·H·M·N, or simply
//! by one per call with a fresh seed) to draw a new mask. The bits are xattn's own: the
//! same `seed` does not reproduce PyTorch's mask. `p = 0` runs no dropout code at all (bit
//! for bit the call without dropout); `0 ≤ p < 1`.
//!
//! The LSE is that of the weights before dropout. Weights returned by
//! [`Attention::with_weights`](crate::Attention::with_weights) are after dropout (as
//! PyTorch's `need_weights` returns them): `P ∘ Z / (1 − p)`; the statistics (entropy,
//! focus, coverage, pooled weights) describe P before dropout.
//!
//! Where it is applied: on the three-pass path `softmax_rows` drops the weights it writes after
//! taking the LSE (so `weighted_sum` and the returned weights see `P ∘ Z/(1 − p)`; the
//! statistics kernels rebuild P from Q, K and the LSE, never reading that scratch); the fused
//! kernel `flash` (fused and each split of split-K) sums every weight into its l, t and LSE
//! and accumulates only the kept ones into O, scaled by `1/(1 − p)` with `1/l` at the end
//! (`merge_partials`, linear in the splits' O, needs nothing more). Each kernel specialization
//! that drops weights has a `dropout` flag of its own, so the code is compiled only there. The
//! matrix-unit kernel (`flash_coop`) does not apply dropout: forced under dropout it is an
//! [`Error::Unsupported`](crate::Error::Unsupported), and the planner never picks it unforced.

use crate::params::{flags, AttnParams};
use crate::shape::AttnShape;

const M0: u32 = 0xd251_1f53;
const M1: u32 = 0xcd9e_8d57;
const W0: u32 = 0x9e37_79b9;
const W1: u32 = 0xbb67_ae85;

/// The dropout of one call: probability, seed and offset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability that a weight is dropped, `0 ≤ p < 1`.
    pub p: f32,
    /// The Philox key.
    pub seed: u64,
    /// The upper half of the Philox counter.
    pub offset: u64,
}

impl Dropout {
    /// A draw below this drops the weight: `round(p·2³²)`.
    pub fn drop_below(&self) -> u32 {
        (f64::from(self.p) * 4_294_967_296.0)
            .round()
            .min(f64::from(u32::MAX)) as u32
    }

    /// The factor of a kept weight, `1/(1 − p)` in f32.
    pub fn keep_scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// Whether the weight of `[b, h, i, j]` survives in a problem of shape `s`: the element
    /// rule of the module docs, computed from the indices alone.
    pub fn keeps_element(&self, s: &AttnShape, [b, h, i, j]: [usize; 4]) -> bool {
        if self.p == 0.0 {
            return true;
        }
        let index = (((b * s.q_heads + h) * s.m + i) * s.n + j) as u64;
        draw(index, self.seed, self.offset) >= self.drop_below()
    }

    /// Sets the dropout fields and flag of `params` (nothing for `p = 0`).
    pub fn apply(&self, params: &mut AttnParams) {
        if self.p == 0.0 {
            return;
        }
        params.flags |= flags::DROPOUT;
        params.drop_below = self.drop_below();
        params.keep_scale = self.keep_scale();
        params.seed = [self.seed as u32, (self.seed >> 32) as u32];
        params.offset = [self.offset as u32, (self.offset >> 32) as u32];
    }
}

fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let p0 = u64::from(M0) * u64::from(c[0]);
    let p1 = u64::from(M1) * u64::from(c[2]);
    [
        (p1 >> 32) as u32 ^ c[1] ^ k[0],
        p1 as u32,
        (p0 >> 32) as u32 ^ c[3] ^ k[1],
        p0 as u32,
    ]
}

/// Philox4x32-10: four words from counter `ctr` and key `key`.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for r in 0..10 {
        if r > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        c = round(c, k);
    }
    c
}

/// Word 0 of Philox4x32-10 for element `index`.
fn draw(index: u64, seed: u64, offset: u64) -> u32 {
    let ctr = [
        index as u32,
        (index >> 32) as u32,
        offset as u32,
        (offset >> 32) as u32,
    ];
    philox4x32_10(ctr, [seed as u32, (seed >> 32) as u32])[0]
}

/// Whether the weight of (batch·head `bh`, row `i`, key `j`) survives under `params` (the
/// CPU twin of `dropout_keeps` in shaders/common/dropout.wgsl; true without dropout).
pub fn keeps(params: &AttnParams, bh: u32, i: u32, j: u32) -> bool {
    if params.flags & flags::DROPOUT == 0 {
        return true;
    }
    let index =
        (u64::from(bh) * u64::from(params.m) + u64::from(i)) * u64::from(params.n) + u64::from(j);
    let join = |w: [u32; 2]| u64::from(w[0]) | u64::from(w[1]) << 32;
    draw(index, join(params.seed), join(params.offset)) >= params.drop_below
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known-answer vectors (its tests/kat_vectors).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }
}
