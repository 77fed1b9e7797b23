//! The public entry point: an [`Engine`] owns the pipeline cache and the planner for one device.

use std::collections::HashMap;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Instant;

use crate::call::Prepared;
use crate::dropout::Dropout;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::fused_config::{ConfigChoice, ConfigSource, FusedConfig, Tuned};
use crate::gpu::context::Context;
use crate::gpu::executor::{self, Bindings, GpuTimer};
use crate::gpu::pipelines::PipelineCache;
use crate::gpu::pool::BufferPool;
use crate::gpu::tensor::Tensor;
use crate::mask::{Alignment, Broadcast, KeySegment, Masking, Window};
use crate::plan::{self, DeviceCaps, MergePlan, Path, Plan, Request, StatsIo};
use crate::program::{BufferId, Program};
use crate::shape::{AttnShape, F32};
use crate::stats::{Pool, Stats, StatsOutput};
use crate::tune::{self, AdapterId, TuneCache, TuneKey};

/// Options of one attention call: scale, path, and the masks and logit controls of
/// [`crate::mask`] (where their semantics are spelled out).
///
/// ```
/// use xattn::{Alignment, Attention};
/// let opts = Attention::default()
///     .with_scale(0.125)
///     .with_causal(Alignment::BottomRight)
///     .with_kv_lens(vec![1500, 1200]);
/// assert_eq!(opts.scale_for(64), 0.125);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attention {
    scale: Option<f32>,
    weights: bool,
    path: Option<Path>,
    out_dtype: Option<DType>,
    stats: Stats,
    pool: Option<Pool>,
    masking: Masking,
    fused: Option<FusedConfig>,
    bias_grad: bool,
    grad_dtype: Option<DType>,
}

