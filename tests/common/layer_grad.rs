//! A layer's gradients on the GPU ([`xattn::LayerGrads`]) against f64 ones, within a normwise
//! budget derived for an f32 backward: shared by `tests/mha_backward.rs` (the crate's f64
//! reference) and `tests/mha_grad_fixtures.rs` (PyTorch autograd).
#![allow(dead_code)]

use xattn::mha::reference::LayerGrads as RefGrads;
use xattn::mha::MhaWeights;
use xattn::{LayerGrads, MhaConfig, MhaOptions, MultiHeadAttention, Tensor};

use super::{assert_close, poison};

const EPS: f64 = f32::EPSILON as f64;

/// A layer's gradients on the host: from the GPU's tensors or the CPU executor's buffers.
pub struct HostLayerGrads {
    pub d_query: Vec<f32>,
    pub d_key: Vec<f32>,
    pub d_value: Vec<f32>,
    pub d_weights: [Option<Vec<f32>>; 4],
    pub d_biases: [Option<Vec<f32>>; 4],
}

impl HostLayerGrads {
    pub fn of(g: &LayerGrads) -> HostLayerGrads {
        let host = |t: &Tensor| t.to_host().unwrap();
        HostLayerGrads {
            d_query: host(&g.d_query),
            d_key: host(&g.d_key),
            d_value: host(&g.d_value),
            d_weights: std::array::from_fn(|i| g.d_weights[i].as_ref().map(host)),
            d_biases: std::array::from_fn(|i| g.d_biases[i].as_ref().map(host)),
        }
    }
}

/// The gradients of the cached path, where the layer's K and V inputs are the projected K
/// and V: the attention's dK, dV, and no gradient of W^K, W^V or their biases.
pub fn cached(want: &RefGrads) -> RefGrads {
    let mut c = want.clone();
    c.d_key = want.d_projected[1].clone();
    c.d_value = want.d_projected[2].clone();
    for i in [1, 2] {
        c.d_weights[i].clear();
        c.d_biases[i].clear();
    }
    c
}

pub fn amax(x: &[f64]) -> f64 {
    x.iter().fold(0.0f64, |a, &y| a.max(y.abs()))
}

/// Runs the layer's backward with every gradient poisoned first; its gradients on the host.
pub fn backward_poisoned(
    layer: &MultiHeadAttention,
    (q, k, v, d_out): (&Tensor, &Tensor, &Tensor, &Tensor),
    opts: &MhaOptions,
) -> HostLayerGrads {
    let call = layer.prepare_backward(q, k, v, d_out, opts).unwrap();
    let g = call.output();
    let all = [&g.d_query, &g.d_key, &g.d_value];
    for t in all
        .into_iter()
        .chain(g.d_weights.iter().flatten())
        .chain(g.d_biases.iter().flatten())
    {
        poison(t).unwrap();
    }
    call.run().unwrap();
    HostLayerGrads::of(call.output())
}

/// A normwise budget: every f32 rounding along the chain (projections over E, kdim, vdim and
/// inner; logits over head_dim with |logit| ≤ max_logit; sums over N keys and M·G rows;
/// W^O over inner and E) adds at most ε relative to the magnitudes it combines, and the
/// gradients are as large as their largest element: `4ε·L·max|g|` with L the chain's length.
pub fn chain_len(c: &MhaConfig, (_, m, n): (usize, usize, usize), max_logit: f64) -> f64 {
    let group = c.num_heads / c.kv_heads;
    (c.embed_dim + c.kdim + c.vdim + 2 * c.inner_dim + 2 * c.head_dim() + n + m * group) as f64
        + 1.0
        + max_logit
}

/// Compares every gradient of `got` with `want` (`[i]` in the order W^Q, W^K, W^V, W^O; a
/// weight's gradient absent from both where `want`'s is empty, as [`cached`] makes it);
/// returns the worst error relative to its budget and prints nothing. `inputs_amax` is the
/// largest |element| of the query and of the key input, `w` the layer's weights (both for the
/// logit bound). `names` names the tensors in messages (`d_query`, ..., `dW^Q`, ...).
#[allow(clippy::too_many_arguments)]
pub fn compare(
    name: &str,
    cfg: &MhaConfig,
    dims: (usize, usize, usize),
    scale: f64,
    w: &MhaWeights,
    inputs_amax: [f64; 2],
    got: &HostLayerGrads,
    want: &RefGrads,
) -> f64 {
    // |logit| ≤ scale·head_dim·max|q|·max|k|, with the projections' outputs bounded by their
    // inputs' largest element times the largest absolute row sum of the weights plus the bias.
    let row_sum = |wt: &[f32], bias: &Option<Vec<f32>>, in_dim: usize, x: f64| {
        let rows = wt
            .chunks(in_dim)
            .map(|r| r.iter().map(|x| f64::from(x.abs())).sum::<f64>());
        rows.fold(0.0f64, f64::max) * x
            + bias.as_ref().map_or(0.0, |b| {
                b.iter().fold(0.0f64, |a, x| a.max(f64::from(x.abs())))
            })
    };
    let [x_q, x_k] = inputs_amax;
    let max_logit = scale
        * cfg.head_dim() as f64
        * row_sum(&w.q, &w.q_bias, cfg.embed_dim, x_q)
        * row_sum(&w.k, &w.k_bias, cfg.kdim, x_k);
    let len = chain_len(cfg, dims, max_logit);
    let mut worst = 0.0f64;
    // `magnitude`: what the gradient's elements are sums of, at their largest.
    let mut one = |what: String, got: &[f32], want: &[f64], magnitude: f64| {
        let tol = 4.0 * EPS * len * magnitude.max(1e-30);
        let err = assert_close(&what, got, want, tol);
        worst = worst.max(err / tol);
    };
    one(
        format!("{name} d_query"),
        &got.d_query,
        &want.d_query,
        amax(&want.d_query),
    );
    one(
        format!("{name} d_key"),
        &got.d_key,
        &want.d_key,
        amax(&want.d_key),
    );
    one(
        format!("{name} d_value"),
        &got.d_value,
        &want.d_value,
        amax(&want.d_value),
    );
    for (i, p) in ["W^Q", "W^K", "W^V", "W^O"].iter().enumerate() {
        // A cache's K and V are inputs: W^K and W^V have no gradient on the cached path.
        match (got.d_weights[i].as_deref(), want.d_weights[i].is_empty()) {
            (Some(t), false) => one(
                format!("{name} d{p}"),
                t,
                &want.d_weights[i],
                amax(&want.d_weights[i]),
            ),
            (None, true) => {}
            (t, _) => panic!("{name}: gradient of {p} present: {}", t.is_some()),
        }
        match (got.d_biases[i].as_deref(), want.d_biases[i].is_empty()) {
            (Some(t), false) => {
                // A bias's gradient is a column sum of the projection's output gradient; it
                // may cancel to 0 (b_k's does: softmax ignores a constant added to a row's
                // logits), so its budget is the sum of the magnitudes it adds.
                let dz = &want.d_projected[i];
                let cols = want.d_biases[i].len();
                let mut sums = vec![0.0f64; cols];
                for (e, x) in dz.iter().enumerate() {
                    sums[e % cols] += x.abs();
                }
                one(
                    format!("{name} d bias of {p}"),
                    t,
                    &want.d_biases[i],
                    amax(&sums),
                );
            }
            (None, true) => {}
            (t, _) => panic!("{name}: bias gradient of {p} present: {}", t.is_some()),
        }
    }
    worst
}
