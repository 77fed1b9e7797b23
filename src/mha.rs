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

use crate::dtype::DType;
use crate::engine::{Attention, Engine};
use crate::error::{Error, Result};
use crate::gpu::executor::Bindings;
use crate::gpu::tensor::Tensor;
use crate::plan::{self, AttnIo, DeviceCaps, Path, Request};
use crate::program::{BufferId, Program};
use crate::shape::{AttnShape, F32};
use crate::stats::StatsOutput;

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
    /// Ties source caches to this layer's (immutable) weights.
    id: u64,
    /// W^Q, W^K, W^V, W^O in that order, `[out, in]`.
    weights: [Tensor; 4],
    /// Biases in the same order, where a projection has one.
    biases: [Option<Tensor>; 4],
    /// Bound in place of a missing bias (bindings cannot be empty).
    no_bias: Tensor,
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

const PROJS: [Proj; 4] = [Proj::Q, Proj::K, Proj::V, Proj::O];

fn f32_bytes(elems: usize) -> u64 {
    elems as u64 * F32
}

/// Declares each projection's weight and bias (one placeholder element where it has none).
fn declare_params(
    program: &mut Program,
    c: &MhaConfig,
    has_bias: [bool; 4],
    dtype: DType,
) -> [[BufferId; 2]; 4] {
    let (e, inner, kv) = (c.embed_dim, c.inner_dim, c.kv_dim());
    let sizes = [(inner, e), (kv, c.kdim), (kv, c.vdim), (e, inner)];
    let names = ["q", "k", "v", "o"];
    std::array::from_fn(|i| {
        let (out, inp) = sizes[i];
        [
            program.input(&format!("w_{}", names[i]), dtype.bytes(out * inp)),
            program.input(
                &format!("b_{}", names[i]),
                dtype.bytes(if has_bias[i] { out } else { 1 }),
            ),
        ]
    })
}

/// A layer forward as one program (see [`layer_program`]) and its buffers.
#[derive(Clone, Debug)]
pub struct LayerProgram {
    /// Projections, attention and output projection.
    pub program: Program,
    /// Query input `[batch, M, embed_dim]`.
    pub query: BufferId,
    /// Key and value: the raw inputs `[batch, N, kdim]` and `[batch, N, vdim]`, or a
    /// cache's projected K and V `[batch, N, kv_heads, head_dim]`.
    pub source: [BufferId; 2],
    /// Weight and bias of W^Q, W^K, W^V, W^O.
    pub params: [[BufferId; 2]; 4],
    /// The attention's lengths, mask and bias inputs.
    pub masks: [BufferId; 3],
    /// Layer output `[batch, M, embed_dim]`.
    pub out: BufferId,
    /// Weights per head `[batch, heads, M, N]` or averaged `[batch, M, N]`, as asked.
    pub weights: Option<BufferId>,
    /// Statistics and pooled P per head, as `req` asks.
    pub stats: plan::StatsIo,
    /// The same averaged over heads.
    pub mean_stats: plan::StatsIo,
    /// The attention's path.
    pub path: Path,
    /// The attention's tiling (for people).
    pub tiling: String,
}

/// Element types of a layer's forward pass. Projections, attention and W^O compute in f32
/// and keep their intermediates (projected Q, K, V, O and a cache's K, V) in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerTypes {
    /// Query, key and value inputs.
    pub input: DType,
    /// Weights and biases.
    pub weights: DType,
    /// The output.
    pub out: DType,
}

