//! The layer's backward: [`MultiHeadAttention::backward`] and its prepared and cached forms.

use std::collections::HashMap;

use crate::call::Prepared;
use crate::dtype::DType;
use crate::engine::Scratch;
use crate::error::{Error, Result};
use crate::gpu::executor::Bindings;
use crate::gpu::tensor::Tensor;
use crate::mha::{dims3, MhaOptions, MultiHeadAttention, Source, SourceCache};
use crate::plan::layer_backward::layer_backward_program;
use crate::plan::request::Request;
use crate::stats::Stats;

/// Gradients of one layer call, all f32: of the query `[batch, M, embed_dim]`, of the key
/// and value inputs (`[batch, N, kdim]`, `[batch, N, vdim]`; on the cached path, of the
/// cache's K and V `[batch, N, kv_heads, head_dim]`), and of W^Q, W^K, W^V, W^O
/// (`[out, in]`, as the weights) and their biases, where the layer has them (W^K and W^V:
/// not on the cached path). A layer that reads one source for key and value (a decoder
/// reading an encoder) adds `d_key` and `d_value` for the source's gradient.
#[derive(Debug)]
pub struct LayerGrads {
    /// ∂/∂query.
    pub d_query: Tensor,
    /// ∂/∂key (∂/∂K of the cache on the cached path).
    pub d_key: Tensor,
    /// ∂/∂value (∂/∂V of the cache on the cached path).
    pub d_value: Tensor,
    /// ∂/∂W^Q, W^K, W^V, W^O.
    pub d_weights: [Option<Tensor>; 4],
    /// ∂/∂b_q, b_k, b_v, b_o.
    pub d_biases: [Option<Tensor>; 4],
}

impl MultiHeadAttention {
    /// The gradients of `forward(query, key, value, opts)` for the gradient `d_out` of its
    /// output (`[batch, M, embed_dim]`, f32): one program that recomputes the projections and
    /// the attention (nothing of the forward call is kept, as activation checkpointing does),
    /// then runs W^O's backward, the attention's backward ([`crate::Engine::attention_backward`])
    /// and the projections' backward on the device; every sum in f32, whatever the types of
    /// the inputs and weights. Weights and statistics asked for in `opts` are ignored.
    pub fn backward(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        d_out: &Tensor,
        opts: &MhaOptions,
    ) -> Result<LayerGrads> {
        let source = self.raw_source(key, value)?;
        self.bind_backward(query, source, d_out, opts, Scratch::Pool)?
            .finish()
    }

    /// [`MultiHeadAttention::backward`] validated, planned and bound once.
    pub fn prepare_backward(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        d_out: &Tensor,
        opts: &MhaOptions,
    ) -> Result<Prepared<LayerGrads>> {
        let source = self.raw_source(key, value)?;
        self.bind_backward(query, source, d_out, opts, Scratch::Own)
    }

    /// [`MultiHeadAttention::backward`] of `forward_cached`: K and V come from `cache`, so
    /// `d_key` and `d_value` are the gradients of the cache's K and V, and W^K, W^V (and
    /// their biases) get none.
    pub fn backward_cached(
        &self,
        query: &Tensor,
        cache: &SourceCache,
        d_out: &Tensor,
        opts: &MhaOptions,
    ) -> Result<LayerGrads> {
        let source = self.cached_source(cache)?;
        self.bind_backward(query, source, d_out, opts, Scratch::Pool)?
            .finish()
    }

    fn bind_backward(
        &self,
        query: &Tensor,
        source: Source,
        d_out: &Tensor,
        opts: &MhaOptions,
        scratch: Scratch,
    ) -> Result<Prepared<LayerGrads>> {
        let c = self.config;
        let (batch, n) = match source {
            Source::Raw { key, .. } => (key.dims()[0], key.dims()[1]),
            Source::Cached(cache) => (cache.batch, cache.n),
        };
        let [_, m, _] = dims3(query, "query", [Some(batch), None, Some(c.embed_dim)])?;
        dims3(d_out, "d_out", [Some(batch), Some(m), Some(c.embed_dim)])?;
        if d_out.dtype() != DType::F32 {
            return Err(Error::Unsupported(format!(
                "d_out is {}; the layer's backward reads the output's gradient in f32",
                d_out.dtype()
            )));
        }
        if let Source::Raw { key, value } = source {
            if key.dtype() != query.dtype() || value.dtype() != query.dtype() {
                return Err(Error::Argument(format!(
                    "query is {} but key and value are {} and {}; a layer reads them as one type",
                    query.dtype(),
                    key.dtype(),
                    value.dtype()
                )));
            }
        }
        let shape = c.attn_shape(batch, m, n);
        let attention = opts.attention_for(batch, n)?;
        let req = Request {
            weights: false,
            stats: Stats::default(),
            pool: None,
            out_dtype: DType::F32,
            ..attention.request(shape)?
        };
        let cached = matches!(source, Source::Cached(_));
        let plan = layer_backward_program(
            &c,
            &req,
            (cached, self.has_biases()),
            (query.dtype(), self.dtype()),
            self.engine.caps(),
        )?;
        let ctx = self.engine.context();
        let (key, value) = match source {
            Source::Raw { key, value } => (key, value),
            Source::Cached(cache) => (&cache.k, &cache.v),
        };
        let mut d_weights: [Option<Tensor>; 4] = Default::default();
        let mut d_biases: [Option<Tensor>; 4] = Default::default();
        for (i, [dw, db]) in plan.d_params.iter().enumerate() {
            if dw.is_some() {
                d_weights[i] = Some(Tensor::empty(ctx, "d_weight", self.weights[i].dims())?);
            }
            if let (Some(_), Some(b)) = (db, &self.biases[i]) {
                d_biases[i] = Some(Tensor::empty(ctx, "d_bias", b.dims())?);
            }
        }
        let grads = LayerGrads {
            d_query: Tensor::empty(ctx, "d_query", query.dims())?,
            d_key: Tensor::empty(ctx, "d_key", key.dims())?,
            d_value: Tensor::empty(ctx, "d_value", value.dims())?,
            d_weights,
            d_biases,
        };
        let masks = self.engine.mask_inputs(&shape, attention.masking())?;
        let mut tensors: Bindings = HashMap::from([
            (plan.query, query),
            (plan.source[0], key),
            (plan.source[1], value),
            (plan.d_out, d_out),
            (plan.d_inputs[0], &grads.d_query),
            (plan.d_inputs[1], &grads.d_key),
            (plan.d_inputs[2], &grads.d_value),
        ]);
        masks.bind(plan.masks, &mut tensors);
        self.bind_params(&plan.params, &mut tensors);
        for (i, [dw, db]) in plan.d_params.iter().enumerate() {
            if let (Some(id), Some(t)) = (dw, &grads.d_weights[i]) {
                tensors.insert(*id, t);
            }
            if let (Some(id), Some(t)) = (db, &grads.d_biases[i]) {
                tensors.insert(*id, t);
            }
        }
        let bound = self.engine.bind_program(&plan.program, &tensors, scratch)?;
        drop(tensors);
        Ok(Prepared::new(ctx, bound, None, grads))
    }
}
