//! The sizes of a layer and which weights a forward call returns: the data the layer's
//! planner (`plan::layer`) and the layer itself share.

use crate::error::{Error, Result};
use crate::shape::AttnShape;

/// Sizes of a layer. `inner_dim` (E unless set) must be a multiple of `num_heads` (head dim =
/// inner / heads), `num_heads` a multiple of `kv_heads` (GQA when smaller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MhaConfig {
    /// E: width of the query input and the output.
    pub embed_dim: usize,
    /// Width of the projected queries, `num_heads · head_dim`: the output width of W^Q and the
    /// input width of W^O. E in PyTorch, Whisper and BART; T5 v1.1 and some diffusers blocks
    /// differ.
    pub inner_dim: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (K and V projections output `kv_heads · head_dim` features).
    pub kv_heads: usize,
    /// Width of the key input (PyTorch `kdim`).
    pub kdim: usize,
    /// Width of the value input (PyTorch `vdim`).
    pub vdim: usize,
    /// Whether the layer adds the biases its weights carry. With `false` the layer adds none:
    /// [`weights`](crate::mha::weights) then ignores the biases a file holds, and [`MhaWeights::check`](crate::mha::MhaWeights::check) refuses
    /// weights that carry one.
    pub bias: bool,
}

impl MhaConfig {
    /// `num_heads` heads over width `embed_dim`; inner width, `kdim` and `vdim` = `embed_dim`,
    /// biases on, no GQA.
    pub fn new(embed_dim: usize, num_heads: usize) -> Self {
        Self {
            embed_dim,
            inner_dim: embed_dim,
            num_heads,
            kv_heads: num_heads,
            kdim: embed_dim,
            vdim: embed_dim,
            bias: true,
        }
    }
    /// Width of the projected queries, `num_heads · head_dim`, when it differs from E.
    pub fn with_inner_dim(mut self, inner_dim: usize) -> Self {
        self.inner_dim = inner_dim;
        self
    }
    /// Key/value heads (GQA/MQA).
    pub fn with_kv_heads(mut self, kv_heads: usize) -> Self {
        self.kv_heads = kv_heads;
        self
    }
    /// Width of the key input.
    pub fn with_kdim(mut self, kdim: usize) -> Self {
        self.kdim = kdim;
        self
    }
    /// Width of the value input.
    pub fn with_vdim(mut self, vdim: usize) -> Self {
        self.vdim = vdim;
        self
    }
    /// Biases on or off.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
    /// Per-head dimension `inner_dim / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.inner_dim / self.num_heads
    }
    /// Output features of the K and V projections.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
    }
    /// The attention problem inside the layer for a batch of M queries over N keys.
    pub fn attn_shape(&self, batch: usize, m: usize, n: usize) -> AttnShape {
        let d = self.head_dim();
        AttnShape {
            batch,
            m,
            n,
            q_heads: self.num_heads,
            kv_heads: self.kv_heads,
            d_k: d,
            d_v: d,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let c = self;
        let sizes = [
            c.embed_dim,
            c.inner_dim,
            c.num_heads,
            c.kv_heads,
            c.kdim,
            c.vdim,
        ];
        if sizes.contains(&0) {
            return Err(Error::Shape(format!("layer sizes must be ≥ 1: {c:?}")));
        }
        if !c.inner_dim.is_multiple_of(c.num_heads) {
            return Err(Error::Shape(format!(
                "inner_dim {} (heads × head dim; embed_dim {} unless set) is not a multiple of \
                 num_heads {}",
                c.inner_dim, c.embed_dim, c.num_heads
            )));
        }
        if !c.num_heads.is_multiple_of(c.kv_heads) {
            return Err(Error::Shape(format!(
                "num_heads {} is not a multiple of kv_heads {}",
                c.num_heads, c.kv_heads
            )));
        }
        Ok(())
    }
}

/// Which attention weights a forward call returns (PyTorch `need_weights` and
/// `average_attn_weights`). Any of them forces the three-pass attention path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NeedWeights {
    /// None (the fused paths may run).
    #[default]
    None,
    /// Averaged over heads, `[batch, M, N]`.
    Averaged,
    /// Per head, `[batch, num_heads, M, N]`.
    PerHead,
}
