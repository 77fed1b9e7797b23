//! Layer weights on the host, from slices or from safetensors files.
//!
//! A safetensors file holds a layer's tensors under a prefix (what precedes the names, e.g.
//! `model.decoder.layers.0.encoder_attn.`), named by one of these families ([`Names`]):
//!
//! | family | W^Q, W^K, W^V | W^O | biases |
//! |---|---|---|---|
//! | `pytorch` (`nn.MultiheadAttention`) | `in_proj_weight` (packed, rows W^Q, W^K, W^V; needs kdim = vdim = E and no GQA) or `q_proj_weight`, `k_proj_weight`, `v_proj_weight` | `out_proj.weight` | `in_proj_bias` (packed likewise), `out_proj.bias` |
//! | `hf` (Hugging Face Whisper, BART, …) | `q_proj.weight`, `k_proj.weight`, `v_proj.weight` | `out_proj.weight` | `.bias` beside each weight |
//! | `diffusers` (`Attention`) | `to_q.weight`, `to_k.weight`, `to_v.weight` | `to_out.0.weight` | `.bias` beside each weight |
//! | `t5` (Hugging Face T5) | `q.weight`, `k.weight`, `v.weight` | `o.weight` | `.bias` beside each weight |
//!
//! in PyTorch `Linear` layout: W^Q `[inner, E]`, W^K `[kv, kdim]`, W^V `[kv, vdim]`, W^O
//! `[E, inner]`, a bias `[rows of its weight]`, where inner = heads · head_dim (E except in
//! T5 v1.1 and some diffusers blocks; [`LayerFile::inner_dim`] reads it from W^Q) and
//! kv = kv_heads · head_dim. [`LayerFile::open`] finds the family under the prefix unless it is
//! named. A projection has a bias when the file holds one (Whisper's `k_proj`, diffusers'
//! `to_q/k/v` and T5 have none); with `MhaConfig::bias = false` the biases in the file are
//! ignored. Tensors may be f32, f16 or bf16 (widened to f32).
//!
//! Every other tensor under the prefix changes what the model computes, so a file holding one
//! is refused by name until it is ignored ([`LayerFile::ignore`]): PyTorch's `bias_k`, `bias_v`
//! (`add_bias_kv=True`), diffusers' `norm_q`, `norm_k` (`qk_norm`), `norm_cross`
//! (`cross_attention_norm`) and the added projections of joint attention, T5's
//! `relative_attention_bias` (a position bias: give it as the attention's bias), RoPE, LoRA
//! weights, and any tensor xattn does not know. The tensors of layers deeper under the prefix
//! are theirs, not the layer's.

use std::fmt;
use std::str::FromStr;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::tensor::Tensor;
use crate::mha::MhaConfig;
use crate::mha::Proj;

#[cfg(feature = "safetensors")]
mod file;
#[cfg(feature = "safetensors")]
pub use file::{LayerFile, Unread};

/// The four projections in PyTorch `Linear` layout (`[out, in]`, row-major f32).
#[derive(Clone, Debug, PartialEq)]
pub struct MhaWeights {
    /// W^Q `[inner_dim, embed_dim]`.
    pub q: Vec<f32>,
    /// W^K `[kv_heads·head_dim, kdim]`.
    pub k: Vec<f32>,
    /// W^V `[kv_heads·head_dim, vdim]`.
    pub v: Vec<f32>,
    /// W^O `[embed_dim, inner_dim]`.
    pub o: Vec<f32>,
    /// b_q `[inner_dim]`.
    pub q_bias: Option<Vec<f32>>,
    /// b_k `[kv_heads·head_dim]`.
    pub k_bias: Option<Vec<f32>>,
    /// b_v `[kv_heads·head_dim]`.
    pub v_bias: Option<Vec<f32>>,
    /// b_o `[embed_dim]`.
    pub o_bias: Option<Vec<f32>>,
}