impl Attention {
    /// Multiplies the logits Q·Kᵀ by `scale` instead of the default `1/√d_k`. `|scale|`, and
    /// its product with every key segment's factor, must be at most
    /// [`LOGIT_FACTOR_MAX`](crate::mask::LOGIT_FACTOR_MAX) (1e30), else the call returns
    /// [`Error::Argument`].
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    /// Also return the attention weights P `[batch, q_heads, M, N]` (forces the three-pass path).
    pub fn with_weights(mut self) -> Self {
        self.weights = true;
        self
    }
    /// Also compute these statistics of the weights P (entropy, focus, coverage) on any path,
    /// without storing P: see [`crate::stats`]. Results in [`Output::stats`].
    pub fn with_stats(mut self, stats: Stats) -> Self {
        self.stats = stats;
        self
    }
    /// Also compute P pooled over blocks to at most `pool.max_side` values a side, on any
    /// path, without storing P (for heatmaps of long sequences). Result in
    /// `Output::stats.pooled`.
    pub fn with_pooled_weights(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }
    /// Forces a path instead of the planner's choice.
    pub fn with_path(mut self, path: Path) -> Self {
        self.path = Some(path);
        self
    }
    /// Runs the fused kernel (fused and split-K paths) with `config` instead of the planner's
    /// default or the autotuner's winner; every configuration computes the same attention
    /// (on matrix units with f16 inputs, the weights P are rounded to f16 for P·V). A
    /// configuration the kernel or the device does not have is an [`Error::Argument`] when
    /// planned.
    pub fn with_fused_config(mut self, config: FusedConfig) -> Self {
        self.fused = Some(config);
        self
    }
    /// Like [`Attention::with_path`], `None` restoring the planner's choice.
    pub fn with_path_choice(mut self, path: Option<Path>) -> Self {
        self.path = path;
        self
    }
    /// Causal mask: row i sees keys up to its diagonal, aligned as `align` says (no default:
    /// PyTorch and JAX align top-left, FlashAttention ≥ 2.1 bottom-right). Combines with a
    /// window of the same alignment.
    pub fn with_causal(mut self, align: Alignment) -> Self {
        self.masking.narrow_window(Window {
            align,
            left: None,
            right: Some(0),
        });
        self
    }
    /// Local window: row i sees keys `diag − left ..= diag + right` (see [`crate::mask`]).
    pub fn with_window(mut self, align: Alignment, left: usize, right: usize) -> Self {
        self.masking.narrow_window(Window {
            align,
            left: Some(left),
            right: Some(right),
        });
        self
    }
    /// Valid query rows per batch entry; rows at or past `q_lens[b]` output 0 and LSE −∞.
    pub fn with_q_lens(mut self, q_lens: Vec<u32>) -> Self {
        self.masking.q_lens = Some(q_lens);
        self
    }
    /// Valid keys per batch entry; keys at or past `kv_lens[b]` are ignored.
    pub fn with_kv_lens(mut self, kv_lens: Vec<u32>) -> Self {
        self.masking.kv_lens = Some(kv_lens);
        self
    }
    /// Bool mask, `true` = may attend, dims `[batch|1, q_heads|1, M|1, N]` row-major.
    pub fn with_mask(mut self, dims: [usize; 4], mask: Vec<bool>) -> Self {
        self.masking.mask = Some(Broadcast { dims, data: mask });
        self
    }
    /// Additive logit bias, dims `[batch|1, q_heads|1, M|1, N]` row-major; −∞, or any value
    /// ≤ −1e30, removes a key; values must not be NaN or above 1e30.
    pub fn with_bias(mut self, dims: [usize; 4], bias: Vec<f32>) -> Self {
        self.masking.bias = Some(Broadcast { dims, data: bias });
        self
    }
    /// Soft-caps logits: `cap·tanh(logit/cap)`, after the scale and segment factors, before
    /// the bias; `0 < cap ≤ 1e30`, computed to f32 accuracy over that whole range.
    pub fn with_softcap(mut self, cap: f32) -> Self {
        self.masking.softcap = Some(cap);
        self
    }
    /// Multiplies the logits of keys `start..end` by `factor` (at most four disjoint segments).
    pub fn with_key_segment(mut self, start: usize, end: usize, factor: f32) -> Self {
        self.masking
            .segments
            .push(KeySegment { start, end, factor });
        self
    }
    /// Computes the block `block` of a longer call: this call's Q rows and K/V keys are rows
    /// and keys of longer sequences, and its lengths, causal and window diagonals and key
    /// segments are the longer call's; its mask and bias cover this call's rows and keys (see
    /// [`crate::mask::Block`]). A shard of a sharded call ([`crate::shard`]) is such a block;
    /// its O and LSE merge exactly with the other blocks' ([`Engine::merge`]).
    pub fn with_block(mut self, block: crate::mask::Block) -> Self {
        self.masking.block = Some(block);
        self
    }
    /// Drops each attention weight with probability `p` (`0 ≤ p < 1`) and scales the kept
    /// ones by `1/(1 − p)`, from a counter-based RNG keyed by `seed` and `offset`: the mask
    /// is a pure function of those and of (batch, head, row, key), so the backward
    /// regenerates it. `p = 0` is the call without dropout, bit for bit. See
    /// [`crate::dropout`].
    pub fn with_dropout(mut self, p: f32, seed: u64, offset: u64) -> Self {
        self.masking.dropout = Some(Dropout { p, seed, offset });
        self
    }
    /// The backward ([`Engine::attention_backward`]) also returns dBias, the gradient of the
    /// bias reduced (summed) to the bias's own dims, as for a learned relative-position bias.
    pub fn with_bias_grad(mut self) -> Self {
        self.bias_grad = true;
        self
    }
    /// Whether the backward returns dBias.
    pub fn bias_grad(&self) -> bool {
        self.bias_grad
    }
    /// Writes the backward's dQ, dK and dV as `dtype` instead of the inputs' type (they are
    /// accumulated in f32 whatever the types; dBias is f32).
    pub fn with_grad_dtype(mut self, dtype: DType) -> Self {
        self.grad_dtype = Some(dtype);
        self
    }
    /// The type the backward writes dQ, dK and dV in for inputs of type `input`.
    pub fn grad_dtype_for(&self, input: DType) -> DType {
        self.grad_dtype.unwrap_or(input)
    }
    /// The masks and logit controls.
    pub fn masking(&self) -> &Masking {
        &self.masking
    }
    /// These options with their masks and logit controls replaced (a shard's, say).
    pub(crate) fn with_masking(mut self, masking: Masking) -> Self {
        self.masking = masking;
        self
    }
    /// The scale used for head dim `d_k`.
    pub fn scale_for(&self, d_k: usize) -> f32 {
        self.scale.unwrap_or(1.0 / (d_k as f32).sqrt())
    }
    /// Writes O as `dtype` instead of the inputs' type (e.g. f32 from f16 inputs). LSE,
    /// weights and every statistic are f32 whatever the types.
    pub fn with_out_dtype(mut self, dtype: DType) -> Self {
        self.out_dtype = Some(dtype);
        self
    }
    /// The type O is written in for inputs of type `input`.
    pub fn out_dtype_for(&self, input: DType) -> DType {
        self.out_dtype.unwrap_or(input)
    }
    /// Validates these options for `shape` with f32 inputs (finite scale, masks) into what
    /// the planner needs.
    pub fn request(&self, shape: AttnShape) -> Result<Request> {
        self.request_typed(shape, DType::F32)
    }
    /// [`Attention::request`] for inputs of type `dtype`.
    pub fn request_typed(&self, shape: AttnShape, dtype: DType) -> Result<Request> {
        let scale = self.scale_for(shape.d_k);
        let masks = self.masking.spec(&shape)?;
        self.masking.check_scale(scale)?;
        if self.pool.is_some_and(|p| p.max_side == 0) {
            return Err(Error::Argument(
                "pooled weights need max_side ≥ 1 values a side, got 0".into(),
            ));
        }
        Ok(Request {
            stats: self.stats,
            pool: self.pool,
            shape,
            scale,
            weights: self.weights,
            path: self.path,
            masks,
            dtype,
            out_dtype: self.out_dtype_for(dtype),
            fused: self
                .fused
                .map(|c| c.validate().map(ConfigChoice::forced))
                .transpose()?,
        })
    }
    /// The forced path, if any.
    pub fn path(&self) -> Option<Path> {
        self.path
    }
    /// Whether the weights are requested.
    pub fn weights(&self) -> bool {
        self.weights
    }
}

