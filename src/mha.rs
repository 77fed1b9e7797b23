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

pub mod weights;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::{Attention, Engine};
use crate::error::{Error, Result};
use crate::gpu::tensor::Tensor;
use crate::plan::{linear_steps, mean_heads_step, LayerSlot, Plan, Proj, Request, Slot};
use crate::shape::{AttnShape, F32};

pub use weights::MhaWeights;

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
    /// [`weights`] then ignores the biases a file holds, and [`MhaWeights::check`] refuses
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

    fn validate(&self) -> Result<()> {
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
    /// Ties source caches to this layer's (immutable) weights.
    id: u64,
    /// W^Q, W^K, W^V, W^O in that order, `[out, in]`.
    weights: [Tensor; 4],
    /// Biases in the same order, where a projection has one.
    biases: [Option<Tensor>; 4],
    /// Bound in place of a missing bias (bindings cannot be empty).
    no_bias: Tensor,
}

const PROJS: [Proj; 4] = [Proj::Q, Proj::K, Proj::V, Proj::O];

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
    /// device.
    pub fn new(engine: &Engine, config: MhaConfig, weights: &MhaWeights) -> Result<Self> {
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
        let mut w = Vec::with_capacity(4);
        let mut b = Vec::with_capacity(4);
        for (i, proj) in PROJS.iter().enumerate() {
            let (data, bias) = weights.get(*proj);
            w.push(Tensor::upload(ctx, "layer_weight", data, &shapes[i])?);
            b.push(
                bias.map(|bias| Tensor::upload(ctx, "layer_bias", bias, &[bias.len()]))
                    .transpose()?,
            );
        }
        Ok(Self {
            engine: engine.clone(),
            config,
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            weights: w.try_into().expect("four projections"),
            biases: b.try_into().expect("four projections"),
            no_bias: Tensor::upload(ctx, "no_bias", &[0.0], &[1])?,
        })
    }

    /// A layer whose weights come from a safetensors file: the names under `prefix` of one of
    /// the families [`weights::Names`] lists, detected; biases where the file has them (none
    /// with `config.bias = false`). See [`weights`].
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

    fn proj_slots(&self, proj: Proj, x: Slot, y: Slot) -> [Slot; 4] {
        [
            x,
            Slot::Layer(LayerSlot::Weight(proj)),
            Slot::Layer(LayerSlot::Bias(proj)),
            y,
        ]
    }

    fn has_bias(&self, proj: Proj) -> bool {
        self.biases[proj as usize].is_some()
    }

    fn bind_weights<'a>(&'a self, slots: &mut HashMap<Slot, &'a Tensor>) {
        for (i, proj) in PROJS.iter().enumerate() {
            slots.insert(Slot::Layer(LayerSlot::Weight(*proj)), &self.weights[i]);
            let bias = self.biases[i].as_ref().unwrap_or(&self.no_bias);
            slots.insert(Slot::Layer(LayerSlot::Bias(*proj)), bias);
        }
    }

    /// Projects a source once: K from `key [batch, N, kdim]`, V from `value [batch, N, vdim]`.
    pub fn project_source(&self, key: &Tensor, value: &Tensor) -> Result<SourceCache> {
        let c = &self.config;
        let [batch, n, _] = dims3(key, "key", [None, None, Some(c.kdim)])?;
        dims3(value, "value", [Some(batch), Some(n), Some(c.vdim)])?;
        let caps = self.engine.caps();
        let mut steps = linear_steps(
            batch * n,
            c.kdim,
            c.kv_dim(),
            self.proj_slots(Proj::K, Slot::Layer(LayerSlot::Key), Slot::K),
            self.has_bias(Proj::K),
            caps,
        )?;
        steps.extend(linear_steps(
            batch * n,
            c.vdim,
            c.kv_dim(),
            self.proj_slots(Proj::V, Slot::Layer(LayerSlot::Value), Slot::V),
            self.has_bias(Proj::V),
            caps,
        )?);
        let kv = [batch, n, c.kv_heads, c.head_dim()];
        let ctx = self.engine.context();
        let cache = SourceCache {
            layer_id: self.id,
            batch,
            n,
            k: Tensor::empty(ctx, "cached_k", &kv)?,
            v: Tensor::empty(ctx, "cached_v", &kv)?,
        };
        let plan = Plan::steps_only(steps, "K and V projections");
        let mut slots = HashMap::from([
            (Slot::Layer(LayerSlot::Key), key),
            (Slot::Layer(LayerSlot::Value), value),
            (Slot::K, &cache.k),
            (Slot::V, &cache.v),
        ]);
        self.bind_weights(&mut slots);
        self.engine.execute(&plan, &slots)?;
        Ok(cache)
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
        self.prepare(query, key, value, opts)?.finish()
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
        let c = &self.config;
        let [batch, n, _] = dims3(key, "key", [None, None, Some(c.kdim)])?;
        dims3(value, "value", [Some(batch), Some(n), Some(c.vdim)])?;
        self.prepare_forward(query, Source::Raw { key, value }, batch, n, opts)
    }

    /// [`MultiHeadAttention::forward`] reading K/V from a cache this layer projected. Equal to
    /// `forward` with the cached key and value.
    pub fn forward_cached(
        &self,
        query: &Tensor,
        cache: &SourceCache,
        opts: &MhaOptions,
    ) -> Result<MhaOutput> {
        self.prepare_cached(query, cache, opts)?.finish()
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
        if cache.layer_id != self.id {
            return Err(Error::Argument(format!(
                "this source cache was projected by layer #{}, not by this layer (#{}): \
                 K/V projected with other weights would give wrong results",
                cache.layer_id, self.id
            )));
        }
        self.prepare_forward(query, Source::Cached(cache), cache.batch, cache.n, opts)
    }

    fn prepare_forward(
        &self,
        query: &Tensor,
        source: Source,
        batch: usize,
        n: usize,
        opts: &MhaOptions,
    ) -> Result<PreparedLayer> {
        let c = self.config;
        let [_, m, _] = dims3(query, "query", [Some(batch), None, Some(c.embed_dim)])?;
        let shape = c.attn_shape(batch, m, n);
        let attention = opts.attention_for(batch, n)?;
        let need = opts.need_weights;
        let req = Request {
            weights: need != NeedWeights::None,
            ..attention.request(shape)?
        };
        let caps = self.engine.caps();
        let attn = Plan::new(&req, caps)?;
        let masks = self.engine.upload_masks(&attn, &attention)?;

        let rows_q = batch * m;
        let mut steps = linear_steps(
            rows_q,
            c.embed_dim,
            c.inner_dim,
            self.proj_slots(Proj::Q, Slot::Layer(LayerSlot::Query), Slot::Q),
            self.has_bias(Proj::Q),
            caps,
        )?;
        let kv_bytes = (batch * n * c.kv_dim()) as u64 * F32;
        let mut scratch = vec![
            (Slot::Q, (rows_q * c.inner_dim) as u64 * F32),
            (Slot::O, (rows_q * c.inner_dim) as u64 * F32),
            (Slot::Lse, (batch * c.num_heads * m) as u64 * F32),
        ];
        if let Source::Raw { .. } = source {
            for (proj, x, y, in_dim) in [
                (Proj::K, LayerSlot::Key, Slot::K, c.kdim),
                (Proj::V, LayerSlot::Value, Slot::V, c.vdim),
            ] {
                steps.extend(linear_steps(
                    batch * n,
                    in_dim,
                    c.kv_dim(),
                    self.proj_slots(proj, Slot::Layer(x), y),
                    self.has_bias(proj),
                    caps,
                )?);
                scratch.push((y, kv_bytes));
            }
        }
        steps.extend(attn.steps.iter().cloned());
        scratch.extend(attn.scratch.iter().copied());
        let weights_bytes = (batch * c.num_heads * m * n) as u64 * F32;
        let ctx = self.engine.context();
        let weights = match need {
            NeedWeights::None => None,
            NeedWeights::PerHead => {
                Some(Tensor::empty(ctx, "weights", &[batch, c.num_heads, m, n])?)
            }
            NeedWeights::Averaged => {
                scratch.push((Slot::Weights, weights_bytes));
                steps.push(mean_heads_step(
                    &shape,
                    Slot::Weights,
                    Slot::Layer(LayerSlot::MeanWeights),
                    caps,
                )?);
                Some(Tensor::empty(ctx, "mean_weights", &[batch, m, n])?)
            }
        };
        steps.extend(linear_steps(
            rows_q,
            c.inner_dim,
            c.embed_dim,
            self.proj_slots(Proj::O, Slot::O, Slot::Layer(LayerSlot::Out)),
            self.has_bias(Proj::O),
            caps,
        )?);
        let out = Tensor::empty(ctx, "layer_out", &[batch, m, c.embed_dim])?;
        let plan = Plan {
            path: attn.path,
            shape,
            masks: attn.masks,
            steps,
            scratch,
            outputs: Vec::new(),
            tiling: format!(
                "projections: 64×64 linear tiles; attention: {}",
                attn.tiling
            ),
        };

        let mut slots: HashMap<Slot, &Tensor> = HashMap::from([
            (Slot::Layer(LayerSlot::Query), query),
            (Slot::Layer(LayerSlot::Out), &out),
            (Slot::Lens, masks.lens()),
            (Slot::MaskBits, masks.mask()),
            (Slot::Bias, masks.bias()),
        ]);
        match source {
            Source::Raw { key, value } => {
                slots.insert(Slot::Layer(LayerSlot::Key), key);
                slots.insert(Slot::Layer(LayerSlot::Value), value);
            }
            Source::Cached(cache) => {
                slots.insert(Slot::K, &cache.k);
                slots.insert(Slot::V, &cache.v);
            }
        }
        match (&weights, need) {
            (Some(w), NeedWeights::PerHead) => {
                slots.insert(Slot::Weights, w);
            }
            (Some(w), NeedWeights::Averaged) => {
                slots.insert(Slot::Layer(LayerSlot::MeanWeights), w);
            }
            _ => {}
        }
        self.bind_weights(&mut slots);
        Ok(PreparedLayer {
            call: self.engine.bind_plan(&plan, &slots)?,
            output: MhaOutput { out, weights },
        })
    }
}

/// A layer forward bound once ([`MultiHeadAttention::prepare`],
/// [`MultiHeadAttention::prepare_cached`]).
#[derive(Debug)]
pub struct PreparedLayer {
    call: crate::engine::Bound,
    output: MhaOutput,
}

impl PreparedLayer {
    /// Submits the forward pass and waits; reports any device error of this call.
    pub fn run(&self) -> Result<()> {
        self.call.run()
    }

    /// [`PreparedLayer::run`] as a future that does not block the awaiting thread.
    pub async fn run_async(&self) -> Result<()> {
        self.call.run_async().await
    }

    /// Records the forward pass into the caller's encoder; neither submits nor waits.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        self.call.encode(encoder);
    }

    /// The layer output `[batch, M, embed_dim]` (and weights, if requested), as of the last
    /// completed run.
    pub fn output(&self) -> &MhaOutput {
        &self.output
    }

    fn finish(self) -> Result<MhaOutput> {
        self.run()?;
        Ok(self.output)
    }
}

/// Where a forward call's K/V come from.
enum Source<'a> {
    Raw { key: &'a Tensor, value: &'a Tensor },
    Cached(&'a SourceCache),
}
