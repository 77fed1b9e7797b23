//! The multi-head attention layer in f64 for the layer tests (`tests/mha.rs`, the binary in
//! `tests/cli_mha.rs`): random weights, the reference forward pass and its error budget.
#![allow(dead_code)]

use xattn::cpu::reference;
use xattn::mha::MhaWeights;
use xattn::{Attention, MhaConfig};

use super::files::NamedTensor;
use super::random;

/// `w` as a model of name family `names` (`pytorch`, `hf`, `diffusers`, `t5`) saves it under
/// `prefix`, each bias only where `w` has one. The names are written out here, not taken from
/// the loader. PyTorch packs W^Q, W^K, W^V into `in_proj_weight` when kdim = vdim = E, and its
/// Q, K, V biases into `in_proj_bias` (all three or none).
pub fn layer_tensors(names: &str, prefix: &str, c: &MhaConfig, w: &MhaWeights) -> Vec<NamedTensor> {
    let (e, inner, kv) = (c.embed_dim, c.inner_dim, c.kv_dim());
    let shapes = [[inner, e], [kv, c.kdim], [kv, c.vdim], [e, inner]];
    let weights = [&w.q, &w.k, &w.v, &w.o];
    let biases = [&w.q_bias, &w.k_bias, &w.v_bias, &w.o_bias];
    let mut out: Vec<NamedTensor> = Vec::new();
    let mut put = |name: &str, shape: &[usize], values: &[f32]| {
        out.push((format!("{prefix}{name}"), shape.to_vec(), values.to_vec()))
    };
    let modules = match names {
        "hf" => ["q_proj", "k_proj", "v_proj", "out_proj"],
        "diffusers" => ["to_q", "to_k", "to_v", "to_out.0"],
        "t5" => ["q", "k", "v", "o"],
        "pytorch" => {
            if c.kdim == e && c.vdim == e {
                put(
                    "in_proj_weight",
                    &[inner + 2 * kv, e],
                    &[&w.q[..], &w.k, &w.v].concat(),
                );
            } else {
                for (i, name) in ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
                    .iter()
                    .enumerate()
                {
                    put(name, &shapes[i], weights[i]);
                }
            }
            if let [Some(q), Some(k), Some(v)] = [&w.q_bias, &w.k_bias, &w.v_bias] {
                put("in_proj_bias", &[inner + 2 * kv], &[&q[..], k, v].concat());
            }
            put("out_proj.weight", &shapes[3], &w.o);
            if let Some(b) = &w.o_bias {
                put("out_proj.bias", &[e], b);
            }
            return out;
        }
        other => panic!("no name family {other}"),
    };
    for i in 0..4 {
        put(&format!("{}.weight", modules[i]), &shapes[i], weights[i]);
        if let Some(b) = biases[i] {
            put(&format!("{}.bias", modules[i]), &[shapes[i][0]], b);
        }
    }
    out
}

/// Seeded weights of the sizes of `c`, with biases when `c.bias`.
pub fn random_weights(c: &MhaConfig, seed: u64) -> MhaWeights {
    let (e, inner, kv) = (c.embed_dim, c.inner_dim, c.kv_dim());
    // Xavier-like amplitude keeps activations O(1) whatever the widths.
    let w = |out: usize, inp: usize, s: u64| random(out * inp, (3.0 / inp as f32).sqrt(), s);
    let b = |len: usize, s: u64| c.bias.then(|| random(len, 0.5, s));
    MhaWeights {
        q: w(inner, e, seed),
        k: w(kv, c.kdim, seed + 1),
        v: w(kv, c.vdim, seed + 2),
        o: w(e, inner, seed + 3),
        q_bias: b(inner, seed + 4),
        k_bias: b(kv, seed + 5),
        v_bias: b(kv, seed + 6),
        o_bias: b(e, seed + 7),
    }
}

