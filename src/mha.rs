//! Multi-head (cross-)attention as a layer: `Q = X_q·W^Qᵀ + b_q`, `K = X_s·W^Kᵀ + b_k`,
//! `V = X_s·W^Vᵀ + b_v`, attention per head, heads concatenated and projected by W^O.
//!
//! Compatible with PyTorch `nn.MultiheadAttention(batch_first=True)` and the cross-attention of
//! Hugging Face (Whisper, BART, T5) and diffusers models (weights in their state-dict names; see
//! [`weights`]). Inputs are batch-first: query `[batch, M, embed_dim]`, key `[batch, N, kdim]`,
//! value `[batch, N, vdim]`; the output is `[batch, M, embed_dim]`. Q, K and V are projected to
//! the inner width (`heads · head_dim`, E unless set: T5 v1.1 and some diffusers blocks differ)
//! and W^O projects the heads back to E. The projections run on the GPU
//! (one `linear` dispatch per matrix, all heads at once) and write `[batch, seq, heads, d]`,
//! the layout attention reads, so nothing returns to the host between them. Self-attention is
//! the same layer with query = key = value.
//!
//! A [`SourceCache`] holds a source projected once into K/V (an encoder output, a text prompt)
//! for any number of forward calls: decoder steps, diffusion steps.

mod backward;
mod config;
pub mod reference;
pub mod weights;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::call::Prepared;
use crate::dtype::DType;
use crate::engine::{Attention, Engine, Scratch};
use crate::error::{Error, Result};
use crate::gpu::executor::Bindings;
use crate::gpu::tensor::Tensor;
use crate::plan::check::check_loops;
use crate::plan::layer::{declare_params, layer_program, linear, LayerTypes};
use crate::plan::request::Request;
use crate::program::{BufferId, Program};
use crate::shape::F32;
use crate::stats::StatsOutput;

pub use backward::LayerGrads;
pub use config::{MhaConfig, NeedWeights};
pub use weights::MhaWeights;

/// Options of one forward call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MhaOptions {
    /// Masks, lengths, logit controls, scale and path of the attention inside (its
    /// `with_weights` is ignored: `need_weights` decides).
    pub attention: Attention,
    /// PyTorch-style key padding mask `[batch, N]`, `true` = ignore the key.
    pub key_padding_mask: Option<Vec<bool>>,
    /// Which weights to return.
    pub need_weights: NeedWeights,
}

impl MhaOptions {
    /// Masks and other attention options (see [`crate::mask`]); the default scale is
    /// `1/√head_dim`, as in PyTorch.
    pub fn with_attention(mut self, attention: Attention) -> Self {
        self.attention = attention;
        self
    }
    /// PyTorch's `key_padding_mask`: bool `[batch, N]`, **`true` = ignore** (the opposite of
    /// [`Attention::with_mask`]; converted here). Cannot be combined with a bool mask in
    /// `attention`.
    pub fn with_key_padding_mask(mut self, mask: Vec<bool>) -> Self {
        self.key_padding_mask = Some(mask);
        self
    }
    /// Return attention weights.
    pub fn with_need_weights(mut self, need: NeedWeights) -> Self {
        self.need_weights = need;
        self
    }
}

impl MhaOptions {
    /// The attention options for a batch over N keys, with the key padding mask folded in as
    /// a bool mask `[batch, 1, 1, N]` (borrowed as they are when there is none).
    pub fn attention_for(&self, batch: usize, n: usize) -> Result<Cow<'_, Attention>> {
        let Some(kpm) = &self.key_padding_mask else {
            return Ok(Cow::Borrowed(&self.attention));
        };
        if self.attention.masking().mask.is_some() {
            return Err(Error::Unsupported(
                "a key padding mask and a bool mask together: fold them into one bool mask".into(),
            ));
        }
        if kpm.len() != batch * n {
            return Err(Error::Shape(format!(
                "key_padding_mask has {} elements; it must be [batch, N] = [{batch}, {n}]",
                kpm.len()
            )));
        }
        let keep = kpm.iter().map(|&ignore| !ignore).collect();
        Ok(Cow::Owned(
            self.attention.clone().with_mask([batch, 1, 1, n], keep),
        ))
    }
}

