//! The scheduler: shape + options + device limits → a plan of dispatches and copies.
//!
//! A plan holds no wgpu objects. It names buffers by [`Slot`], lists every dispatch with its
//! params and grid (already checked against the device's limits), and the scratch it needs.
//! The executor (`gpu::executor`) turns it into passes.

use std::fmt;

use crate::error::{Error, Result};
use crate::gpu::kernels::{Kernel, LoopCost};
use crate::mask::MaskSpec;
use crate::params::{flags, AttnParams, LinearParams};
use crate::shape::{AttnShape, F32};

/// Which kernels compute the attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// `qk_scores` → `softmax_rows` → `weighted_sum`, through an M×N scratch (chunked to fit).
    /// The only path that can return the weights P.
    ThreePass,
    /// One fused online-softmax kernel; nothing M×N is stored.
    Fused,
    /// The fused kernel over key splits in parallel, then `merge_partials`: for few query
    /// rows and long K/V (decoding, Perceiver).
    SplitK,
}

impl Path {
    /// Name used by the CLI (`three-pass`, `fused`, `split-k`).
    pub fn name(&self) -> &'static str {
        match self {
            Path::ThreePass => "three-pass",
            Path::Fused => "fused",
            Path::SplitK => "split-k",
        }
    }
    /// All paths, in CLI order.
    pub const ALL: [Path; 3] = [Path::ThreePass, Path::Fused, Path::SplitK];
}

impl std::str::FromStr for Path {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Path::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "unknown path `{s}` (expected three-pass, fused or split-k)"
                ))
            })
    }
}

/// The device limits the planner respects. Built from `wgpu::Limits`; tests may shrink them
/// to force the splitting paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCaps {
    /// `max_storage_buffer_binding_size`.
    pub max_binding: u64,
    /// `max_buffer_size`.
    pub max_buffer: u64,
    /// `max_compute_workgroups_per_dimension`.
    pub max_workgroups: u32,
    /// `max_compute_workgroup_storage_size`.
    pub max_workgroup_bytes: u64,
    /// `min_uniform_buffer_offset_alignment`.
    pub uniform_align: u64,
    /// Most loop iterations one shader invocation may run where the device ends loops early
    /// without an error ([`LLVMPIPE_LOOP_CAP`] on Mesa's llvmpipe), or `None`. The planner
    /// keeps every dispatch under it by the kernels' [`LoopCost`]: it splits the keys of
    /// the fused and `weighted_sum` kernels and refuses what no split can bound.
    pub loop_cap: Option<u64>,
}

/// Mesa's llvmpipe (lavapipe on Vulkan, llvmpipe under wgpu's GL backend) ends every loop of a
/// shader invocation once that invocation has run 65,535 loop iterations in all (gallivm's
/// `LP_MAX_TGSI_LOOP_ITERATIONS`, a guard against endless loops). The shader then goes on
/// with partial sums: a wrong answer, no error.
pub const LLVMPIPE_LOOP_CAP: u64 = 65_535;

/// The loop cap of an adapter: [`LLVMPIPE_LOOP_CAP`] for Mesa's llvmpipe (by adapter name or
/// driver, on every backend), `None` for the rest.
pub fn loop_cap_of(info: &wgpu::AdapterInfo) -> Option<u64> {
    let llvmpipe = [&info.name, &info.driver]
        .iter()
        .any(|s| s.to_lowercase().contains("llvmpipe"));
    llvmpipe.then_some(LLVMPIPE_LOOP_CAP)
}

impl DeviceCaps {
    /// The caps of a device with these limits, on an adapter with no loop cap.
    pub fn from_limits(l: &wgpu::Limits) -> Self {
        Self {
            loop_cap: None,
            max_binding: l.max_storage_buffer_binding_size,
            max_buffer: l.max_buffer_size,
            max_workgroups: l.max_compute_workgroups_per_dimension,
            max_workgroup_bytes: u64::from(l.max_compute_workgroup_storage_size),
            uniform_align: u64::from(l.min_uniform_buffer_offset_alignment),
        }
    }

    /// The caps of an opened device: its limits and its adapter's quirks.
    pub fn of(ctx: &crate::Context) -> Self {
        Self {
            loop_cap: loop_cap_of(&ctx.info),
            ..Self::from_limits(&ctx.limits)
        }
    }

    /// The longest loop a kernel with `cost` may run on this device (unbounded without a cap).
    fn loop_len(&self, cost: &LoopCost) -> u64 {
        // Strictly under the cap: the iteration that reaches it is the one cut.
        self.loop_cap
            .map_or(u64::MAX, |cap| cost.max_len(cap.saturating_sub(1)))
    }
}