/// Lengths, mask bits and bias of one call on the device; a call without a mask or a bias
/// has none (its program declares them absent).
#[derive(Debug)]
pub(crate) struct MaskInputs {
    lens: Tensor,
    mask: Option<Tensor>,
    bias: Option<Tensor>,
}

impl MaskInputs {
    /// Binds these to the ids `[lens, mask, bias]` of a program made for the same masks.
    pub(crate) fn bind<'a>(
        &'a self,
        [lens, mask, bias]: [BufferId; 3],
        tensors: &mut Bindings<'a>,
    ) {
        tensors.insert(lens, &self.lens);
        if let Some(t) = &self.mask {
            tensors.insert(mask, t);
        }
        if let Some(t) = &self.bias {
            tensors.insert(bias, t);
        }
    }
}

/// New tensors for the statistics `io` declares, per head or (`averaged`) without the head
/// axis.
pub(crate) fn stats_outputs(
    ctx: &Context,
    io: &StatsIo,
    s: &AttnShape,
    pool: Option<Pool>,
    averaged: bool,
) -> Result<StatsOutput<Tensor>> {
    let mut made = [None, None, None, None];
    for (i, (name, id)) in io.named().into_iter().enumerate() {
        if id.is_some() {
            let mut d = StatsIo::dims(i, s, pool);
            if averaged {
                d.remove(1);
            }
            made[i] = Some(Tensor::empty(ctx, name, &d)?);
        }
    }
    let [entropy, focus, coverage, pooled] = made;
    Ok(StatsOutput {
        entropy,
        focus,
        coverage,
        pooled,
    })
}

/// Results on the device.
#[derive(Debug)]
pub struct Output {
    /// O `[batch, M, q_heads, d_v]`.
    pub o: Tensor,
    /// LSE `[batch, q_heads, M]`: natural-log log-sum-exp of each row's scaled logits.
    pub lse: Tensor,
    /// P `[batch, q_heads, M, N]`, when requested.
    pub weights: Option<Tensor>,
    /// Statistics and pooled P, where requested.
    pub stats: StatsOutput<Tensor>,
}

/// Results on the host, same layouts as [`Output`].
#[derive(Clone, Debug, PartialEq)]
pub struct HostOutput {
    /// O `[batch, M, q_heads, d_v]`.
    pub o: Vec<f32>,
    /// LSE `[batch, q_heads, M]`.
    pub lse: Vec<f32>,
    /// P `[batch, q_heads, M, N]`, when requested.
    pub weights: Option<Vec<f32>>,
    /// Statistics and pooled P, where requested.
    pub stats: StatsOutput<Vec<f32>>,
}

/// Scaled dot-product attention on one device: `O = softmax(scale·Q·Kᵀ)·V`.
///
/// Layouts (row-major f32): Q `[batch, M, q_heads, d_k]`, K `[batch, N, kv_heads, d_k]`,
/// V `[batch, N, kv_heads, d_v]`, O `[batch, M, q_heads, d_v]`. `q_heads` must be a multiple of
/// `kv_heads`; query head `h` reads K/V head `h / (q_heads / kv_heads)`.
///
/// Cloning is cheap: clones share the device, the pipeline cache and the autotuner's
/// winners.
///
/// Autotuning ([`Engine::with_autotune`], off by default; `XATTN_AUTOTUNE=1` turns it on):
/// the first plan of a shape bucket (see [`crate::tune::TuneKey`]) times each candidate
/// configuration of the fused kernel on the call's inputs and plans the fastest; later plans
/// of the bucket use the winner, kept in memory and in the user's cache folder
/// ([`crate::tune::cache_dir`]). The plan says which configuration runs and why
/// ([`Plan::fused`]).
#[derive(Clone, Debug)]
pub struct Engine {
    ctx: Context,
    caps: DeviceCaps,
    cache: Arc<PipelineCache>,
    pool: Arc<BufferPool>,
    autotune: bool,
    tuner: Arc<TuneCache>,
}