/// Results of a forward call, on the device.
#[derive(Debug)]
pub struct MhaOutput {
    /// `[batch, M, embed_dim]`.
    pub out: Tensor,
    /// `[batch, M, N]` (averaged) or `[batch, num_heads, M, N]` (per head), when requested.
    pub weights: Option<Tensor>,
    /// Statistics and pooled P per head, as the attention options ask
    /// ([`Attention::with_stats`], [`Attention::with_pooled_weights`]).
    pub stats: StatsOutput<Tensor>,
    /// The same averaged over heads: entropy and focus `[batch, M]`, coverage `[batch, N]`,
    /// the pooled map `[batch, rows, cols]` (the mean of the heads' maps).
    pub mean_stats: StatsOutput<Tensor>,
}

/// A source projected by one layer into K `[batch, N, kv_heads, head_dim]` and V (same),
/// reusable for any number of forward calls of that layer.
#[derive(Debug)]
pub struct SourceCache {
    layer_id: u64,
    batch: usize,
    n: usize,
    k: Tensor,
    v: Tensor,
}

impl SourceCache {
    /// Batch and source length `(batch, N)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.batch, self.n)
    }
    /// Projected K `[batch, N, kv_heads, head_dim]`.
    pub fn k(&self) -> &Tensor {
        &self.k
    }
    /// Projected V `[batch, N, kv_heads, head_dim]`.
    pub fn v(&self) -> &Tensor {
        &self.v
    }
}

static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(1);

/// A multi-head attention layer with its weights on one device.
#[derive(Debug)]
pub struct MultiHeadAttention {
    engine: Engine,
    config: MhaConfig,
    /// Ties source caches to this layer's weights: a new id whenever they change.
    id: u64,
    /// W^Q, W^K, W^V, W^O in that order, `[out, in]`.
    weights: [Tensor; 4],
    /// Biases in the same order, where a projection has one.
    biases: [Option<Tensor>; 4],
}

/// The four projections of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    /// W^Q.
    Q,
    /// W^K.
    K,
    /// W^V.
    V,
    /// W^O.
    O,
}

impl Proj {
    /// The four, in index order.
    pub const ALL: [Proj; 4] = [Proj::Q, Proj::K, Proj::V, Proj::O];
}

fn f32_bytes(elems: usize) -> u64 {
    elems as u64 * F32
}

/// The one type of a source's key and value.
fn source_type(key: &Tensor, value: &Tensor) -> Result<DType> {
    if key.dtype() != value.dtype() {
        return Err(Error::Argument(format!(
            "key is {} but value is {}; a layer reads them as one type",
            key.dtype(),
            value.dtype()
        )));
    }
    Ok(key.dtype())
}

fn dims3(t: &Tensor, name: &str, want: [Option<usize>; 3]) -> Result<[usize; 3]> {
    let dims: [usize; 3] = t.dims().try_into().map_err(|_| {
        Error::Shape(format!(
            "{name} must have 3 dims [batch, seq, features], got {:?}",
            t.dims()
        ))
    })?;
    for (axis, (&got, want)) in dims.iter().zip(want).enumerate() {
        if let Some(w) = want.filter(|&w| w != got) {
            return Err(Error::Shape(format!(
                "{name} has dims {dims:?}: axis {axis} must be {w}"
            )));
        }
    }
    Ok(dims)
}

impl MultiHeadAttention {
    /// A layer with `weights` (host slices in PyTorch `Linear` layout) uploaded to `engine`'s
    /// device in f32.
    pub fn new(engine: &Engine, config: MhaConfig, weights: &MhaWeights) -> Result<Self> {
        Self::new_as(engine, config, weights, DType::F32)
    }

    /// [`MultiHeadAttention::new`] keeping the weights in `dtype` on the device (rounded to
    /// nearest once; exact for weights that came from a file of that type): f16 or bf16
    /// halve their memory, and the projections read them as stored, accumulating in f32.
    pub fn new_as(
        engine: &Engine,
        config: MhaConfig,
        weights: &MhaWeights,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        weights.check(&config)?;
        let ctx = engine.context();
        let (e, inner) = (config.embed_dim, config.inner_dim);
        let shapes = [
            [inner, e],
            [config.kv_dim(), config.kdim],
            [config.kv_dim(), config.vdim],
            [e, inner],
        ];
        let (weights, biases) = weights.upload(ctx, shapes, dtype)?;
        Ok(Self {
            engine: engine.clone(),
            config,
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            weights,
            biases,
        })
    }

