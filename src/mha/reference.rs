//! The layer in f64: the projections and the attention of [`crate::cpu::reference`], with
//! a layer's sizes and weights.

use crate::cpu::reference::{self, Reference};
use crate::mask::Masking;
use crate::mha::{MhaConfig, MhaWeights};

/// The multi-head attention layer in f64: queries `[batch, M, E]`, keys `[batch, N, kdim]`,
/// values `[batch, N, vdim]` (batch-first, as [`crate::MultiHeadAttention`]) are projected by
/// `w` (Q to `inner_dim` features), attended per head with `scale` and `masking`, and projected out. `o` is the layer
/// output `[batch, M, E]`; `lse` and `weights` are the attention's.
pub fn layer(
    c: &MhaConfig,
    w: &MhaWeights,
    (query, key, value): (&[f32], &[f32], &[f32]),
    batch: usize,
    scale: f64,
    masking: &Masking,
) -> Reference {
    let q = reference::linear(query, &w.q, w.q_bias.as_deref(), c.embed_dim);
    let k = reference::linear(key, &w.k, w.k_bias.as_deref(), c.kdim);
    let v = reference::linear(value, &w.v, w.v_bias.as_deref(), c.vdim);
    let (m, n) = (
        query.len() / (batch * c.embed_dim),
        key.len() / (batch * c.kdim),
    );
    let att = reference::attention_masked(&c.attn_shape(batch, m, n), &q, &k, &v, scale, masking);
    Reference {
        o: reference::linear(&att.o, &w.o, w.o_bias.as_deref(), c.inner_dim),
        ..att
    }
}