/// Where a bound call's scratch comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scratch {
    /// The engine's pool: for a call that runs once and waits before it returns.
    Pool,
    /// A pool of the call's own: for prepared calls, whose work recorded into a caller's
    /// encoder may outlive them.
    Own,
}

pub(crate) fn dims4(t: &Tensor, name: &str) -> Result<[usize; 4]> {
    t.dims().try_into().map_err(|_| {
        Error::Shape(format!(
            "{name} must have 4 dims [batch, seq, heads, dim], got {:?}",
            t.dims()
        ))
    })
}

/// Q, K and V are read as one element type: an error naming the three where they differ.
pub(crate) fn same_dtype(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Err(Error::Argument(format!(
            "q, k and v must share one type; got q {}, k {}, v {}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )));
    }
    Ok(())
}

impl Engine {
    /// An engine on `ctx` planning for the device's own limits and quirks.
    pub fn new(ctx: &Context) -> Self {
        Self::with_caps(ctx, ctx.caps())
    }

    /// An engine that plans as if the device's limits were `caps` (each clamped to the real
    /// limit; a loop cap of the adapter's stays; the fill estimate is taken as given). Lets
    /// tests and users force the work-splitting paths, the loop-cap splits included on any
    /// device; subgroup lanes stay only where both `caps` and the device have them.
    pub fn with_caps(ctx: &Context, caps: DeviceCaps) -> Self {
        let real = ctx.caps();
        let caps = DeviceCaps {
            max_binding: caps.max_binding.min(real.max_binding),
            max_buffer: caps.max_buffer.min(real.max_buffer),
            max_workgroups: caps.max_workgroups.min(real.max_workgroups),
            max_workgroup_bytes: caps.max_workgroup_bytes.min(real.max_workgroup_bytes),
            native_f16: caps.native_f16 && real.native_f16,
            fill: caps.fill,
            // The caller may turn subgroup lanes off, not choose another size.
            subgroup_lanes: real
                .subgroup_lanes
                .filter(|_| caps.subgroup_lanes.is_some()),
            // A property of the device, not a limit.
            scalar_lane_loads: real.scalar_lane_loads,
            // Likewise matrix units.
            matrix_units: real.matrix_units.filter(|_| caps.matrix_units.is_some()),
            loop_cap: match (caps.loop_cap, real.loop_cap) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        };
        Self {
            ctx: ctx.clone(),
            caps,
            cache: Arc::new(PipelineCache::new(ctx)),
            pool: Arc::new(BufferPool::new(ctx)),
            autotune: crate::settings::autotune().unwrap_or(false),
            tuner: Arc::new(TuneCache::new(tune::default_cache_file())),
        }
    }

    /// This engine with autotuning on or off (overriding `XATTN_AUTOTUNE`); see [`Engine`].
    /// On the web it stays off: the tuner times candidates by waiting for the device, which a
    /// browser does not allow (the planner's default configuration runs).
    pub fn with_autotune(mut self, on: bool) -> Self {
        self.autotune = on && cfg!(not(target_arch = "wasm32"));
        self
    }

    /// This engine keeping autotune winners in `dir` ([`tune::CACHE_FILE`]) instead of the
    /// user's cache folder, or (`None`) in memory only; it starts a cache of its own, shared
    /// with the clones made from it.
    pub fn with_autotune_cache(mut self, dir: Option<&FsPath>) -> Self {
        self.tuner = Arc::new(TuneCache::new(dir.map(|d| d.join(tune::CACHE_FILE))));
        self
    }

    /// Whether plans are autotuned.
    pub fn autotune(&self) -> bool {
        self.autotune
    }

    /// The file autotune winners are kept in, if any.
    pub fn autotune_cache_file(&self) -> Option<&FsPath> {
        self.tuner.file()
    }

    /// Shape buckets this engine's autotuner has timed so far (a plan served by a winner
    /// already known adds none).
    pub fn autotune_measurements(&self) -> u64 {
        self.tuner.measurements()
    }

    /// The device context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// `y [rows, out] = x [rows, in]·wᵀ + b` (PyTorch `Linear`: `w` is `[out, in]`, `b` is
    /// `[out]`) with the tiled `linear` kernel; `x` may have any leading dims (`[…, in]`).
    pub fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let (Some((&in_dim, lead)), [out_dim, w_in]) = (x.dims().split_last(), w.dims()) else {
            return Err(Error::Shape(format!(
                "linear needs x [.., in] and w [out, in], got x {:?} and w {:?}",
                x.dims(),
                w.dims()
            )));
        };
        if *w_in != in_dim {
            return Err(Error::Shape(format!(
                "x has {in_dim} features but w is {:?} ([out, in])",
                w.dims()
            )));
        }
        if let Some(b) = b.filter(|b| b.dims() != [*out_dim]) {
            return Err(Error::Shape(format!(
                "bias has dims {:?}; it must be [{out_dim}]",
                b.dims()
            )));
        }
        let rows = lead.iter().product::<usize>();
        let mut program = Program::new();
        let xs = program.input("x", x.dtype().bytes(rows * in_dim));
        let ws = program.input("w", w.dtype().bytes(*out_dim * in_dim));
        let bs = program.optional_input("b", w.dtype().bytes(*out_dim), b.is_some());
        let ys = program.output("y", (rows * *out_dim) as u64 * F32);
        if let Some(b) = b.filter(|b| b.dtype() != w.dtype()) {
            return Err(Error::Argument(format!(
                "the bias is {} but the weight is {}; they are read as one type",
                b.dtype(),
                w.dtype()
            )));
        }
        plan::linear(
            &mut program,
            (rows, in_dim, *out_dim),
            [xs, ws, bs, ys],
            (x.dtype(), w.dtype()),
            b.is_some(),
            &self.caps,
        )?;
        plan::check_loops(&program, &self.caps)?;
        let mut dims = lead.to_vec();
        dims.push(*out_dim);
        let y = Tensor::empty(&self.ctx, "linear_out", &dims)?;
        let mut tensors = HashMap::from([(xs, x), (ws, w), (ys, &y)]);
        if let Some(b) = b {
            tensors.insert(bs, b);
        }
        self.execute(&program, &tensors)?;
        Ok(y)
    }

    /// Runs any program once with these tensors for its inputs and outputs (the layer's way
    /// in), scratch from the pool. Its maker checked its loops against this engine's caps.
    pub(crate) fn execute(&self, program: &Program, tensors: &Bindings) -> Result<()> {
        executor::run(&self.ctx, (&self.cache, &self.pool), program, tensors, None)
    }

    /// Scratch and params buffers this engine's pool has created so far (a loop of calls of
    /// one shape stops adding to it after its first call).
    pub fn pooled_buffers_created(&self) -> u64 {
        self.pool.created()
    }

    /// The limits the planner respects.
    pub fn caps(&self) -> &DeviceCaps {
        &self.caps
    }

    /// Uploads a host tensor (e.g. Q `[batch, M, heads, d_k]`).
    pub fn upload(&self, data: &[f32], dims: &[usize]) -> Result<Tensor> {
        Tensor::upload(&self.ctx, "input", data, dims)
    }

    pub(crate) fn request(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: &Attention,
    ) -> Result<Request> {
        let shape = AttnShape::from_qkv(dims4(q, "q")?, dims4(k, "k")?, dims4(v, "v")?)?;
        same_dtype(q, k, v)?;
        opts.request_typed(shape, q.dtype())
    }

    /// What [`Engine::attention`] would run: path, tiles, splits, bytes, and the fused
    /// kernel's configuration. With autotuning on, the first plan of a shape bucket times the
    /// candidate configurations on `q`, `k`, `v` and `opts`' masks (see [`Engine`]).
    pub fn plan(&self, q: &Tensor, k: &Tensor, v: &Tensor, opts: &Attention) -> Result<Plan> {
        let req = self.request(q, k, v, opts)?;
        let plan = Plan::new(&req, &self.caps)?;
        let default = matches!(
            plan.fused,
            Some(ConfigChoice {
                source: ConfigSource::Default,
                ..
            })
        );
        if !(self.autotune && default) {
            return Ok(plan);
        }
        self.tuned_plan(plan, req, (q, k, v), opts)
    }

    /// `plan` (the default configuration's) with the autotuner's winner for its bucket,
    /// timed now if not yet known. A bucket with one candidate keeps `plan`, and so does a
    /// winner that does not plan on this engine's caps.
    fn tuned_plan(
        &self,
        plan: Plan,
        req: Request,
        qkv: (&Tensor, &Tensor, &Tensor),
        opts: &Attention,
    ) -> Result<Plan> {
        let key = TuneKey::new(&AdapterId::of(&self.ctx.info), &req, &self.caps);
        let (timings, measured_now) = match self.tuner.get(&key) {
            Some(timings) => (timings, false),
            None => {
                let candidates = key.candidates();
                if candidates.len() < 2 {
                    return Ok(plan);
                }
                let timings = self.time_candidates(&req, &candidates, qkv, opts)?;
                if timings.is_empty() {
                    return Ok(plan);
                }
                self.tuner.store(key.clone(), timings.clone());
                (timings, true)
            }
        };
        let tuned = Tuned {
            adapter: key.adapter.to_string(),
            bucket: key.bucket(),
            timings,
            measured_now,
        };
        let choice = ConfigChoice {
            config: tuned.timings[0].0,
            source: ConfigSource::Tuned(Arc::new(tuned)),
        };
        let tuned_req = Request {
            fused: Some(choice),
            ..req
        };
        Ok(Plan::new(&tuned_req, &self.caps).unwrap_or(plan))
    }

    /// Each of `candidates` that plans for `req`, timed by [`tune::measure`] on the call's
    /// inputs and masks: GPU timestamps where the device has them, else the host clock around
    /// a run that waits for the device. Outputs are the tuner's own.
    fn time_candidates(
        &self,
        req: &Request,
        candidates: &[FusedConfig],
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        opts: &Attention,
    ) -> Result<Vec<(FusedConfig, f64)>> {
        let timer = GpuTimer::new(&self.ctx);
        let mut calls = Vec::new();
        for &config in candidates {
            let forced = req.clone().with_fused_config(config);
            // A candidate this device cannot plan (a limit) is no candidate here.
            let Ok(plan) = Plan::new(&forced, &self.caps) else {
                continue;
            };
            let call = self.bind(plan, (q, k, v), opts.masking(), None, Scratch::Pool)?;
            calls.push((config, call));
        }
        tune::measure(&calls, |call: &Prepared| match &timer {
            Some(t) => call.run_timed(t),
            None => {
                let start = Instant::now();
                call.run()?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            }
        })
    }

    /// The lengths, mask and bias of `masking` on `shape` on the device, for a program
    /// planned from the same masking (its spec computed once, when the call was planned).
    pub(crate) fn mask_inputs(&self, shape: &AttnShape, masking: &Masking) -> Result<MaskInputs> {
        let lens = masking.lens_words(shape);
        let mask = masking
            .mask_words()
            .map(|w| Tensor::upload_u32(&self.ctx, "mask", &w, &[w.len()]))
            .transpose()?;
        let bias = masking
            .bias_values()
            .map(|b| Tensor::upload(&self.ctx, "bias", &b, &[b.len()]))
            .transpose()?;
        Ok(MaskInputs {
            lens: Tensor::upload_u32(&self.ctx, "lens", &lens, &[lens.len()])?,
            mask,
            bias,
        })
    }

    /// New outputs for `plan` (O, LSE and, if planned, weights and statistics).
    fn outputs(&self, plan: &Plan) -> Result<Output> {
        let s = plan.shape;
        let wants_weights = plan.io.weights.is_some();
        Ok(Output {
            o: Tensor::empty_as(&self.ctx, "o", &s.o_dims(), plan.out_dtype)?,
            lse: Tensor::empty(&self.ctx, "lse", &s.lse_dims())?,
            weights: if wants_weights {
                Some(Tensor::empty(&self.ctx, "weights", &s.weights_dims())?)
            } else {
                None
            },
            stats: stats_outputs(&self.ctx, &plan.io.stats, &s, plan.pool, false)?,
        })
    }

    /// Computes attention on device tensors into new output tensors: [`Engine::prepare`]
    /// and one run, with scratch from the engine's pool, so a loop of calls of one shape
    /// allocates only outputs.
    pub fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: &Attention,
    ) -> Result<Output> {
        let plan = self.plan(q, k, v, opts)?;
        self.bind(plan, (q, k, v), opts.masking(), None, Scratch::Pool)?
            .finish()
    }

    /// Validates and plans one call once and binds it to `q`, `k`, `v`, its masks, new
    /// outputs and scratch of its own: [`Prepared::run`] and [`Prepared::encode`] then
    /// allocate nothing and read the inputs' contents as they are at each run (a decoder
    /// writes the next query into `q` and runs again).
    pub fn prepare(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: &Attention,
    ) -> Result<Prepared> {
        let plan = self.plan(q, k, v, opts)?;
        self.bind(plan, (q, k, v), opts.masking(), None, Scratch::Own)
    }

    /// [`Engine::prepare`] writing O into the caller's tensor `o` (e.g. a range of an app's
    /// buffer, [`Tensor::from_buffer`]) and LSE into `lse` if given (else into a tensor of
    /// its own). Outputs need buffers no input of the call uses.
    pub fn prepare_into(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        o: &Tensor,
        lse: Option<&Tensor>,
        opts: &Attention,
    ) -> Result<Prepared> {
        let plan = self.plan(q, k, v, opts)?;
        let into = (o, lse);
        self.bind(plan, (q, k, v), opts.masking(), Some(into), Scratch::Own)
    }

    /// Binds `plan` (made from `masking`) to the inputs, its masks, new outputs (O and LSE
    /// the caller's where `into` gives them) and scratch.
    fn bind(
        &self,
        plan: Plan,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        masking: &Masking,
        into: Option<(&Tensor, Option<&Tensor>)>,
        scratch: Scratch,
    ) -> Result<Prepared> {
        let mut out = self.outputs(&plan)?;
        if let Some((o, lse)) = into {
            out.o = o.clone();
            if let Some(lse) = lse {
                out.lse = lse.clone();
            }
        }
        let masks = self.mask_inputs(&plan.shape, masking)?;
        let tensors = self.tensors(&plan, (q, k, v), &masks, &out)?;
        let bound = self.bind_program(&plan.program, &tensors, scratch)?;
        Ok(Prepared::new(&self.ctx, bound, Some(plan), out))
    }

    /// Binds any program (checked by its maker against this engine's caps) to these tensors
    /// for repeated runs.
    pub(crate) fn bind_program(
        &self,
        program: &Program,
        tensors: &Bindings,
        scratch: Scratch,
    ) -> Result<executor::Bound> {
        let own;
        let pool = match scratch {
            Scratch::Pool => &self.pool,
            Scratch::Own => {
                own = Arc::new(BufferPool::new(&self.ctx));
                &own
            }
        };
        self.ctx
            .scoped(|| executor::bind(&self.ctx, (&self.cache, pool), program, tensors))
    }

    /// The tensors of a call by buffer id, checked against the plan's dims.
    fn tensors<'a>(
        &self,
        plan: &Plan,
        (q, k, v): (&'a Tensor, &'a Tensor, &'a Tensor),
        masks: &'a MaskInputs,
        out: &'a Output,
    ) -> Result<Bindings<'a>> {
        let s = plan.shape;
        let expect = |t: &Tensor, name: &str, dims: &[usize]| -> Result<()> {
            if t.dims() != dims {
                return Err(Error::Shape(format!(
                    "{name} has dims {:?} but the plan needs {dims:?}",
                    t.dims()
                )));
            }
            Ok(())
        };
        expect(q, "q", &s.q_dims())?;
        expect(k, "k", &s.k_dims())?;
        expect(v, "v", &s.v_dims())?;
        expect(&out.o, "output o", &s.o_dims())?;
        expect(&out.lse, "output lse", &s.lse_dims())?;
        let dtype = plan.in_dtype;
        for (t, name, want) in [
            (q, "q", dtype),
            (k, "k", dtype),
            (v, "v", dtype),
            (&out.o, "output o", plan.out_dtype),
            (&out.lse, "output lse", DType::F32),
        ] {
            if t.dtype() != want {
                return Err(Error::Argument(format!(
                    "{name} is {} but the plan reads and writes it as {want}",
                    t.dtype()
                )));
            }
        }
        let io = &plan.io;
        let mut tensors: Bindings = HashMap::from([
            (io.q, q),
            (io.k, k),
            (io.v, v),
            (io.o, &out.o),
            (io.lse, &out.lse),
        ]);
        masks.bind([io.lens, io.mask, io.bias], &mut tensors);
        match (io.weights, &out.weights) {
            (Some(id), Some(w)) => {
                expect(w, "output weights", &s.weights_dims())?;
                tensors.insert(id, w);
            }
            (None, None) => {}
            _ => {
                return Err(Error::Argument(
                    "the output has weights iff the plan computes them".into(),
                ))
            }
        }
        let stats = io.stats.named().into_iter().zip(out.stats.named());
        for (i, ((name, id), (_, t))) in stats.enumerate() {
            match (id, t) {
                (Some(id), Some(t)) => {
                    expect(
                        t,
                        &format!("output {name}"),
                        &StatsIo::dims(i, &s, plan.pool),
                    )?;
                    if t.dtype() != DType::F32 {
                        return Err(Error::Argument(format!(
                            "output {name} is {} but statistics are f32",
                            t.dtype()
                        )));
                    }
                    tensors.insert(id, t);
                }
                (None, None) => {}
                _ => {
                    return Err(Error::Argument(format!(
                        "the output has {name} iff the plan computes it"
                    )))
                }
            }
        }
        Ok(tensors)
    }

    /// Attention on host slices: uploads, runs, downloads. `q_dims` etc. as in the layouts above.
    pub fn attention_host(
        &self,
        q: (&[f32], [usize; 4]),
        k: (&[f32], [usize; 4]),
        v: (&[f32], [usize; 4]),
        opts: &Attention,
    ) -> Result<HostOutput> {
        let q = Tensor::upload(&self.ctx, "q", q.0, &q.1)?;
        let k = Tensor::upload(&self.ctx, "k", k.0, &k.1)?;
        let v = Tensor::upload(&self.ctx, "v", v.0, &v.1)?;
        let out = self.attention(&q, &k, &v, opts)?;
        Ok(HostOutput {
            o: out.o.to_host()?,
            lse: out.lse.to_host()?,
            weights: out.weights.map(|w| w.to_host()).transpose()?,
            stats: out.stats.try_map(|t| t.to_host())?,
        })
    }

    /// Exact merge of results over disjoint K/V shards of the same queries.
    ///
    /// Each shard is `(O_i [batch, M, q_heads, d_v], LSE_i [batch, q_heads, M])`, computed by
    /// attention of the same Q over shard i of K/V. The result equals attention over all
    /// shards' keys: `LSE = log Σ exp(LSE_i)`, `O = Σ exp(LSE_i − LSE)·O_i`. A shard whose LSE
    /// is −∞ (it saw no key) weighs 0.
    pub fn merge(&self, shards: &[(&Tensor, &Tensor)]) -> Result<(Tensor, Tensor)> {
        let (o0, _) = shards
            .first()
            .ok_or_else(|| Error::Shape("merge needs at least one shard".into()))?;
        let [batch, m, q_heads, d_v] = dims4(o0, "shard 0 o")?;
        let shape = AttnShape {
            batch,
            m,
            n: 1,
            q_heads,
            kv_heads: q_heads,
            d_k: d_v,
            d_v,
        };
        for (i, (o, lse)) in shards.iter().enumerate() {
            if o.dtype() != DType::F32 || lse.dtype() != DType::F32 {
                return Err(Error::Unsupported(format!(
                    "merge reads f32 shards; shard {i} has o {} and lse {} (compute the shards \
                     with Attention::with_out_dtype(DType::F32))",
                    o.dtype(),
                    lse.dtype()
                )));
            }
            if o.dims() != o0.dims() || lse.dims() != shape.lse_dims() {
                return Err(Error::Shape(format!(
                    "shard {i} has o {:?} and lse {:?}; expected o {:?} and lse {:?} like shard 0",
                    o.dims(),
                    lse.dims(),
                    o0.dims(),
                    shape.lse_dims()
                )));
            }
        }
        let plan = MergePlan::new(&shape, shards.len(), &self.caps)?;
        let o = Tensor::empty(&self.ctx, "merged_o", &shape.o_dims())?;
        let lse = Tensor::empty(&self.ctx, "merged_lse", &shape.lse_dims())?;
        let mut tensors: Bindings = HashMap::from([(plan.o, &o), (plan.lse, &lse)]);
        for ((so, sl), (o_id, lse_id)) in shards.iter().zip(&plan.shards) {
            tensors.insert(*o_id, so);
            tensors.insert(*lse_id, sl);
        }
        self.execute(&plan.program, &tensors)?;
        Ok((o, lse))
    }

    /// [`Engine::merge`] on host slices: `o_dims` is `[batch, M, q_heads, d_v]`.
    pub fn merge_host(
        &self,
        o_dims: [usize; 4],
        shards: &[(&[f32], &[f32])],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let [b, m, h, _] = o_dims;
        let mut tensors = Vec::with_capacity(shards.len());
        for (o, lse) in shards {
            tensors.push((
                Tensor::upload(&self.ctx, "shard_o", o, &o_dims)?,
                Tensor::upload(&self.ctx, "shard_lse", lse, &[b, h, m])?,
            ));
        }
        let refs: Vec<(&Tensor, &Tensor)> = tensors.iter().map(|(o, l)| (o, l)).collect();
        let (o, lse) = self.merge(&refs)?;
        Ok((o.to_host()?, lse.to_host()?))
    }
}