    /// A layer whose weights come from a safetensors file: the names under `prefix` of one of
    /// the families [`weights::Names`] lists, detected; biases where the file has them (none
    /// with `config.bias = false`). See [`weights`]. Needs the `safetensors` feature (on by
    /// default).
    #[cfg(feature = "safetensors")]
    pub fn from_safetensors(
        engine: &Engine,
        config: MhaConfig,
        path: &std::path::Path,
        prefix: &str,
    ) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Weights(format!("cannot read {}: {e}", path.display())))?;
        let weights = MhaWeights::from_safetensors(&bytes, prefix, &config)?;
        Self::new(engine, config, &weights)
    }

    /// The layer's sizes.
    pub fn config(&self) -> &MhaConfig {
        &self.config
    }

    /// The type the weights are kept in.
    pub fn dtype(&self) -> DType {
        self.weights[0].dtype()
    }

    /// Overwrites the layer's weights in place with `weights` (host slices in PyTorch `Linear`
    /// layout, rounded to the layer's [`MultiHeadAttention::dtype`]): what a training step
    /// does after its update. The sizes and the set of biases must be the layer's. Like
    /// [`Tensor::write`] it does not wait; work submitted afterwards sees the new weights,
    /// including calls prepared before ([`MultiHeadAttention::prepare`],
    /// [`MultiHeadAttention::prepare_backward`]), which read the weights as they are at each
    /// run. A [`SourceCache`] projected before is refused afterwards (its K/V came from the
    /// old weights): project the source again. A call prepared with
    /// [`MultiHeadAttention::prepare_cached`] keeps reading the cache it was bound to.
    pub fn set_weights(&mut self, weights: &MhaWeights) -> Result<()> {
        weights.check(&self.config)?;
        for (i, proj) in Proj::ALL.iter().enumerate() {
            if weights.get(*proj).1.is_some() != self.biases[i].is_some() {
                return Err(Error::Argument(format!(
                    "set_weights: the layer's {proj:?} projection {} a bias; new weights must \
                     have the same biases",
                    if self.biases[i].is_some() {
                        "has"
                    } else {
                        "has no"
                    }
                )));
            }
        }
        weights.write_into((&self.weights, &self.biases))?;
        self.id = NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn has_biases(&self) -> [bool; 4] {
        self.biases.each_ref().map(Option::is_some)
    }

    fn bind_params<'a>(&'a self, ids: &[[BufferId; 2]; 4], tensors: &mut Bindings<'a>) {
        for (i, [w, b]) in ids.iter().enumerate() {
            tensors.insert(*w, &self.weights[i]);
            if let Some(bias) = &self.biases[i] {
                tensors.insert(*b, bias);
            }
        }
    }

    /// Projects a source once: K from `key [batch, N, kdim]`, V from `value [batch, N, vdim]`.
    pub fn project_source(&self, key: &Tensor, value: &Tensor) -> Result<SourceCache> {
        let c = &self.config;
        let [batch, n, _] = dims3(key, "key", [None, None, Some(c.kdim)])?;
        dims3(value, "value", [Some(batch), Some(n), Some(c.vdim)])?;
        source_type(key, value)?;
        let kv = [batch, n, c.kv_heads, c.head_dim()];
        let [k, v] = self
            .project(&[(Proj::K, key, &kv), (Proj::V, value, &kv)])?
            .try_into()
            .expect("two projections");
        Ok(SourceCache {
            layer_id: self.id,
            batch,
            n,
            k,
            v,
        })
    }

    /// `x·Wᵀ + b` on the device for each `(projection, x, dims of the result)` (x's last axis
    /// the projection's input width), in one program; the results are f32. What a sharded
    /// layer runs piece by piece where each piece lives ([`crate::shard::ShardedLayer`]).
    pub(crate) fn project(&self, jobs: &[(Proj, &Tensor, &[usize])]) -> Result<Vec<Tensor>> {
        let caps = self.engine.caps();
        let has_bias = self.has_biases();
        let mut program = Program::new();
        let params = declare_params(&mut program, &self.config, has_bias, self.dtype());
        let ctx = self.engine.context();
        let (mut ids, mut outs) = (Vec::new(), Vec::new());
        for &(proj, x, dims) in jobs {
            let i = proj as usize;
            let [out_dim, in_dim] = [self.weights[i].dims()[0], self.weights[i].dims()[1]];
            let rows = x.len() / in_dim;
            if x.dims().last() != Some(&in_dim) || dims.iter().product::<usize>() != rows * out_dim
            {
                return Err(Error::Shape(format!(
                    "the {proj:?} projection reads [.., {in_dim}] and writes {out_dim} per row; \
                     got {:?} into {dims:?}",
                    x.dims()
                )));
            }
            let x_in = program.input("projected_in", x.dtype().bytes(x.len()));
            let y = program.output("projected", f32_bytes(rows * out_dim));
            let [w, b] = params[i];
            linear(
                &mut program,
                (rows, in_dim, out_dim),
                [x_in, w, b, y],
                (x.dtype(), self.dtype()),
                has_bias[i],
                caps,
            )?;
            ids.push((x_in, y));
            outs.push(Tensor::empty(ctx, "projected", dims)?);
        }
        check_loops(&program, caps)?;
        let mut tensors: Bindings = HashMap::new();
        for ((x_in, y), (&(_, x, _), out)) in ids.into_iter().zip(jobs.iter().zip(&outs)) {
            tensors.insert(x_in, x);
            tensors.insert(y, out);
        }
        self.bind_params(&params, &mut tensors);
        self.engine.execute(&program, &tensors)?;
        Ok(outs)
    }

    /// `forward(query, key, value)`: query `[batch, M, embed_dim]`, key `[batch, N, kdim]`,
    /// value `[batch, N, vdim]` → `[batch, M, embed_dim]` (and weights if requested).
    pub fn forward(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        opts: &MhaOptions,
    ) -> Result<MhaOutput> {
        let source = self.raw_source(key, value)?;
        self.prepare_forward(query, source, opts, Scratch::Pool)?
            .finish()
    }

    /// [`MultiHeadAttention::forward`] validated, planned and bound once: the projections,
    /// the attention and the output projection run again with no allocation, reading
    /// `query`, `key` and `value` as they are at each run.
    pub fn prepare(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        opts: &MhaOptions,
    ) -> Result<PreparedLayer> {
        let source = self.raw_source(key, value)?;
        self.prepare_forward(query, source, opts, Scratch::Own)
    }

    /// [`MultiHeadAttention::forward`] reading K/V from a cache this layer projected. Equal to
    /// `forward` with the cached key and value.
    pub fn forward_cached(
        &self,
        query: &Tensor,
        cache: &SourceCache,
        opts: &MhaOptions,
    ) -> Result<MhaOutput> {
        let source = self.cached_source(cache)?;
        self.prepare_forward(query, source, opts, Scratch::Pool)?
            .finish()
    }

    /// [`MultiHeadAttention::forward_cached`] prepared once (see
    /// [`MultiHeadAttention::prepare`]): a decoder step that writes the next query into
    /// `query` and runs again.
    pub fn prepare_cached(
        &self,
        query: &Tensor,
        cache: &SourceCache,
        opts: &MhaOptions,
    ) -> Result<PreparedLayer> {
        let source = self.cached_source(cache)?;
        self.prepare_forward(query, source, opts, Scratch::Own)
    }

    /// The raw key `[batch, N, kdim]` and value `[batch, N, vdim]` as a source.
    fn raw_source<'a>(&self, key: &'a Tensor, value: &'a Tensor) -> Result<Source<'a>> {
        let c = &self.config;
        let [batch, n, _] = dims3(key, "key", [None, None, Some(c.kdim)])?;
        dims3(value, "value", [Some(batch), Some(n), Some(c.vdim)])?;
        Ok(Source::Raw { key, value })
    }

    /// A cache as a source, if this layer projected it.
    fn cached_source<'a>(&self, cache: &'a SourceCache) -> Result<Source<'a>> {
        if cache.layer_id != self.id {
            return Err(Error::Argument(format!(
                "this source cache was projected by layer #{}, not by this layer (#{}): \
                 K/V projected with other weights would give wrong results",
                cache.layer_id, self.id
            )));
        }
        Ok(Source::Cached(cache))
    }

    fn prepare_forward(
        &self,
        query: &Tensor,
        source: Source,
        opts: &MhaOptions,
        scratch: Scratch,
    ) -> Result<PreparedLayer> {
        let c = self.config;
        let (batch, n) = match source {
            Source::Raw { key, .. } => (key.dims()[0], key.dims()[1]),
            Source::Cached(cache) => (cache.batch, cache.n),
        };
        let [_, m, _] = dims3(query, "query", [Some(batch), None, Some(c.embed_dim)])?;
        let shape = c.attn_shape(batch, m, n);
        let attention = opts.attention_for(batch, n)?;
        let need = opts.need_weights;
        let req = Request {
            weights: need != NeedWeights::None,
            out_dtype: DType::F32,
            ..attention.request(shape)?
        };
        if let Source::Raw { key, value } = source {
            let source = source_type(key, value)?;
            if source != query.dtype() {
                return Err(Error::Argument(format!(
                    "query is {} but key and value are {source}; a layer reads them as one type",
                    query.dtype()
                )));
            }
        }
        let types = LayerTypes {
            input: query.dtype(),
            weights: self.dtype(),
            out: attention.out_dtype_for(query.dtype()),
        };
        let cached = matches!(source, Source::Cached(_));
        let layer = layer_program(
            &c,
            &req,
            (cached, need, self.has_biases()),
            types,
            self.engine.caps(),
        )?;
        let masks = self.engine.mask_inputs(&shape, attention.masking())?;
        let ctx = self.engine.context();
        let weights = match need {
            NeedWeights::None => None,
            NeedWeights::PerHead => {
                Some(Tensor::empty(ctx, "weights", &[batch, c.num_heads, m, n])?)
            }
            NeedWeights::Averaged => Some(Tensor::empty(ctx, "mean_weights", &[batch, m, n])?),
        };
        let out = Tensor::empty_as(ctx, "layer_out", &[batch, m, c.embed_dim], types.out)?;
        let (key, value) = match source {
            Source::Raw { key, value } => (key, value),
            Source::Cached(cache) => (&cache.k, &cache.v),
        };
        let mut tensors: Bindings = HashMap::from([
            (layer.query, query),
            (layer.source[0], key),
            (layer.source[1], value),
            (layer.out, &out),
        ]);
        masks.bind(layer.masks, &mut tensors);
        if let (Some(id), Some(w)) = (layer.weights, &weights) {
            tensors.insert(id, w);
        }
        let (stats, mean_stats) = (
            crate::engine::stats_outputs(ctx, &layer.stats, &shape, req.pool, false)?,
            crate::engine::stats_outputs(ctx, &layer.mean_stats, &shape, req.pool, true)?,
        );
        for (io, out) in [(&layer.stats, &stats), (&layer.mean_stats, &mean_stats)] {
            for ((_, id), (_, t)) in io.named().into_iter().zip(out.named()) {
                if let (Some(id), Some(t)) = (id, t) {
                    tensors.insert(id, t);
                }
            }
        }
        self.bind_params(&layer.params, &mut tensors);
        let bound = self
            .engine
            .bind_program(&layer.program, &tensors, scratch)?;
        drop(tensors);
        let output = MhaOutput {
            out,
            weights,
            stats,
            mean_stats,
        };
        Ok(Prepared::new(ctx, bound, None, output))
    }
}

/// A layer forward bound once ([`MultiHeadAttention::prepare`],
/// [`MultiHeadAttention::prepare_cached`]): [`Prepared`] with the layer's outputs.
pub type PreparedLayer = Prepared<MhaOutput>;

/// Where a forward call's K/V come from.
enum Source<'a> {
    Raw { key: &'a Tensor, value: &'a Tensor },
    Cached(&'a SourceCache),
}