/// The forward program of a layer with sizes `c` for the attention `req` (its shape from
/// [`MhaConfig::attn_shape`], `req.weights` iff `need` asks for weights, f32 in and out):
/// Q (and, unless `cached`, K and V) projections, the attention on their outputs, weights
/// averaged over heads where asked, and W^O, with inputs, weights and output of `types`.
pub fn layer_program(
    c: &MhaConfig,
    req: &Request,
    (cached, need, has_bias): (bool, NeedWeights, [bool; 4]),
    types: LayerTypes,
    caps: &DeviceCaps,
) -> Result<LayerProgram> {
    assert_eq!(
        (req.dtype, req.out_dtype),
        (DType::F32, DType::F32),
        "the layer's attention runs on its f32 projections"
    );
    let s = req.shape;
    let (batch, m, n) = (s.batch, s.m, s.n);
    let mut program = Program::new();
    let input = |elems| types.input.bytes(elems);
    let query = program.input("query", input(batch * m * c.embed_dim));
    let kv_bytes = f32_bytes(batch * n * c.kv_dim());
    let source = if cached {
        [
            program.input("cached_k", kv_bytes),
            program.input("cached_v", kv_bytes),
        ]
    } else {
        [
            program.input("key", input(batch * n * c.kdim)),
            program.input("value", input(batch * n * c.vdim)),
        ]
    };
    let params = declare_params(&mut program, c, has_bias, types.weights);
    let [lens, mask, bias] = plan::mask_input_bytes(&s, &req.masks);
    let masks = [
        program.input("lens", lens),
        program.input("mask", mask),
        program.input("bias", bias),
    ];
    let out_elems = batch * m * c.embed_dim;
    let out = program.output("out", types.out.bytes(out_elems));
    let p_bytes = f32_bytes(s.weights_dims().iter().product());
    let (p, weights) = match need {
        NeedWeights::None => (None, None),
        NeedWeights::PerHead => {
            let w = program.output("weights", p_bytes);
            (Some(w), Some(w))
        }
        NeedWeights::Averaged => (
            Some(program.scratch("weights_per_head", p_bytes)),
            Some(program.output("mean_weights", f32_bytes(batch * m * n))),
        ),
    };
    let rows_q = batch * m;
    let q_bytes = f32_bytes(rows_q * c.inner_dim);
    let io = AttnIo {
        q: program.scratch("q", q_bytes),
        k: if cached {
            source[0]
        } else {
            program.scratch("k", kv_bytes)
        },
        v: if cached {
            source[1]
        } else {
            program.scratch("v", kv_bytes)
        },
        lens: masks[0],
        mask: masks[1],
        bias: masks[2],
        o: program.scratch("o", q_bytes),
        lse: program.scratch("lse", f32_bytes(s.lse_dims().iter().product())),
        weights: p,
        stats: plan::StatsIo::declare(&mut program, "", &s, req.stats, req.pool),
    };
    // Averaged over heads: the sizes of one head.
    let one_head = AttnShape {
        q_heads: 1,
        kv_heads: 1,
        ..s
    };
    let mean_stats = plan::StatsIo::declare(&mut program, "mean_", &one_head, req.stats, req.pool);
    let proj = |program: &mut Program, i: usize, dims, x, (y, x_type)| {
        let [w, b] = params[i];
        let dtypes = (x_type, types.weights);
        plan::linear(program, dims, [x, w, b, y], dtypes, has_bias[i], caps)
    };
    let x_in = types.input;
    proj(
        &mut program,
        0,
        (rows_q, c.embed_dim, c.inner_dim),
        query,
        (io.q, x_in),
    )?;
    if !cached {
        proj(
            &mut program,
            1,
            (batch * n, c.kdim, c.kv_dim()),
            source[0],
            (io.k, x_in),
        )?;
        proj(
            &mut program,
            2,
            (batch * n, c.vdim, c.kv_dim()),
            source[1],
            (io.v, x_in),
        )?;
    }
    let plan::Planned { path, tiling, .. } = plan::attention(req, caps, &mut program, &io)?;
    if let (NeedWeights::Averaged, Some(p), Some(mean)) = (need, p, weights) {
        plan::mean_heads(&mut program, &s, [p, mean], caps)?;
    }
    // Each statistic [batch, heads, rows, cols] averaged over heads by the same kernel.
    let (gr, gc) = req.pool.map_or((0, 0), |p| p.grid(m, n));
    let stat_dims = [(m, 1), (m, 1), (1, n), (gr, gc)];
    let per_head = io.stats.named().into_iter().zip(mean_stats.named());
    for (((_, from), (_, to)), (rows, cols)) in per_head.zip(stat_dims) {
        if let (Some(from), Some(to)) = (from, to) {
            let grid = AttnShape {
                m: rows,
                n: cols,
                ..s
            };
            plan::mean_heads(&mut program, &grid, [from, to], caps)?;
        }
    }
    // W^O writes f32; a half output is packed from scratch.
    let out32 = if types.out == DType::F32 {
        out
    } else {
        program.scratch("out_f32", f32_bytes(out_elems))
    };
    proj(
        &mut program,
        3,
        (rows_q, c.inner_dim, c.embed_dim),
        io.o,
        (out32, DType::F32),
    )?;
    if out32 != out {
        plan::pack(&mut program, out_elems, types.out, [out32, out], caps)?;
    }
    plan::check_loops(&program, caps)?;
    Ok(LayerProgram {
        program,
        query,
        source,
        params,
        masks,
        out,
        weights,
        stats: io.stats,
        mean_stats,
        path,
        tiling: format!("projections: 64×64 linear tiles; attention: {tiling}"),
    })
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
        let mut w = Vec::with_capacity(4);
        let mut b = Vec::with_capacity(4);
        for (i, proj) in PROJS.iter().enumerate() {
            let (data, bias) = weights.get(*proj);
            w.push(Tensor::upload_as(
                ctx,
                "layer_weight",
                data,
                &shapes[i],
                dtype,
            )?);
            b.push(
                bias.map(|bias| Tensor::upload_as(ctx, "layer_bias", bias, &[bias.len()], dtype))
                    .transpose()?,
            );
        }
        Ok(Self {
            engine: engine.clone(),
            config,
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            weights: w.try_into().expect("four projections"),
            biases: b.try_into().expect("four projections"),
            no_bias: Tensor::upload_as(ctx, "no_bias", &[0.0], &[1], dtype)?,
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

    fn has_biases(&self) -> [bool; 4] {
        self.biases.each_ref().map(Option::is_some)
    }

    fn bind_params<'a>(&'a self, ids: &[[BufferId; 2]; 4], tensors: &mut Bindings<'a>) {
        for (i, [w, b]) in ids.iter().enumerate() {
            tensors.insert(*w, &self.weights[i]);
            tensors.insert(*b, self.biases[i].as_ref().unwrap_or(&self.no_bias));
        }
    }

    /// Projects a source once: K from `key [batch, N, kdim]`, V from `value [batch, N, vdim]`.
    pub fn project_source(&self, key: &Tensor, value: &Tensor) -> Result<SourceCache> {
        let c = &self.config;
        let [batch, n, _] = dims3(key, "key", [None, None, Some(c.kdim)])?;
        dims3(value, "value", [Some(batch), Some(n), Some(c.vdim)])?;
        let caps = self.engine.caps();
        let has_bias = self.has_biases();
        let mut program = Program::new();
        let x_type = source_type(key, value)?;
        let key_in = program.input("key", x_type.bytes(batch * n * c.kdim));
        let value_in = program.input("value", x_type.bytes(batch * n * c.vdim));
        let params = declare_params(&mut program, c, has_bias, self.dtype());
        let kv_bytes = f32_bytes(batch * n * c.kv_dim());
        let k_out = program.output("cached_k", kv_bytes);
        let v_out = program.output("cached_v", kv_bytes);
        for (i, x, y, in_dim) in [(1, key_in, k_out, c.kdim), (2, value_in, v_out, c.vdim)] {
            let [w, b] = params[i];
            plan::linear(
                &mut program,
                (batch * n, in_dim, c.kv_dim()),
                [x, w, b, y],
                (x_type, self.dtype()),
                has_bias[i],
                caps,
            )?;
        }
        let kv = [batch, n, c.kv_heads, c.head_dim()];
        let ctx = self.engine.context();
        let cache = SourceCache {
            layer_id: self.id,
            batch,
            n,
            k: Tensor::empty(ctx, "cached_k", &kv)?,
            v: Tensor::empty(ctx, "cached_v", &kv)?,
        };
        let mut tensors: Bindings = HashMap::from([
            (key_in, key),
            (value_in, value),
            (k_out, &cache.k),
            (v_out, &cache.v),
        ]);
        self.bind_params(&params, &mut tensors);
        self.engine.execute(&program, &tensors)?;
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
        let masks = self
            .engine
            .upload_mask_inputs(&shape, &req.masks, &attention)?;
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
        let [lens, mask, bias] = layer.masks;
        let mut tensors: Bindings = HashMap::from([
            (layer.query, query),
            (layer.source[0], key),
            (layer.source[1], value),
            (lens, masks.lens()),
            (mask, masks.mask()),
            (bias, masks.bias()),
            (layer.out, &out),
        ]);
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
        Ok(PreparedLayer {
            call: self.engine.bind_program(&layer.program, &tensors)?,
            output: MhaOutput {
                out,
                weights,
                stats,
                mean_stats,
            },
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