/// `w` without the biases of the projections (Q, K, V, O) whose `keep` is false.
pub fn keep_biases(w: MhaWeights, keep: [bool; 4]) -> MhaWeights {
    let only = |b: Option<Vec<f32>>, k: bool| b.filter(|_| k);
    MhaWeights {
        q_bias: only(w.q_bias, keep[0]),
        k_bias: only(w.k_bias, keep[1]),
        v_bias: only(w.v_bias, keep[2]),
        o_bias: only(w.o_bias, keep[3]),
        ..w
    }
}

/// The layer in f64 (`xattn::mha::reference::layer`) with these attention options: (out, per-head weights).
pub fn reference_layer(
    c: &MhaConfig,
    w: &MhaWeights,
    batch: usize,
    inputs: (&[f32], &[f32], &[f32]),
    attention: &Attention,
) -> (Vec<f64>, Vec<f64>) {
    let scale = f64::from(attention.scale_for(c.head_dim()));
    let r = xattn::mha::reference::layer(c, w, inputs, batch, scale, attention.masking());
    (r.o, r.weights)
}

/// Largest Σ_i |x_ri·w_oi| over rows r and outputs o: what the rounding of an f32 dot
/// product scales with.
pub fn abs_dot_max<T: Copy + Into<f64>>(x: &[T], w: &[f32], in_dim: usize) -> f64 {
    let mut worst = 0.0f64;
    for row in x.chunks(in_dim) {
        for wrow in w.chunks(in_dim) {
            let s: f64 = row
                .iter()
                .zip(wrow)
                .map(|(&a, &b)| (a.into() * f64::from(b)).abs())
                .sum();
            worst = worst.max(s);
        }
    }
    worst
}

/// Error budget of the layer from the magnitudes of its actual intermediates (as `budget`
/// does for attention): each f32 projection is off by ≤ c·ε·Σ|x·w|; Q/K errors move a
/// logit by ≤ scale·d·(δq·|k| + |q|·δk); attention adds its own budget ε·(4(1+L) + N)·|v|,
/// a logit error δ moves O by ≤ 2δ·|v|, a V error passes through; W^O carries an O error δ
/// into ≤ δ·Σ_i|W^O_oi| and rounds once more.
pub fn layer_tolerance(
    c: &MhaConfig,
    w: &MhaWeights,
    [query, key, value]: [&[f32]; 3],
    n: usize,
    scale: f64,
) -> (f64, f64) {
    let eps = f64::from(f32::EPSILON);
    let amax = |x: &[f64]| x.iter().fold(0.0f64, |a, &y| a.max(y.abs()));
    let q = reference::linear(query, &w.q, w.q_bias.as_deref(), c.embed_dim);
    let k = reference::linear(key, &w.k, w.k_bias.as_deref(), c.kdim);
    let v = reference::linear(value, &w.v, w.v_bias.as_deref(), c.vdim);
    let round = |x: &[f32], m: &[f32], width: usize, y: &[f64]| {
        4.0 * eps * (abs_dot_max(x, m, width) + amax(y))
    };
    let (dq, dk, dv) = (
        round(query, &w.q, c.embed_dim, &q),
        round(key, &w.k, c.kdim, &k),
        round(value, &w.v, c.vdim, &v),
    );
    let (qm, km, vm) = (amax(&q), amax(&k), amax(&v));
    let d = c.head_dim() as f64;
    let logit = scale * d * qm * km;
    let dlogit = scale * d * (dq * km + qm * dk);
    let d_o = eps * (4.0 * (1.0 + logit) + n as f64) * vm + 2.0 * dlogit * vm + dv;
    let wo_l1 = w.o.chunks(c.inner_dim).fold(0.0f64, |a, r| {
        a.max(r.iter().map(|x| f64::from(x.abs())).sum::<f64>())
    });
    // |O| ≤ max|V|, so Σ|O·w| ≤ max|V|·Σ|w|.
    let out = d_o * wo_l1 + 4.0 * eps * vm * wo_l1;
    // A weight is off relatively by its logit's error plus the softmax's own rounding.
    let weights = eps * (4.0 * (1.0 + logit) + n as f64) + 2.0 * dlogit;
    (out, weights)
}