/// A family of tensor names for a layer's projections (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Names {
    /// PyTorch `nn.MultiheadAttention`: `in_proj_weight` or `q_proj_weight`…, `out_proj`.
    PyTorch,
    /// Hugging Face Whisper, BART and the like: `q_proj`, `k_proj`, `v_proj`, `out_proj`.
    HuggingFace,
    /// diffusers `Attention`: `to_q`, `to_k`, `to_v`, `to_out.0`.
    Diffusers,
    /// Hugging Face T5: `q`, `k`, `v`, `o`.
    T5,
}

impl Names {
    /// Every family, in the order detection tries them.
    pub const ALL: [Names; 4] = [
        Names::PyTorch,
        Names::HuggingFace,
        Names::Diffusers,
        Names::T5,
    ];

    /// The family's short name: `pytorch`, `hf`, `diffusers` or `t5`.
    pub fn as_str(self) -> &'static str {
        match self {
            Names::PyTorch => "pytorch",
            Names::HuggingFace => "hf",
            Names::Diffusers => "diffusers",
            Names::T5 => "t5",
        }
    }
}

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Names {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Names::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| format!("`{s}` is no name family; use pytorch, hf, diffusers or t5"))
    }
}

impl MhaWeights {
    /// Weight and bias of one projection.
    pub(crate) fn get(&self, proj: Proj) -> (&[f32], Option<&[f32]>) {
        let (w, b) = match proj {
            Proj::Q => (&self.q, &self.q_bias),
            Proj::K => (&self.k, &self.k_bias),
            Proj::V => (&self.v, &self.v_bias),
            Proj::O => (&self.o, &self.o_bias),
        };
        (w, b.as_deref())
    }

    /// The four projections uploaded as `dtype` with `dims` (`[out, in]` each, lengths
    /// checked by the caller), and their biases where present: a layer's device weights.
    pub(crate) fn upload(
        &self,
        ctx: &Context,
        dims: [[usize; 2]; 4],
        dtype: DType,
    ) -> Result<([Tensor; 4], [Option<Tensor>; 4])> {
        let (mut w, mut b) = (Vec::with_capacity(4), Vec::with_capacity(4));
        for (proj, dims) in Proj::ALL.into_iter().zip(dims) {
            let (data, bias) = self.get(proj);
            w.push(Tensor::upload_as(ctx, "layer_weight", data, &dims, dtype)?);
            b.push(
                bias.map(|bias| Tensor::upload_as(ctx, "layer_bias", bias, &[bias.len()], dtype))
                    .transpose()?,
            );
        }
        Ok((
            w.try_into().expect("four projections"),
            b.try_into().expect("four projections"),
        ))
    }

    /// Writes these weights into tensors [`MhaWeights::upload`] made (lengths checked and
    /// biases matched by the caller).
    pub(crate) fn write_into(
        &self,
        (weights, biases): (&[Tensor; 4], &[Option<Tensor>; 4]),
    ) -> Result<()> {
        for (i, proj) in Proj::ALL.into_iter().enumerate() {
            let (data, bias) = self.get(proj);
            weights[i].write(data)?;
            if let (Some(t), Some(bias)) = (&biases[i], bias) {
                t.write(bias)?;
            }
        }
        Ok(())
    }

    /// Checks every length against `config`.
    pub fn check(&self, c: &MhaConfig) -> Result<()> {
        let (e, inner, kv) = (c.embed_dim, c.inner_dim, c.kv_dim());
        for (name, proj, w_len, b_len) in [
            ("q", Proj::Q, inner * e, inner),
            ("k", Proj::K, kv * c.kdim, kv),
            ("v", Proj::V, kv * c.vdim, kv),
            ("o", Proj::O, e * inner, e),
        ] {
            let (w, b) = self.get(proj);
            if w.len() != w_len {
                return Err(Error::Weights(format!(
                    "W_{name} has {} elements; the layer needs {w_len}",
                    w.len()
                )));
            }
            match b {
                Some(b) if !c.bias => {
                    return Err(Error::Weights(format!(
                        "b_{name} is given ({} elements) but the layer has bias = false",
                        b.len()
                    )))
                }
                Some(b) if b.len() != b_len => {
                    return Err(Error::Weights(format!(
                        "b_{name} has {} elements; the layer needs {b_len}",
                        b.len()
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }
}