/// A buffer named by its role. The executor maps slots to real buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Queries (input).
    Q,
    /// Keys (input).
    K,
    /// Values (input).
    V,
    /// `[q_lens; batch] ++ [kv_lens; batch]` as u32 (input).
    Lens,
    /// Packed bool-mask bits (input; a placeholder when unused).
    MaskBits,
    /// Additive bias (input; a placeholder when unused).
    Bias,
    /// Output O.
    O,
    /// Output LSE.
    Lse,
    /// Output weights P (three-pass only).
    Weights,
    /// M×N score/weight scratch of one chunk (three-pass).
    Scores,
    /// Stacked partial outputs `[splits, batch, M, q_heads, d_v]` (split-K, merge).
    PartO,
    /// Stacked partial statistics: split-K's max logit and ln(sum) `[splits, 2, batch, q_heads,
    /// M]`, or the shards' LSE `[shards, batch, q_heads, M]` of an explicit merge.
    PartLse,
    /// Shard `i`'s O, an input of an explicit merge.
    ShardO(usize),
    /// Shard `i`'s LSE, an input of an explicit merge.
    ShardLse(usize),
    /// A buffer of a multi-head attention layer.
    Layer(LayerSlot),
}

/// Buffers of a multi-head attention layer's forward pass (besides Q, K, V, O of attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerSlot {
    /// Query input `[batch, M, embed_dim]`.
    Query,
    /// Key input `[batch, N, kdim]`.
    Key,
    /// Value input `[batch, N, vdim]`.
    Value,
    /// A projection weight `[out, in]`.
    Weight(Proj),
    /// A projection bias `[out]` (a placeholder when the layer has none).
    Bias(Proj),
    /// Layer output `[batch, M, embed_dim]`.
    Out,
    /// Weights averaged over heads `[batch, M, N]`.
    MeanWeights,
}

/// The four projections of a multi-head attention layer.
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

/// Uniform parameters of one dispatch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Params {
    /// Attention kernels (and merge, mean_heads).
    Attn(AttnParams),
    /// The `linear` kernel.
    Linear(LinearParams),
}

impl Params {
    /// The bytes uploaded to the uniform buffer.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Params::Attn(p) => bytemuck::bytes_of(p),
            Params::Linear(p) => bytemuck::bytes_of(p),
        }
    }
    /// The attention params; panics for a linear dispatch (a planner bug).
    pub fn attn(&self) -> &AttnParams {
        match self {
            Params::Attn(p) => p,
            Params::Linear(_) => panic!("a linear dispatch has no attention params"),
        }
    }
}

/// One compute dispatch.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// Kernel and specialization.
    pub kernel: Kernel,
    /// Its uniform params.
    pub params: Params,
    /// Workgroups in x, y, z (each ≤ `max_workgroups`).
    pub grid: [u32; 3],
    /// Buffers for bindings 1.. (binding 0 is the params uniform).
    pub buffers: Vec<Slot>,
}

/// A step of a plan, executed in order.
#[derive(Clone, Debug)]
pub enum Step {
    /// Run a kernel.
    Dispatch(Dispatch),
    /// Copy bytes between buffers.
    Copy {
        /// Source buffer.
        src: Slot,
        /// Byte offset in the source.
        src_offset: u64,
        /// Destination buffer.
        dst: Slot,
        /// Byte offset in the destination.
        dst_offset: u64,
        /// Bytes to copy.
        size: u64,
    },
}

/// What to compute, as the planner needs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    /// The shape.
    pub shape: AttnShape,
    /// Logit scale.
    pub scale: f32,
    /// Whether the weights P must be returned.
    pub weights: bool,
    /// Forced path, or `None` for the planner's choice.
    pub path: Option<Path>,
    /// Masks, lengths and logit controls.
    pub masks: MaskSpec,
}

/// The work for one attention call.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The path chosen.
    pub path: Path,
    /// The problem.
    pub shape: AttnShape,
    /// Masks, lengths and logit controls baked into the params.
    pub masks: MaskSpec,
    /// Steps in order.
    pub steps: Vec<Step>,
    /// Scratch buffers and their sizes in bytes (allocated by the executor).
    pub scratch: Vec<(Slot, u64)>,
    /// Output buffers and their sizes in bytes.
    pub outputs: Vec<(Slot, u64)>,
    /// One line on the tiling (for people).
    pub tiling: String,
}

