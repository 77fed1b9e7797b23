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

/// Gradients of the layer in f64: of the query, key and value inputs and of each weight and
/// bias (in the weights' layouts; a bias's gradient only where the layer has the bias).
#[derive(Clone, Debug)]
pub struct LayerGrads {
    /// ∂/∂query `[batch, M, E]`.
    pub d_query: Vec<f64>,
    /// ∂/∂key `[batch, N, kdim]`.
    pub d_key: Vec<f64>,
    /// ∂/∂value `[batch, N, vdim]`.
    pub d_value: Vec<f64>,
    /// ∂/∂W^Q, W^K, W^V, W^O.
    pub d_weights: [Vec<f64>; 4],
    /// ∂/∂b_q, b_k, b_v, b_o (empty where the layer has no bias).
    pub d_biases: [Vec<f64>; 4],
    /// The gradients at the projections' outputs (Q, K, V and the layer output: each
    /// bias's gradient is the column sum of its own), `[rows, out]`.
    pub d_projected: [Vec<f64>; 4],
}

/// The backward of [`layer`] for the output gradient `d_out` `[batch, M, E]`: W^O's, the
/// attention's ([`reference::attention_backward`]) and the projections' backward
/// ([`reference::linear_backward`]) composed in f64.
pub fn layer_backward(
    c: &MhaConfig,
    w: &MhaWeights,
    (query, key, value): (&[f32], &[f32], &[f32]),
    d_out: &[f32],
    batch: usize,
    scale: f64,
    masking: &Masking,
) -> LayerGrads {
    let q = reference::linear(query, &w.q, w.q_bias.as_deref(), c.embed_dim);
    let k = reference::linear(key, &w.k, w.k_bias.as_deref(), c.kdim);
    let v = reference::linear(value, &w.v, w.v_bias.as_deref(), c.vdim);
    let (m, n) = (
        query.len() / (batch * c.embed_dim),
        key.len() / (batch * c.kdim),
    );
    let s = c.attn_shape(batch, m, n);
    let att = reference::attention_masked(&s, &q, &k, &v, scale, masking);
    let (d_o, dw_o, db_o) = reference::linear_backward(&att.o, &w.o, d_out, c.inner_dim);
    let g = reference::attention_backward(&s, (&q, &k, &v), &d_o, scale, masking);
    let (d_query, dw_q, db_q) = reference::linear_backward(query, &w.q, &g.dq, c.embed_dim);
    let (d_key, dw_k, db_k) = reference::linear_backward(key, &w.k, &g.dk, c.kdim);
    let (d_value, dw_v, db_v) = reference::linear_backward(value, &w.v, &g.dv, c.vdim);
    let keep = |db: Vec<f64>, bias: &Option<Vec<f32>>| if bias.is_some() { db } else { Vec::new() };
    LayerGrads {
        d_query,
        d_key,
        d_value,
        d_weights: [dw_q, dw_k, dw_v, dw_o],
        d_biases: [
            keep(db_q, &w.q_bias),
            keep(db_k, &w.k_bias),
            keep(db_v, &w.v_bias),
            keep(db_o, &w.o_bias),
        ],
        d_projected: [
            g.dq,
            g.dk,
            g.dv,
            d_out.iter().map(|&x| f64::from(x)).collect(),
        ],
    }
}