/// Invocations per fused workgroup; each owns R query rows (`fused_kernel`), so a workgroup
/// covers `FUSED_ROWS · R` rows. (64 measured best on llvmpipe against 8, 16, 32 and 128 at R = 4.)
pub const FUSED_ROWS: u32 = 64;
/// Floats of Q and O rows one fused invocation may hold: R · (d_k + d_v) stays within this,
/// the footprint of one row at the largest head dim (256 + 256), so larger R only where rows
/// are short (R = 4 up to d_k + d_v = 128, R = 2 up to 256).
pub const FUSED_ROW_FLOATS: u32 = 512;
/// Fewer workgroups than this on the fused path leaves a GPU idle: split the keys instead.
const TARGET_WORKGROUPS: usize = 256;
/// Smallest key range worth a split of its own.
const MIN_SPLIT_KEYS: usize = 128;
/// The three-pass scratch is capped here even where bindings may be larger.
const SCRATCH_BUDGET: u64 = 256 << 20;
/// Largest head dim the fused kernel keeps in registers.
pub const FUSED_MAX_HEAD_DIM: usize = 256;
/// Tile of the three-pass GEMM kernels (rows and columns per workgroup).
const GEMM_TILE: usize = 64;
/// Invocations per workgroup of merge_partials and mean_heads.
const MERGE_WG: usize = 64;

fn bytes(elems: usize) -> u64 {
    elems as u64 * F32
}

fn limit_err(what: String, asked: u64, limit_name: &'static str, limit: u64) -> Error {
    Error::Limit {
        what,
        asked,
        limit_name,
        limit,
    }
}

impl Plan {
    /// Plans `req` for a device with `caps`.
    pub fn new(req: &Request, caps: &DeviceCaps) -> Result<Plan> {
        let s = req.shape;
        for (name, dims) in [
            ("q", s.q_dims()),
            ("k", s.k_dims()),
            ("v", s.v_dims()),
            ("output o", s.o_dims()),
        ] {
            check_binding(
                &format!("{name} {dims:?} (bound whole to every kernel)"),
                bytes(dims.iter().product()),
                caps,
            )?;
        }
        if let Some(d) = req.masks.mask_dims {
            let words = d[0] * d[1] * d[2] * d[3].div_ceil(32);
            check_binding(&format!("mask bits {d:?}"), bytes(words), caps)?;
        }
        if let Some(d) = req.masks.bias_dims {
            check_binding(&format!("bias {d:?}"), bytes(d.iter().product()), caps)?;
        }
        let fused_ok = s.d_k <= FUSED_MAX_HEAD_DIM && s.d_v <= FUSED_MAX_HEAD_DIM;
        let path = match req.path {
            Some(p) => p,
            None if req.weights || !fused_ok => Path::ThreePass,
            None => {
                let row_blocks = s.m.div_ceil(FUSED_ROWS as usize);
                if row_blocks * s.bh() < TARGET_WORKGROUPS && s.n >= 2 * MIN_SPLIT_KEYS {
                    Path::SplitK
                } else {
                    Path::Fused
                }
            }
        };
        if req.weights && path != Path::ThreePass {
            return Err(Error::Unsupported(format!(
                "the weights P are only produced by the three-pass path, not {}",
                path.name()
            )));
        }
        if path != Path::ThreePass && !fused_ok {
            return Err(Error::Unsupported(format!(
                "the {} path supports head dims up to {FUSED_MAX_HEAD_DIM}, got d_k {} d_v {}",
                path.name(),
                s.d_k,
                s.d_v
            )));
        }
        let mut plan = match path {
            Path::ThreePass => three_pass(req, caps)?,
            Path::Fused | Path::SplitK => {
                let kernel = fused_kernel(&s, caps, !req.masks.is_empty())?;
                // Where the device caps loop iterations, a source longer than one pass may
                // walk is split (split-K) even when the fused path was asked for.
                let params = Params::Attn(base_params(&s, req.scale, &req.masks));
                let per_pass = caps.loop_len(&kernel.loop_cost(&params).0);
                let per_pass = usize::try_from(per_pass).unwrap_or(usize::MAX);
                if path == Path::Fused && s.n <= per_pass {
                    fused(req, caps, kernel, None)?
                } else {
                    let splits = split_count(&s, caps, per_pass.max(1));
                    fused(req, caps, kernel, Some(splits))?
                }
            }
        };
        check_loops(&plan.steps, caps)?;
        plan.masks = req.masks;
        plan.outputs
            .push((Slot::O, bytes(s.o_dims().iter().product())));
        plan.outputs
            .push((Slot::Lse, bytes(s.lse_dims().iter().product())));
        if req.weights {
            let size = bytes(s.weights_dims().iter().product());
            if size > caps.max_buffer {
                return Err(limit_err(
                    format!("weights {:?}", s.weights_dims()),
                    size,
                    "max_buffer_size",
                    caps.max_buffer,
                ));
            }
            plan.outputs.push((Slot::Weights, size));
        }
        Ok(plan)
    }

    /// Plans an exact merge of `shards` results over disjoint K/V of the same queries.
    pub fn merge(shape: &AttnShape, shards: usize, caps: &DeviceCaps) -> Result<Plan> {
        if shards == 0 {
            return Err(Error::Shape("merge needs at least one shard".into()));
        }
        let o_bytes = bytes(shape.o_dims().iter().product());
        let lse_bytes = bytes(shape.lse_dims().iter().product());
        let mut steps = Vec::new();
        for i in 0..shards {
            steps.push(Step::Copy {
                src: Slot::ShardO(i),
                src_offset: 0,
                dst: Slot::PartO,
                dst_offset: i as u64 * o_bytes,
                size: o_bytes,
            });
            steps.push(Step::Copy {
                src: Slot::ShardLse(i),
                src_offset: 0,
                dst: Slot::PartLse,
                dst_offset: i as u64 * lse_bytes,
                size: lse_bytes,
            });
        }
        let part_o = check_binding("stacked shard outputs", o_bytes * shards as u64, caps)?;
        let part_lse = check_binding("stacked shard LSE", lse_bytes * shards as u64, caps)?;
        steps.push(merge_step(shape, shards as u32, false, caps)?);
        check_loops(&steps, caps)?;
        Ok(Plan {
            path: Path::SplitK,
            shape: *shape,
            masks: MaskSpec::default(),
            steps,
            scratch: vec![(Slot::PartO, part_o), (Slot::PartLse, part_lse)],
            outputs: vec![(Slot::O, o_bytes), (Slot::Lse, lse_bytes)],
            tiling: format!("merge of {shards} shards, one invocation per output element"),
        })
    }

    /// A plan of bare steps on caller-supplied buffers (layers, projections).
    pub fn steps_only(steps: Vec<Step>, what: &str) -> Plan {
        Plan {
            path: Path::Fused,
            shape: AttnShape {
                batch: 1,
                m: 1,
                n: 1,
                q_heads: 1,
                kv_heads: 1,
                d_k: 1,
                d_v: 1,
            },
            masks: MaskSpec::default(),
            steps,
            scratch: Vec::new(),
            outputs: Vec::new(),
            tiling: what.to_string(),
        }
    }

    /// Bytes of scratch plus outputs this plan allocates on the device.
    pub fn bytes_allocated(&self) -> u64 {
        self.scratch
            .iter()
            .chain(&self.outputs)
            .map(|(_, b)| b)
            .sum()
    }

    /// Number of dispatches.
    pub fn dispatches(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Dispatch(_)))
            .count()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plan {} for {}", self.path.name(), self.shape)?;
        writeln!(f, "  tiling: {}", self.tiling)?;
        if !self.masks.is_empty() {
            writeln!(f, "  masks: {}", self.masks)?;
        }
        let copies = self.steps.len() - self.dispatches();
        writeln!(
            f,
            "  steps: {} dispatches, {} copies",
            self.dispatches(),
            copies
        )?;
        let mut kernels: Vec<String> = Vec::new();
        for step in &self.steps {
            if let Step::Dispatch(d) = step {
                let label = d.kernel.label();
                if !kernels.contains(&label) {
                    kernels.push(label);
                }
            }
        }
        writeln!(f, "  kernels: {}", kernels.join(", "))?;
        for (slot, size) in self.scratch.iter().chain(&self.outputs) {
            writeln!(f, "  buffer {slot:?}: {}", human_bytes(*size))?;
        }
        write!(f, "  allocated: {}", human_bytes(self.bytes_allocated()))
    }
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

fn check_binding(what: &str, size: u64, caps: &DeviceCaps) -> Result<u64> {
    if size > caps.max_binding {
        return Err(limit_err(
            what.to_string(),
            size,
            "max_storage_buffer_binding_size",
            caps.max_binding,
        ));
    }
    Ok(size)
}

fn check_grid(what: &str, count: usize, caps: &DeviceCaps) -> Result<u32> {
    if count > caps.max_workgroups as usize {
        return Err(limit_err(
            format!("{what} workgroups"),
            count as u64,
            "max_compute_workgroups_per_dimension",
            u64::from(caps.max_workgroups),
        ));
    }
    Ok(count as u32)
}

fn base_params(s: &AttnShape, scale: f32, masks: &MaskSpec) -> AttnParams {
    let mut p = AttnParams {
        batch: s.batch as u32,
        m: s.m as u32,
        n: s.n as u32,
        q_heads: s.q_heads as u32,
        kv_heads: s.kv_heads as u32,
        d_k: s.d_k as u32,
        d_v: s.d_v as u32,
        scale,
        n_splits: 1,
        split_len: s.n as u32,
        key_end: s.n as u32,
        ..Default::default()
    };
    masks.apply(&mut p);
    p
}

/// Chunks of (batch·head range, row range) whose work fits one dispatch each.
/// `bh_max` and `rows_max` bound one chunk; rows are only split when one bh is over the cap.
fn chunks(s: &AttnShape, bh_max: usize, rows_max: usize) -> Vec<(usize, usize, usize, usize)> {
    let mut out = Vec::new();
    if rows_max >= s.m {
        let mut bh0 = 0;
        while bh0 < s.bh() {
            let nbh = bh_max.min(s.bh() - bh0);
            out.push((bh0, nbh, 0, s.m));
            bh0 += nbh;
        }
    } else {
        for bh in 0..s.bh() {
            let mut r0 = 0;
            while r0 < s.m {
                let nr = rows_max.min(s.m - r0);
                out.push((bh, 1, r0, nr));
                r0 += nr;
            }
        }
    }
    out
}

fn three_pass(req: &Request, caps: &DeviceCaps) -> Result<Plan> {
    let s = req.shape;
    let row_bytes = bytes(s.n);
    let budget = caps.max_binding.min(caps.max_buffer).min(SCRATCH_BUDGET);
    let max_wg = caps.max_workgroups as usize;
    let qk_scores = Kernel::QkScores {
        masked: !req.masks.is_empty(),
    };
    let kernel_mem = qk_scores.workgroup_bytes();
    if kernel_mem > caps.max_workgroup_bytes {
        return Err(limit_err(
            "qk_scores tiles".into(),
            kernel_mem,
            "max_compute_workgroup_storage_size",
            caps.max_workgroup_bytes,
        ));
    }
    let rows_fit = (budget / row_bytes) as usize;
    if rows_fit == 0 {
        return Err(limit_err(
            format!("one row of {} scores", s.n),
            row_bytes,
            "max_storage_buffer_binding_size",
            budget,
        ));
    }
    // Rows per chunk: the softmax grid has one workgroup per row in x.
    let rows_cap = rows_fit.min(max_wg);
    let (bh_max, rows_max) = if rows_cap >= s.m {
        ((rows_fit / s.m).clamp(1, max_wg), s.m)
    } else if rows_cap >= GEMM_TILE {
        (1, rows_cap / GEMM_TILE * GEMM_TILE)
    } else {
        (1, rows_cap)
    };
    check_grid("qk_scores key-tile", s.n.div_ceil(GEMM_TILE), caps)?;
    check_grid("weighted_sum dim-tile", s.d_v.div_ceil(GEMM_TILE), caps)?;

    let base = base_params(&s, req.scale, &req.masks);
    // Keys one weighted_sum dispatch sums; later key ranges add to O (the loop cap).
    let key_span = caps.loop_len(&Kernel::WeightedSum.loop_cost(&Params::Attn(base)).0);
    let key_span = usize::try_from(key_span).unwrap_or(usize::MAX).max(1);
    let key_ranges = s.n.div_ceil(key_span);
    let mut steps = Vec::new();
    let mut scratch_elems = 0;
    let chunk_list = chunks(&s, bh_max, rows_max);
    let n_chunks = chunk_list.len();
    for (bh0, nbh, r0, nr) in chunk_list {
        scratch_elems = scratch_elems.max(nbh * nr * s.n);
        let params = AttnParams {
            bh_offset: bh0 as u32,
            bh_count: nbh as u32,
            row_offset: r0 as u32,
            rows: nr as u32,
            ..base
        };
        let row_tiles = nr.div_ceil(GEMM_TILE) as u32;
        steps.push(Step::Dispatch(Dispatch {
            kernel: qk_scores,
            params: Params::Attn(params),
            grid: [s.n.div_ceil(GEMM_TILE) as u32, row_tiles, nbh as u32],
            buffers: vec![
                Slot::Q,
                Slot::K,
                Slot::Lens,
                Slot::MaskBits,
                Slot::Bias,
                Slot::Scores,
            ],
        }));
        steps.push(Step::Dispatch(Dispatch {
            kernel: Kernel::SoftmaxRows,
            params: Params::Attn(params),
            grid: [nr as u32, nbh as u32, 1],
            buffers: vec![Slot::Scores, Slot::Lse],
        }));
        for r in 0..key_ranges {
            steps.push(Step::Dispatch(Dispatch {
                kernel: Kernel::WeightedSum,
                params: Params::Attn(AttnParams {
                    key_begin: (r * key_span) as u32,
                    key_end: s.n.min((r + 1) * key_span) as u32,
                    ..params
                }),
                grid: [s.d_v.div_ceil(GEMM_TILE) as u32, row_tiles, nbh as u32],
                buffers: vec![Slot::Scores, Slot::V, Slot::O],
            }));
        }
        if req.weights {
            // P is [bh, M, N]: a chunk of whole bh is one contiguous range, a row block too.
            steps.push(Step::Copy {
                src: Slot::Scores,
                src_offset: 0,
                dst: Slot::Weights,
                dst_offset: bytes((bh0 * s.m + r0) * s.n),
                size: bytes(nbh * nr * s.n),
            });
        }
    }
    Ok(Plan {
        path: Path::ThreePass,
        shape: s,
        masks: req.masks,
        steps,
        scratch: vec![(Slot::Scores, bytes(scratch_elems))],
        outputs: Vec::new(),
        tiling: format!(
            "64×64 output tiles (16×16 invocations, 4×4 each, 16-deep K/V steps); \
             {n_chunks} chunk(s) of ≤{bh_max} head(s) × ≤{rows_max} rows; scores scratch {}{}",
            human_bytes(bytes(scratch_elems)),
            if key_ranges > 1 {
                format!("; P·V over {key_ranges} key ranges of ≤{key_span}")
            } else {
                String::new()
            }
        ),
    })
}

/// Keys per tile of the fused kernel: the largest power of two ≤ 64 whose K and V tiles fit
/// in 16 KiB of workgroup memory (the WebGPU default limit), or the device's limit if lower.
/// Rows per invocation R: the largest of 4, 2, 1 whose rows fit [`FUSED_ROW_FLOATS`] and that
/// M fills (R ≤ ⌈M / FUSED_ROWS⌉: a decode step's single row gets R = 1, not three idle rows),
/// unless a test forced R ([`with_rows_per_invocation`]).
fn fused_kernel(s: &AttnShape, caps: &DeviceCaps, masked: bool) -> Result<Kernel> {
    let dk = s.d_k.next_multiple_of(4) as u32;
    let dv = s.d_v.next_multiple_of(4) as u32;
    let budget = caps.max_workgroup_bytes.min(16 << 10);
    let bc = [64u32, 32, 16, 8, 4]
        .into_iter()
        .find(|bc| u64::from(bc * (dk + dv)) * F32 <= budget)
        .ok_or_else(|| {
            limit_err(
                format!("fused K/V tiles of 4 keys × (d_k {dk} + d_v {dv})"),
                u64::from(4 * (dk + dv)) * F32,
                "max_compute_workgroup_storage_size",
                caps.max_workgroup_bytes,
            )
        })?;
    let filled = s.m.div_ceil(FUSED_ROWS as usize);
    let r = FORCED_ROWS.with(std::cell::Cell::get).unwrap_or_else(|| {
        [4u32, 2, 1]
            .into_iter()
            .find(|&r| r * (dk + dv) <= FUSED_ROW_FLOATS && r as usize <= filled)
            .unwrap_or(1)
    });
    Ok(Kernel::Flash {
        dk,
        dv,
        bc,
        br: FUSED_ROWS * r,
        r,
        masked,
    })
}

thread_local! {
    static FORCED_ROWS: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every fused kernel planned on this thread using `r` query rows per
/// invocation (1, 2 or 4) instead of the planner's choice: how tests run each variant on
/// every path. Not for production use.
#[doc(hidden)]
pub fn with_rows_per_invocation<T>(r: u32, f: impl FnOnce() -> T) -> T {
    assert!(
        matches!(r, 1 | 2 | 4),
        "rows per invocation: 1, 2 or 4, got {r}"
    );
    let before = FORCED_ROWS.with(|c| c.replace(Some(r)));
    struct Restore(Option<u32>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED_ROWS.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Key splits for split-K: enough workgroups to fill a GPU, each split ≥ MIN_SPLIT_KEYS, and
/// none longer than `per_pass` keys (a multiple of the key tile).
fn split_count(s: &AttnShape, caps: &DeviceCaps, per_pass: usize) -> usize {
    let row_blocks = s.m.div_ceil(FUSED_ROWS as usize);
    let wanted = TARGET_WORKGROUPS.div_ceil(row_blocks * s.bh());
    let most = s.n.div_ceil(MIN_SPLIT_KEYS).max(1);
    let needed = s.n.div_ceil(per_pass);
    let mut splits = wanted
        .clamp(1, most)
        .max(needed)
        .min(caps.max_workgroups as usize);
    // Partials must fit one binding each.
    let o_bytes = bytes(s.o_dims().iter().product());
    while splits > needed && o_bytes * splits as u64 > caps.max_binding {
        splits = (splits / 2).max(needed);
    }
    splits
}

/// The fused kernel over all keys (`splits` = None), or split-K with partials and a merge.
fn fused(req: &Request, caps: &DeviceCaps, kernel: Kernel, splits: Option<usize>) -> Result<Plan> {
    let s = req.shape;
    let Kernel::Flash { bc, br, r, .. } = kernel else {
        unreachable!("fused_kernel returns Flash")
    };
    let max_wg = caps.max_workgroups as usize;
    // Split lengths are whole tiles, so no tile straddles two splits.
    let split_k = splits.is_some();
    let split_len =
        s.n.div_ceil(splits.unwrap_or(1))
            .next_multiple_of(bc as usize);
    let splits = s.n.div_ceil(split_len);
    check_grid("split-K key-split", splits, caps)?;
    let rows_max = max_wg * br as usize;
    let (out_o, out_lse) = if split_k {
        (Slot::PartO, Slot::PartLse)
    } else {
        (Slot::O, Slot::Lse)
    };
    let mut base = AttnParams {
        n_splits: splits as u32,
        split_len: split_len as u32,
        ..base_params(&s, req.scale, &req.masks)
    };
    if split_k {
        base.flags |= flags::SPLIT_STATS;
    }
    let mut steps = Vec::new();
    for (bh0, nbh, r0, nr) in chunks(&s, max_wg, rows_max) {
        let params = AttnParams {
            bh_offset: bh0 as u32,
            bh_count: nbh as u32,
            row_offset: r0 as u32,
            rows: nr as u32,
            ..base
        };
        steps.push(Step::Dispatch(Dispatch {
            kernel,
            params: Params::Attn(params),
            grid: [nr.div_ceil(br as usize) as u32, splits as u32, nbh as u32],
            buffers: vec![
                Slot::Q,
                Slot::K,
                Slot::V,
                Slot::Lens,
                Slot::MaskBits,
                Slot::Bias,
                out_o,
                out_lse,
            ],
        }));
    }
    let mut scratch = Vec::new();
    let path = if split_k {
        let part_o = bytes(s.o_dims().iter().product()) * splits as u64;
        let part_stats = 2 * bytes(s.lse_dims().iter().product()) * splits as u64;
        scratch.push((
            Slot::PartO,
            check_binding("split-K partial outputs", part_o, caps)?,
        ));
        scratch.push((
            Slot::PartLse,
            check_binding("split-K partial statistics", part_stats, caps)?,
        ));
        steps.push(merge_step(&s, splits as u32, true, caps)?);
        Path::SplitK
    } else {
        Path::Fused
    };
    Ok(Plan {
        path,
        shape: s,
        masks: req.masks,
        steps,
        scratch,
        outputs: Vec::new(),
        tiling: format!(
            "{} ({r} query row(s) per invocation, {br} per workgroup, {bc}-key K/V tiles in \
             workgroup memory); {}",
            kernel.label(),
            if split_k {
                format!("{splits} key split(s) of {split_len}")
            } else {
                "all keys in one pass".into()
            }
        ),
    })
}

/// A grid of 64-invocation workgroups over `threads`, folded into y and z where x runs out
/// (merge_partials and mean_heads index `gid.x + (gid.y + gid.z·nwg.y)·nwg.x·64`).
fn fold_grid(what: &str, threads: usize, caps: &DeviceCaps) -> Result<[u32; 3]> {
    let most = caps.max_workgroups as usize;
    let groups = threads.div_ceil(MERGE_WG);
    let x = groups.min(most);
    let y = groups.div_ceil(x).min(most);
    let z = check_grid(what, groups.div_ceil(x * y), caps)?;
    Ok([x as u32, y as u32, z])
}

/// The merge of `splits` stacked partials: split-K statistics (`split_stats`, two rows per
/// split) or one LSE row per shard.
fn merge_step(s: &AttnShape, splits: u32, split_stats: bool, caps: &DeviceCaps) -> Result<Step> {
    let grid = fold_grid("merge_partials", s.batch * s.m * s.q_heads * s.d_v, caps)?;
    let mut params = AttnParams {
        n_splits: splits,
        ..base_params(s, 1.0, &MaskSpec::default())
    };
    if split_stats {
        params.flags |= flags::SPLIT_STATS;
    }
    Ok(Step::Dispatch(Dispatch {
        kernel: Kernel::MergePartials,
        params: Params::Attn(params),
        grid,
        buffers: vec![Slot::PartO, Slot::PartLse, Slot::O, Slot::Lse],
    }))
}

/// Output features per workgroup tile of `linear` (and rows per tile).
const LINEAR_TILE: usize = 64;

/// `y [rows, out_dim] = x [rows, in_dim]·w [out_dim, in_dim]ᵀ (+ b)`: one dispatch per chunk
/// of rows that fits the grid (one, for any realistic layer).
pub fn linear_steps(
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    [x, w, b, y]: [Slot; 4],
    has_bias: bool,
    caps: &DeviceCaps,
) -> Result<Vec<Step>> {
    check_binding(
        &format!("linear input [{rows}, {in_dim}]"),
        bytes(rows * in_dim),
        caps,
    )?;
    check_binding(
        &format!("linear weight [{out_dim}, {in_dim}]"),
        bytes(out_dim * in_dim),
        caps,
    )?;
    check_binding(
        &format!("linear output [{rows}, {out_dim}]"),
        bytes(rows * out_dim),
        caps,
    )?;
    let col_tiles = check_grid(
        "linear output-feature tile",
        out_dim.div_ceil(LINEAR_TILE),
        caps,
    )?;
    let rows_max = caps.max_workgroups as usize * LINEAR_TILE;
    let mut steps = Vec::new();
    let mut r0 = 0;
    while r0 < rows {
        let nr = rows_max.min(rows - r0);
        steps.push(Step::Dispatch(Dispatch {
            kernel: Kernel::Linear,
            params: Params::Linear(LinearParams {
                row_offset: r0 as u32,
                rows: nr as u32,
                in_dim: in_dim as u32,
                out_dim: out_dim as u32,
                has_bias: u32::from(has_bias),
                ..Default::default()
            }),
            grid: [col_tiles, nr.div_ceil(LINEAR_TILE) as u32, 1],
            buffers: vec![x, w, b, y],
        }));
        r0 += nr;
    }
    check_loops(&steps, caps)?;
    Ok(steps)
}

/// Weights `[batch, q_heads, M, N]` in `from` averaged over heads into `to` `[batch, M, N]`.
pub fn mean_heads_step(s: &AttnShape, from: Slot, to: Slot, caps: &DeviceCaps) -> Result<Step> {
    let step = Step::Dispatch(Dispatch {
        kernel: Kernel::MeanHeads,
        params: Params::Attn(base_params(s, 1.0, &MaskSpec::default())),
        grid: fold_grid("mean_heads", s.batch * s.m * s.n, caps)?,
        buffers: vec![from, to],
    });
    check_loops(std::slice::from_ref(&step), caps)?;
    Ok(step)
}

/// Refuses steps whose loops the device would cut short (see [`DeviceCaps::loop_cap`]).
/// The planner splits what it can before this; what reaches here has no split.
fn check_loops(steps: &[Step], caps: &DeviceCaps) -> Result<()> {
    let Some(cap) = caps.loop_cap else {
        return Ok(());
    };
    for step in steps {
        let Step::Dispatch(d) = step else { continue };
        let (cost, len) = d.kernel.loop_cost(&d.params);
        let most = caps.loop_len(&cost);
        if len > most {
            return Err(limit_err(
                format!(
                    "{} over {len} {} (at most {most} fit one dispatch on this device)",
                    d.kernel.name(),
                    d.kernel.long_loop(),
                ),
                cost.trips(len),
                "loop iterations per invocation (Mesa llvmpipe ends loops past it)",
                cap,
            ));
        }
    }
    Ok(())
}
