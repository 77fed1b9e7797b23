//! The scheduler: shape + options + device limits → a plan of dispatches and copies.
//!
//! The planner builds a [`Program`]: every dispatch with its params and grid (already checked
//! against the device's limits) over the buffers it declares. It holds no wgpu objects; the
//! executor (`gpu::executor`) turns it into passes, the CPU executor (`cpu::program`) runs it
//! through the kernels' twins.

use std::fmt;

use crate::dtype::{DType, Storage};
use crate::error::{Error, Result};
use crate::fused_config::{ConfigChoice, ConfigSource, FusedConfig};
pub use crate::fused_config::{FUSED_ROWS, FUSED_ROW_FLOATS};
use crate::kernels::flash::Flash;
use crate::kernels::flash_coop::FlashCoop;
use crate::kernels::key_coverage::KeyCoverage;
use crate::kernels::linear::Linear;
use crate::kernels::mean_heads::MeanHeads;
use crate::kernels::merge_partials::MergePartials;
use crate::kernels::pack::Pack;
use crate::kernels::qk_scores::QkScores;
use crate::kernels::softmax_rows::SoftmaxRows;
use crate::kernels::weight_blocks::WeightBlocks;
use crate::kernels::weighted_sum::WeightedSum;
use crate::kernels::{Kernel, KernelSpec, LoopCost};
use crate::mask::MaskSpec;
use crate::params::{flags, AttnParams, BlockOp, LinearParams, PackParams};
pub use crate::program::human_bytes;
use crate::program::{BufferId, Program};
use crate::shape::{AttnShape, F32};
use crate::stats::{Pool, PoolOp, Stats};

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
    /// Whether kernels may declare `f16` arrays (`SHADER_F16` enabled on the device); without,
    /// f16 tensors are read as packed pairs ([`Storage`]).
    pub native_f16: bool,
    /// How many workgroups the device runs at once: split-K splits the keys until the grid
    /// has this many, and a grid that has them is not split.
    pub fill: Fill,
    /// The subgroup size, where the device has subgroup operations (`Features::SUBGROUP`), one
    /// fixed size (the adapter's min = max) and that size divides the fused kernel's 64
    /// invocations: then `flash` may share a row group's keys among a subgroup's lanes
    /// ([`subgroup_lanes_of`]). `None` elsewhere (wgpu's GL backend has no subgroups).
    pub subgroup_lanes: Option<u32>,
    /// Whether each invocation's load from workgroup or storage memory runs as a scalar load
    /// of its own: a CPU adapter (`DeviceType::Cpu`: Mesa's llvmpipe runs invocations as SIMD
    /// lanes and loads lane by lane unless the address is a constant). Then `flash` loads K
    /// and V rows once per subgroup and broadcasts them by default
    /// ([`FusedConfig::broadcast_loads`]).
    pub scalar_lane_loads: bool,
    /// The device's matrix units (cooperative matrices), where xattn enabled them
    /// ([`matrix_units_of`]); `None` elsewhere.
    pub matrix_units: Option<MatrixUnits>,
}

/// Matrix units a device offers to `flash_coop` (`Features::EXPERIMENTAL_COOPERATIVE_MATRIX`):
/// the side of its square tiles (M = N = K, 8 or 16) with f32 accumulators, for f32 inputs and
/// for f16 inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatrixUnits {
    /// Tile side with f32 inputs (Apple's simdgroup matrices: 8), if any.
    pub f32_tile: Option<u32>,
    /// Tile side with f16 inputs (tensor cores: 16), if any.
    pub f16_tile: Option<u32>,
}

/// The matrix units in `configs` (`wgpu::Adapter::cooperative_matrix_properties`): for each
/// input type, the largest square tile with f32 accumulators (the only accumulator xattn
/// uses); `None` if there is none.
pub fn matrix_units_of(configs: &[wgpu::CooperativeMatrixProperties]) -> Option<MatrixUnits> {
    use wgpu::CooperativeScalarType as Ty;
    let tile = |input: Ty| {
        configs
            .iter()
            .filter(|c| {
                c.m_size == c.n_size
                    && c.n_size == c.k_size
                    && matches!(c.m_size, 8 | 16)
                    && c.ab_type == input
                    && c.cr_type == Ty::F32
            })
            .map(|c| c.m_size)
            .max()
    };
    let units = MatrixUnits {
        f32_tile: tile(Ty::F32),
        f16_tile: tile(Ty::F16),
    };
    (units.f32_tile.is_some() || units.f16_tile.is_some()).then_some(units)
}

/// An estimate of how many workgroups keep a device busy, and what it rests on. wgpu reports
/// no compute-unit count, so it is derived from the adapter's device type ([`fill_of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill {
    /// Workgroups the device runs at once (≥ 1).
    pub workgroups: u32,
    /// Why this many (for `--plan`).
    pub basis: &'static str,
}

impl fmt::Display for Fill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "~{} ({})", self.workgroups, self.basis)
    }
}

/// The fill of a GPU the adapter says nothing useful about, and of a discrete one: 20–144
/// compute units, each holding two or more of the fused kernel's workgroups at once.
pub const GPU_FILL: Fill = Fill {
    workgroups: 256,
    basis: "a discrete GPU's estimate: up to ~128 compute units × 2",
};

/// The fill of an adapter of this device type: one workgroup per host thread on a CPU adapter
/// (Mesa's lavapipe and llvmpipe, SwiftShader, WARP run each workgroup on one thread of a pool
/// as large as the host's `host_threads`), 64 on an integrated GPU (8–32 compute units × 2),
/// [`GPU_FILL`] for the rest.
pub fn fill_of(device_type: wgpu::DeviceType, host_threads: usize) -> Fill {
    match device_type {
        wgpu::DeviceType::Cpu => Fill {
            workgroups: u32::try_from(host_threads).unwrap_or(u32::MAX).max(1),
            basis: "a CPU adapter: one workgroup per host thread",
        },
        wgpu::DeviceType::IntegratedGpu => Fill {
            workgroups: 64,
            basis: "an integrated GPU's estimate: up to ~32 compute units × 2",
        },
        _ => GPU_FILL,
    }
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

/// [`DeviceCaps::subgroup_lanes`] of a device: its subgroup size where it has `has_subgroups`,
/// a fixed size (`min == max`: the lanes of a row group must be one whole subgroup) and one
/// that divides [`FUSED_ROWS`] invocations into whole subgroups; `None` otherwise.
pub fn subgroup_lanes_of(has_subgroups: bool, min: u32, max: u32) -> Option<u32> {
    (has_subgroups && min == max && min >= 2 && min.is_power_of_two() && min <= FUSED_ROWS)
        .then_some(min)
}

impl DeviceCaps {
    /// The caps of a device with these limits, on an adapter with no loop cap, filled as a
    /// discrete GPU ([`GPU_FILL`]).
    pub fn from_limits(l: &wgpu::Limits) -> Self {
        Self {
            loop_cap: None,
            native_f16: false,
            fill: GPU_FILL,
            subgroup_lanes: None,
            scalar_lane_loads: false,
            matrix_units: None,
            max_binding: l.max_storage_buffer_binding_size,
            max_buffer: l.max_buffer_size,
            max_workgroups: l.max_compute_workgroups_per_dimension,
            max_workgroup_bytes: u64::from(l.max_compute_workgroup_storage_size),
            uniform_align: u64::from(l.min_uniform_buffer_offset_alignment),
        }
    }

    /// The longest loop a kernel with `cost` may run on this device (unbounded without a cap).
    fn loop_len(&self, cost: &LoopCost) -> u64 {
        // Strictly under the cap: the iteration that reaches it is the one cut.
        self.loop_cap
            .map_or(u64::MAX, |cap| cost.max_len(cap.saturating_sub(1)))
    }
}

/// What to compute, as the planner needs it.
#[derive(Clone, Debug, PartialEq)]
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
    /// Element type of Q, K and V.
    pub dtype: DType,
    /// Element type of O (LSE, P and all statistics are f32).
    pub out_dtype: DType,
    /// Statistics of P to compute.
    pub stats: Stats,
    /// A pooled map of P to compute.
    pub pool: Option<Pool>,
    /// The fused kernel's configuration (forced or tuned) and where it came from, or `None`
    /// for the planner's default ([`FusedConfig::default_for`]).
    pub fused: Option<ConfigChoice>,
}

impl Request {
    /// This request with the fused kernel's configuration forced to `config`.
    pub fn with_fused_config(self, config: FusedConfig) -> Self {
        Self {
            fused: Some(ConfigChoice::forced(config)),
            ..self
        }
    }
}

/// The buffers of one attention in a [`Program`]: declared by [`AttnIo::declare`] for a
/// call of its own, or by a layer that feeds the attention from its projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnIo {
    /// Queries `[batch, M, q_heads, d_k]`.
    pub q: BufferId,
    /// Keys `[batch, N, kv_heads, d_k]`.
    pub k: BufferId,
    /// Values `[batch, N, kv_heads, d_v]`.
    pub v: BufferId,
    /// `[q_lens; batch] ++ [kv_lens; batch]` as u32.
    pub lens: BufferId,
    /// Packed bool-mask bits (one placeholder word when unused).
    pub mask: BufferId,
    /// Additive bias (one placeholder element when unused).
    pub bias: BufferId,
    /// O `[batch, M, q_heads, d_v]`.
    pub o: BufferId,
    /// LSE `[batch, q_heads, M]`.
    pub lse: BufferId,
    /// Weights P `[batch, q_heads, M, N]`, where asked for (three-pass).
    pub weights: Option<BufferId>,
    /// The statistics and pooled map asked for.
    pub stats: StatsIo,
}

/// The outputs of the statistics of P ([`Stats`]) and of its pooled map ([`Pool`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsIo {
    /// Row entropy `[batch, q_heads, M]`.
    pub entropy: Option<BufferId>,
    /// Row focus `[batch, q_heads, M]`.
    pub focus: Option<BufferId>,
    /// Key coverage `[batch, q_heads, N]`.
    pub coverage: Option<BufferId>,
    /// Pooled P `[batch, q_heads, rows, cols]` ([`Pool::grid`]).
    pub pooled: Option<BufferId>,
}

impl StatsIo {
    /// Each output with its name, in the order of [`crate::stats::StatsOutput::named`].
    pub fn named(&self) -> [(&'static str, Option<BufferId>); 4] {
        [
            ("entropy", self.entropy),
            ("focus", self.focus),
            ("coverage", self.coverage),
            ("pooled", self.pooled),
        ]
    }

    /// The dims of output `i` (in the order of [`StatsIo::named`]) for shape `s`.
    pub fn dims(i: usize, s: &AttnShape, pool: Option<Pool>) -> Vec<usize> {
        match i {
            0 | 1 => s.lse_dims().to_vec(),
            2 => vec![s.batch, s.q_heads, s.n],
            _ => {
                let (gr, gc) = pool.map_or((0, 0), |p| p.grid(s.m, s.n));
                vec![s.batch, s.q_heads, gr, gc]
            }
        }
    }

    /// Declares the outputs `stats` and `pool` ask for, named `{prefix}entropy` etc.
    pub fn declare(
        program: &mut Program,
        prefix: &str,
        s: &AttnShape,
        stats: Stats,
        pool: Option<Pool>,
    ) -> Self {
        let mut out = |on: bool, name: &str, elems: usize| {
            on.then(|| program.output(&format!("{prefix}{name}"), bytes(elems)))
        };
        let rows = s.bh() * s.m;
        Self {
            entropy: out(stats.entropy, "entropy", rows),
            focus: out(stats.focus, "focus", rows),
            coverage: out(stats.coverage, "coverage", s.bh() * s.n),
            pooled: pool.and_then(|pool| {
                let (gr, gc) = pool.grid(s.m, s.n);
                out(true, "pooled", s.bh() * gr * gc)
            }),
        }
    }
}

/// Bytes of the lengths, mask and bias inputs as the engine uploads them.
pub fn mask_input_bytes(s: &AttnShape, masks: &MaskSpec) -> [u64; 3] {
    let mask_words = masks
        .mask_dims
        .map_or(1, |d| d[0] * d[1] * d[2] * d[3].div_ceil(32));
    let bias = masks.bias_dims.map_or(1, |d| d.iter().product());
    [bytes(2 * s.batch), bytes(mask_words), bytes(bias)]
}

impl AttnIo {
    /// Declares Q, K, V and the masks of `req` as inputs and O, LSE (and P if asked) as
    /// outputs, each in its element type.
    pub fn declare(program: &mut Program, req: &Request) -> Self {
        let s = &req.shape;
        let size = |dtype: DType, dims: &[usize]| dtype.bytes(dims.iter().product());
        let [lens, mask, bias] = mask_input_bytes(s, &req.masks);
        Self {
            q: program.input("q", size(req.dtype, &s.q_dims())),
            k: program.input("k", size(req.dtype, &s.k_dims())),
            v: program.input("v", size(req.dtype, &s.v_dims())),
            lens: program.input("lens", lens),
            mask: program.input("mask", mask),
            bias: program.input("bias", bias),
            o: program.output("o", size(req.out_dtype, &s.o_dims())),
            lse: program.output("lse", size(DType::F32, &s.lse_dims())),
            weights: req
                .weights
                .then(|| program.output("weights", size(DType::F32, &s.weights_dims()))),
            stats: StatsIo::declare(program, "", s, req.stats, req.pool),
        }
    }
}

/// The work for one attention call: its program and how it was chosen.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The path chosen.
    pub path: Path,
    /// The problem.
    pub shape: AttnShape,
    /// Masks, lengths and logit controls baked into the params.
    pub masks: MaskSpec,
    /// The steps and buffers.
    pub program: Program,
    /// The call's buffers in `program`.
    pub io: AttnIo,
    /// Element type of Q, K and V.
    pub in_dtype: DType,
    /// Element type of O.
    pub out_dtype: DType,
    /// The pooled map of P computed, if any.
    pub pool: Option<Pool>,
    /// One line on the tiling (for people).
    pub tiling: String,
    /// The fused kernel's configuration and why, where the plan runs it.
    pub fused: Option<ConfigChoice>,
}

/// How the planner computes one attention ([`attention`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// The path chosen.
    pub path: Path,
    /// The fused kernel's configuration and why, where the path runs it.
    pub fused: Option<ConfigChoice>,
    /// One line on the tiling (for people).
    pub tiling: String,
}

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
    /// Plans `req` for a device with `caps`: a program of its own, inputs and outputs
    /// declared by [`AttnIo::declare`].
    pub fn new(req: &Request, caps: &DeviceCaps) -> Result<Plan> {
        let mut program = Program::new();
        let io = AttnIo::declare(&mut program, req);
        let Planned {
            path,
            fused,
            tiling,
        } = attention(req, caps, &mut program, &io)?;
        check_loops(&program, caps)?;
        Ok(Plan {
            fused,
            path,
            shape: req.shape,
            masks: req.masks,
            program,
            io,
            in_dtype: req.dtype,
            out_dtype: req.out_dtype,
            pool: req.pool,
            tiling,
        })
    }

    /// Number of dispatches.
    pub fn dispatches(&self) -> usize {
        self.program.dispatches().count()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plan {} for {}", self.path.name(), self.shape)?;
        writeln!(f, "  tiling: {}", self.tiling)?;
        if let Some(fused) = &self.fused {
            writeln!(f, "  config: {fused}")?;
        }
        if let Some(storage) = self
            .program
            .dispatches()
            .find_map(|d| d.kernel.storages().first().copied())
        {
            writeln!(
                f,
                "  dtype: q, k, v {} (read as {}), o {}; computed in f32",
                storage.dtype(),
                storage.name(),
                self.out_dtype
            )?;
        }
        if !self.masks.is_empty() {
            writeln!(f, "  masks: {}", self.masks)?;
        }
        write!(f, "{}", self.program)
    }
}

/// Appends the attention of `req` on `io`'s buffers to `program`: the planner. Returns the
/// path chosen, the fused kernel's configuration and a line on the tiling.
pub fn attention(
    req: &Request,
    caps: &DeviceCaps,
    program: &mut Program,
    io: &AttnIo,
) -> Result<Planned> {
    let s = req.shape;
    assert_eq!(
        req.weights,
        io.weights.is_some(),
        "the weights buffer is declared iff the request asks for P"
    );
    for (name, dims, dtype) in [
        ("q", s.q_dims(), req.dtype),
        ("k", s.k_dims(), req.dtype),
        ("v", s.v_dims(), req.dtype),
        ("output o", s.o_dims(), DType::F32),
    ] {
        check_binding(
            &format!("{name} {dims:?} {dtype} (bound whole to every kernel)"),
            dtype.bytes(dims.iter().product()),
            caps,
        )?;
    }
    let [_, mask_bytes, bias_bytes] = mask_input_bytes(&s, &req.masks);
    if let Some(d) = req.masks.mask_dims {
        check_binding(&format!("mask bits {d:?}"), mask_bytes, caps)?;
    }
    if let Some(d) = req.masks.bias_dims {
        check_binding(&format!("bias {d:?}"), bias_bytes, caps)?;
    }
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
    }
    let fused_ok = s.d_k <= FUSED_MAX_HEAD_DIM && s.d_v <= FUSED_MAX_HEAD_DIM;
    // Fused or split-K, unless forced, is decided with the fused kernel's grid below.
    let path = match req.path {
        Some(p) => p,
        None if req.weights || !fused_ok => Path::ThreePass,
        None => Path::Fused,
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
    // Kernels write O in f32; a half O is packed from an f32 scratch at the end.
    let packed_o = (req.out_dtype != DType::F32).then(|| {
        let o32 = program.scratch("o_f32", bytes(s.o_dims().iter().product()));
        (o32, io.o)
    });
    let io = &AttnIo {
        o: packed_o.map_or(io.o, |(o32, _)| o32),
        ..*io
    };
    let storage = Storage::of(req.dtype, caps.native_f16);
    let (path, fused_choice, tiling) = match path {
        Path::ThreePass => {
            let (path, tiling) = three_pass(req, caps, storage, program, io)?;
            (path, None, tiling)
        }
        Path::Fused | Path::SplitK => {
            let row_stats = req.stats.entropy || req.stats.focus;
            let choice = match &req.fused {
                Some(choice) => ConfigChoice {
                    config: choice.config.validate()?,
                    source: choice.source.clone(),
                },
                None => ConfigChoice {
                    config: FusedConfig::default_for(
                        s.d_k,
                        s.d_v,
                        s.m,
                        caps.subgroup_lanes,
                        caps.scalar_lane_loads,
                    ),
                    source: ConfigSource::Default,
                },
            };
            let kernel = fused_kernel(
                &s,
                caps,
                (!req.masks.is_empty(), row_stats),
                storage,
                choice.config,
            )?;
            let (br, _) = fused_tiles(&kernel);
            let params = base_params(&s, req.scale, &req.masks);
            let per_pass = caps.loop_len(&kernel.loop_cost(bytemuck::bytes_of(&params)).0);
            let per_pass = usize::try_from(per_pass).unwrap_or(usize::MAX).max(1);
            let forced = req.path == Some(Path::SplitK);
            let mut split = split_count(&s, br, caps, per_pass, forced);
            // A forced fused path stays fused where one pass may walk every key; past the
            // loop cap it is split like any other.
            if req.path == Some(Path::Fused) && s.n <= per_pass {
                split = KeySplits {
                    splits: 1,
                    why: "the fused path asked for".into(),
                };
            }
            let (path, tiling) = fused(req, caps, kernel, split, program, io)?;
            (path, Some(choice), tiling)
        }
    };
    if let Some((o32, o)) = packed_o {
        pack(
            program,
            s.o_dims().iter().product(),
            req.out_dtype,
            [o32, o],
            caps,
        )?;
    }
    // The fused kernel (fused and split-K) writes entropy and focus itself.
    stats(req, caps, program, io, path != Path::ThreePass)?;
    Ok(Planned {
        path,
        fused: fused_choice,
        tiling,
    })
}

/// Appends the statistics and the pooled map `io.stats` asks for, from the attention's LSE
/// (entropy and focus only where the fused kernel did not write them: `rows_done`).
fn stats(
    req: &Request,
    caps: &DeviceCaps,
    program: &mut Program,
    io: &AttnIo,
    rows_done: bool,
) -> Result<()> {
    let s = &req.shape;
    let row_outputs = if rows_done {
        [None, None]
    } else {
        [io.stats.entropy, io.stats.focus]
    };
    // Coverage by its own kernel where K rows fit in registers as in the fused kernel.
    let tiled_coverage = s.d_k <= FUSED_MAX_HEAD_DIM;
    if let (Some(out), true) = (io.stats.coverage, tiled_coverage) {
        key_coverage(req, caps, program, io, out)?;
    }
    let outputs = [
        (row_outputs[0], BlockOp::Entropy, (1, s.n)),
        (row_outputs[1], BlockOp::Max, (1, s.n)),
        (
            io.stats.coverage.filter(|_| !tiled_coverage),
            BlockOp::Sum,
            (s.m, 1),
        ),
    ];
    for (out, op, block) in outputs {
        if let Some(out) = out {
            weight_blocks(req, caps, program, io, (op, block), out)?;
        }
    }
    if let (Some(out), Some(pool)) = (io.stats.pooled, req.pool) {
        let op = match pool.op {
            PoolOp::Max => BlockOp::Max,
            PoolOp::Mean => BlockOp::Mean,
        };
        weight_blocks(req, caps, program, io, (op, pool.block(s.m, s.n)), out)?;
    }
    Ok(())
}

/// Appends each key's coverage `Σ_i P_ij` into `out [batch·q_heads, N]` by `key_coverage`:
/// as many passes over the query rows as the device's loop cap needs.
fn key_coverage(
    req: &Request,
    caps: &DeviceCaps,
    program: &mut Program,
    io: &AttnIo,
    out: BufferId,
) -> Result<()> {
    let s = &req.shape;
    check_binding("key coverage", bytes(s.bh() * s.n), caps)?;
    let dk = s.d_k.next_multiple_of(4) as u32;
    // Rows of Q and their LSE per tile.
    let bq = tile_rows(
        &format!("key coverage Q tiles (d_k {dk} + LSE per row)"),
        dk + 1,
        caps,
    )?;
    let kernel = KeyCoverage {
        dk,
        bq,
        masked: !req.masks.is_empty(),
        storage: Storage::of(req.dtype, caps.native_f16),
    };
    let base = base_params(s, req.scale, &req.masks);
    let per_pass = caps.loop_len(&kernel.loop_cost(&base).0);
    // Whole tiles per pass, so that only the last pass has a partial one; where not even one
    // tile fits, check_loops refuses the plan with the cap.
    let bq_rows = bq as usize;
    let per_pass =
        (usize::try_from(per_pass).unwrap_or(usize::MAX) / bq_rows * bq_rows).max(bq_rows);
    let max_wg = caps.max_workgroups as usize;
    let groups = s.n.div_ceil(64);
    let x = groups.min(max_wg);
    let y = check_grid("key coverage", groups.div_ceil(x), caps)?;
    for bh0 in (0..s.bh()).step_by(max_wg) {
        let nbh = max_wg.min(s.bh() - bh0);
        for r0 in (0..s.m).step_by(per_pass) {
            let mut p = AttnParams {
                bh_offset: bh0 as u32,
                bh_count: nbh as u32,
                row_offset: r0 as u32,
                rows: per_pass.min(s.m - r0) as u32,
                ..base
            };
            if r0 > 0 {
                p.flags |= flags::ACCUMULATE;
            }
            let buffers = [io.q, io.k, io.lens, io.mask, io.bias, io.lse, out];
            program.dispatch(kernel, &p, [x as u32, y, nbh as u32], &buffers);
        }
    }
    Ok(())
}

/// Appends `op` over blocks of `block_rows × block_cols` of P, rebuilt from `io`'s Q, K, masks
/// and LSE, into `out [batch·q_heads, ⌈M / block_rows⌉, ⌈N / block_cols⌉]`: as many passes
/// over sub-blocks as the device's loop cap needs (one where it has none).
pub fn weight_blocks(
    req: &Request,
    caps: &DeviceCaps,
    program: &mut Program,
    io: &AttnIo,
    (op, (block_rows, block_cols)): (BlockOp, (usize, usize)),
    out: BufferId,
) -> Result<()> {
    let s = &req.shape;
    let (grid_rows, grid_cols) = (s.m.div_ceil(block_rows), s.n.div_ceil(block_cols));
    let cells = s.bh() * grid_rows * grid_cols;
    check_binding(
        &format!(
            "{} of P over {grid_rows}×{grid_cols} blocks per head",
            op.name()
        ),
        bytes(cells),
        caps,
    )?;
    let kernel = WeightBlocks {
        op,
        masked: !req.masks.is_empty(),
        storage: Storage::of(req.dtype, caps.native_f16),
    };
    let base = AttnParams {
        block_rows: block_rows as u32,
        block_cols: block_cols as u32,
        grid_rows: grid_rows as u32,
        grid_cols: grid_cols as u32,
        bh_count: s.bh() as u32,
        row_offset: 0,
        rows: 1,
        key_begin: 0,
        key_end: 1,
        ..base_params(s, req.scale, &req.masks)
    };
    // (row, key) pairs one pass may walk per block.
    let per_pass = caps.loop_len(&kernel.loop_cost(&base).0);
    // Where not even one pair fits, check_loops refuses the plan with the cap.
    let per_pass = usize::try_from(per_pass).unwrap_or(usize::MAX).max(1);
    let keys = block_cols.min(per_pass);
    let rows = block_rows.min(per_pass / keys);
    let grid = fold_grid("weight_blocks", cells, caps)?;
    let mut first = true;
    for r0 in (0..block_rows).step_by(rows) {
        for c0 in (0..block_cols).step_by(keys) {
            let mut p = AttnParams {
                row_offset: r0 as u32,
                rows: rows.min(block_rows - r0) as u32,
                key_begin: c0 as u32,
                key_end: (c0 + keys).min(block_cols) as u32,
                ..base
            };
            if !first {
                p.flags |= flags::ACCUMULATE;
            }
            first = false;
            let buffers = [io.q, io.k, io.lens, io.mask, io.bias, io.lse, out];
            program.dispatch(kernel, &p, grid, &buffers);
        }
    }
    Ok(())
}

/// Appends packing `elems` f32 values of `from` into `to` as `dtype` pairs.
pub fn pack(
    program: &mut Program,
    elems: usize,
    dtype: DType,
    [from, to]: [BufferId; 2],
    caps: &DeviceCaps,
) -> Result<()> {
    let elems32 = u32::try_from(elems).map_err(|_| {
        limit_err(
            format!("{elems} elements to pack"),
            elems as u64,
            "elements per pack dispatch",
            u64::from(u32::MAX),
        )
    })?;
    program.dispatch(
        Pack { to: dtype },
        &(PackParams {
            elems: elems32,
            ..Default::default()
        }),
        fold_grid("pack", elems.div_ceil(2), caps)?,
        &[from, to],
    );
    Ok(())
}

/// An exact merge of results over disjoint K/V of the same queries: its program and buffers.
#[derive(Clone, Debug)]
pub struct MergePlan {
    /// The copies into stacked partials and the merge.
    pub program: Program,
    /// Each shard's (O, LSE) inputs.
    pub shards: Vec<(BufferId, BufferId)>,
    /// Merged O.
    pub o: BufferId,
    /// Merged LSE.
    pub lse: BufferId,
}

impl MergePlan {
    /// Plans an exact merge of `shards` results over disjoint K/V of the same queries.
    pub fn new(shape: &AttnShape, shards: usize, caps: &DeviceCaps) -> Result<MergePlan> {
        if shards == 0 {
            return Err(Error::Shape("merge needs at least one shard".into()));
        }
        let o_bytes = bytes(shape.o_dims().iter().product());
        let lse_bytes = bytes(shape.lse_dims().iter().product());
        let mut program = Program::new();
        let inputs: Vec<(BufferId, BufferId)> = (0..shards)
            .map(|i| {
                (
                    program.input(&format!("shard{i}.o"), o_bytes),
                    program.input(&format!("shard{i}.lse"), lse_bytes),
                )
            })
            .collect();
        let o = program.output("o", o_bytes);
        let lse = program.output("lse", lse_bytes);
        let part_o = program.scratch(
            "shard_o_stack",
            check_binding("stacked shard outputs", o_bytes * shards as u64, caps)?,
        );
        let part_lse = program.scratch(
            "shard_lse_stack",
            check_binding("stacked shard LSE", lse_bytes * shards as u64, caps)?,
        );
        for (i, (so, sl)) in inputs.iter().enumerate() {
            program.copy((*so, 0), (part_o, i as u64 * o_bytes), o_bytes);
            program.copy((*sl, 0), (part_lse, i as u64 * lse_bytes), lse_bytes);
        }
        merge_step(
            shape,
            shards as u32,
            (false, None),
            caps,
            &mut program,
            [part_o, part_lse, o, lse],
        )?;
        check_loops(&program, caps)?;
        Ok(MergePlan {
            program,
            shards: inputs,
            o,
            lse,
        })
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

/// The params of attention over all of `s` with `masks` applied (no chunk, one split): what
/// every attention dispatch starts from.
pub fn base_params(s: &AttnShape, scale: f32, masks: &MaskSpec) -> AttnParams {
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

fn three_pass(
    req: &Request,
    caps: &DeviceCaps,
    storage: Storage,
    program: &mut Program,
    io: &AttnIo,
) -> Result<(Path, String)> {
    let s = req.shape;
    let row_bytes = bytes(s.n);
    let budget = caps.max_binding.min(caps.max_buffer).min(SCRATCH_BUDGET);
    let max_wg = caps.max_workgroups as usize;
    let qk_scores = QkScores {
        masked: !req.masks.is_empty(),
        storage,
    };
    let weighted_sum = WeightedSum { storage };
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
    let key_span = caps.loop_len(&weighted_sum.loop_cost(&base).0);
    let key_span = usize::try_from(key_span).unwrap_or(usize::MAX).max(1);
    let key_ranges = s.n.div_ceil(key_span);
    let chunk_list = chunks(&s, bh_max, rows_max);
    let n_chunks = chunk_list.len();
    let scratch_elems = chunk_list
        .iter()
        .map(|&(_, nbh, _, nr)| nbh * nr * s.n)
        .max()
        .unwrap_or(0);
    let scores = program.scratch("scores", bytes(scratch_elems));
    for (bh0, nbh, r0, nr) in chunk_list {
        let params = AttnParams {
            bh_offset: bh0 as u32,
            bh_count: nbh as u32,
            row_offset: r0 as u32,
            rows: nr as u32,
            ..base
        };
        let row_tiles = nr.div_ceil(GEMM_TILE) as u32;
        program.dispatch(
            qk_scores,
            &params,
            [s.n.div_ceil(GEMM_TILE) as u32, row_tiles, nbh as u32],
            &[io.q, io.k, io.lens, io.mask, io.bias, scores],
        );
        program.dispatch(
            SoftmaxRows,
            &params,
            [nr as u32, nbh as u32, 1],
            &[scores, io.lse],
        );
        for r in 0..key_ranges {
            program.dispatch(
                weighted_sum,
                &(AttnParams {
                    key_begin: (r * key_span) as u32,
                    key_end: s.n.min((r + 1) * key_span) as u32,
                    ..params
                }),
                [s.d_v.div_ceil(GEMM_TILE) as u32, row_tiles, nbh as u32],
                &[scores, io.v, io.o],
            );
        }
        if let Some(weights) = io.weights {
            // P is [bh, M, N]: a chunk of whole bh is one contiguous range, a row block too.
            program.copy(
                (scores, 0),
                (weights, bytes((bh0 * s.m + r0) * s.n)),
                bytes(nbh * nr * s.n),
            );
        }
    }
    Ok((
        Path::ThreePass,
        format!(
            "64×64 output tiles (16×16 invocations, 4×4 each, 16-deep K/V steps); \
             {n_chunks} chunk(s) of ≤{bh_max} head(s) × ≤{rows_max} rows; scores scratch {}{}",
            human_bytes(bytes(scratch_elems)),
            if key_ranges > 1 {
                format!("; P·V over {key_ranges} key ranges of ≤{key_span}")
            } else {
                String::new()
            }
        ),
    ))
}

/// Rows per workgroup-memory tile of `floats` f32 each: the most of 64, 32, 16, 8, 4 that fit
/// the device's workgroup memory and the portable 16 KiB.
fn tile_rows(what: &str, floats: u32, caps: &DeviceCaps) -> Result<u32> {
    let budget = caps.max_workgroup_bytes.min(16 << 10);
    [64u32, 32, 16, 8, 4]
        .into_iter()
        .find(|rows| u64::from(rows * floats) * F32 <= budget)
        .ok_or_else(|| {
            limit_err(
                format!("{what}: 4 rows × {floats} floats"),
                u64::from(4 * floats) * F32,
                "max_compute_workgroup_storage_size",
                caps.max_workgroup_bytes,
            )
        })
}

/// The fused kernel with `config`: keys per tile the largest power of two ≤ 64 whose K and V
/// tiles fit in 16 KiB of workgroup memory (the WebGPU default limit), or the device's limit
/// if lower ([`tile_rows`]); subgroup lanes where `config` asks for them and the device has
/// them (else [`Error::Argument`]).
fn fused_kernel(
    s: &AttnShape,
    caps: &DeviceCaps,
    (masked, stats): (bool, bool),
    storage: Storage,
    config: FusedConfig,
) -> Result<Kernel> {
    if config.matrix_units {
        return matrix_unit_kernel(s, caps, (masked, stats), storage);
    }
    let dk = s.d_k.next_multiple_of(4) as u32;
    let dv = s.d_v.next_multiple_of(4) as u32;
    let bc = tile_rows(
        &format!("fused K/V tiles (d_k {dk} + d_v {dv} per key)"),
        dk + dv,
        caps,
    )?;
    let r = config.rows_per_invocation;
    let subgroup = |on: bool, what: &str| match (on, caps.subgroup_lanes) {
        (false, _) => Ok(1),
        (true, Some(lanes)) => Ok(lanes),
        (true, None) => Err(Error::Argument(format!(
            "{what} need a device with subgroup operations of one fixed size; this one has \
             none"
        ))),
    };
    let lanes = subgroup(config.subgroup_lanes, "subgroup lanes")?;
    let broadcast = subgroup(config.broadcast_loads, "broadcast loads")?;
    Ok(Kernel::Flash(Flash {
        dk,
        dv,
        bc,
        br: FUSED_ROWS / lanes * r,
        r,
        masked,
        storage,
        stats,
        wide: s.d_k.is_multiple_of(4) && s.d_v.is_multiple_of(4),
        lanes,
        broadcast,
    }))
}

/// The fused kernel on matrix units (`flash_coop`), where the device has them for these
/// inputs: f16 matrix inputs only where Q, K and V are f16 already (rounding f32 or bf16
/// inputs to f16 would change the answer), f32 inputs for any storage (widening is exact);
/// one subgroup per workgroup; keys per tile the largest of 64, 32, 16 and 8 (a multiple of
/// the tile side) whose workgroup memory fits the device. Else [`Error::Argument`] or a limit
/// error saying what is missing.
fn matrix_unit_kernel(
    s: &AttnShape,
    caps: &DeviceCaps,
    (masked, stats): (bool, bool),
    storage: Storage,
) -> Result<Kernel> {
    let Some(units) = caps.matrix_units else {
        return Err(Error::Argument(
            "matrix units need a device with cooperative matrices enabled \
             (XATTN_MATRIX_UNITS=1 on an adapter that reports them); this one has none"
                .into(),
        ));
    };
    if stats {
        return Err(Error::Argument(
            "the matrix-unit kernel writes no row entropy or focus; leave them out or use \
             the default configuration"
                .into(),
        ));
    }
    let Some(lanes) = caps.subgroup_lanes else {
        return Err(Error::Argument(
            "the matrix-unit kernel runs one subgroup per workgroup and needs one fixed \
             subgroup size; this device has none"
                .into(),
        ));
    };
    let (tile, half_inputs) = match (storage, units.f16_tile, units.f32_tile) {
        (Storage::F16, Some(t), _) => (t, true),
        (_, _, Some(t)) => (t, false),
        _ => {
            return Err(Error::Argument(format!(
                "this device's matrix units take f16 inputs only; Q, K and V are {} here, \
                 and rounding them to f16 would change the answer (use f16 inputs)",
                storage.name()
            )))
        }
    };
    let dk = s.d_k.next_multiple_of(tile as usize) as u32;
    let dv = s.d_v.next_multiple_of(tile as usize) as u32;
    let kernel = |bc| {
        Kernel::FlashCoop(FlashCoop {
            dk,
            dv,
            bc,
            tile,
            half_inputs,
            masked,
            storage,
            lanes,
        })
    };
    let smallest = kernel(tile);
    [64, 32, 16, 8]
        .into_iter()
        .filter(|bc: &u32| bc.is_multiple_of(tile))
        .map(kernel)
        .find(|k| k.workgroup_bytes() <= caps.max_workgroup_bytes)
        .ok_or_else(|| {
            limit_err(
                format!("matrix-unit tiles (d_k {dk}, d_v {dv}, {tile}-key tiles)"),
                smallest.workgroup_bytes(),
                "max_compute_workgroup_storage_size",
                caps.max_workgroup_bytes,
            )
        })
}

/// Query rows per workgroup and keys per tile of a fused kernel (`flash` or `flash_coop`).
fn fused_tiles(kernel: &Kernel) -> (u32, u32) {
    match *kernel {
        Kernel::Flash(Flash { br, bc, .. }) => (br, bc),
        Kernel::FlashCoop(FlashCoop { tile, bc, .. }) => (tile, bc),
        _ => unreachable!("fused_kernel returns flash or flash_coop"),
    }
}

/// The key splits of the fused kernel and why ([`split_count`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySplits {
    /// Splits asked for (the plan rounds their length up to whole tiles, which may leave
    /// fewer).
    pub splits: usize,
    /// Why this many (for the plan's description).
    pub why: String,
}

/// Key splits for the fused kernel on a grid of `br`-row workgroups: one where the grid alone
/// fills the device ([`DeviceCaps::fill`]), else as many as fill it, each of at least
/// [`MIN_SPLIT_KEYS`] keys; at least two when split-K is `forced`; always enough that none is
/// longer than `per_pass` keys (the loop cap); halved while the partials outgrow a binding.
/// A pure function of shape and caps.
pub fn split_count(
    s: &AttnShape,
    br: u32,
    caps: &DeviceCaps,
    per_pass: usize,
    forced: bool,
) -> KeySplits {
    let grid = s.m.div_ceil(br as usize) * s.bh();
    let fill = caps.fill.workgroups as usize;
    let mut why = format!("{grid} workgroup(s) of {br} rows for {}", caps.fill);
    let mut splits = if grid >= fill {
        why.push_str(" fill it");
        1
    } else {
        let wanted = fill.div_ceil(grid);
        let most = (s.n / MIN_SPLIT_KEYS).max(1);
        why.push_str(&format!(": {wanted} split(s) fill it"));
        if wanted > most {
            why.push_str(&format!(", {most} with ≥ {MIN_SPLIT_KEYS} keys each"));
        }
        wanted.min(most)
    };
    if forced && splits < 2 {
        splits = 2;
        why.push_str("; split-K asked for: 2");
    }
    let needed = s.n.div_ceil(per_pass);
    if splits < needed {
        splits = needed;
        why.push_str(&format!(
            "; {needed} so that no split walks more than the loop cap's {per_pass} keys"
        ));
    }
    let most_grid = caps.max_workgroups as usize;
    if splits > most_grid.max(needed) {
        splits = most_grid.max(needed);
        why.push_str(&format!(
            "; {splits} by max_compute_workgroups_per_dimension"
        ));
    }
    // Partials must fit one binding each.
    let o_bytes = bytes(s.o_dims().iter().product());
    let before = splits;
    while splits > needed && o_bytes * splits as u64 > caps.max_binding {
        splits = (splits / 2).max(needed);
    }
    if splits < before {
        why.push_str(&format!(
            "; {splits} so that the partial outputs fit one binding"
        ));
    }
    KeySplits { splits, why }
}

/// The fused kernel over all keys (one split), or split-K with partials and a merge.
fn fused(
    req: &Request,
    caps: &DeviceCaps,
    kernel: Kernel,
    split: KeySplits,
    program: &mut Program,
    io: &AttnIo,
) -> Result<(Path, String)> {
    let s = req.shape;
    let (br, bc) = fused_tiles(&kernel);
    let stats = matches!(kernel, Kernel::Flash(Flash { stats: true, .. }));
    let max_wg = caps.max_workgroups as usize;
    // Split lengths are whole tiles, so no tile straddles two splits.
    let split_k = split.splits > 1;
    let split_len = s.n.div_ceil(split.splits).next_multiple_of(bc as usize);
    let splits = s.n.div_ceil(split_len);
    check_grid("split-K key-split", splits, caps)?;
    let rows_max = max_wg * br as usize;
    let (out_o, out_lse) = if split_k {
        let part_o = bytes(s.o_dims().iter().product()) * splits as u64;
        let part_stats = 2 * bytes(s.lse_dims().iter().product()) * splits as u64;
        (
            program.scratch(
                "split_o",
                check_binding("split-K partial outputs", part_o, caps)?,
            ),
            program.scratch(
                "split_stats",
                check_binding("split-K partial statistics", part_stats, caps)?,
            ),
        )
    } else {
        (io.o, io.lse)
    };
    // Row entropy and focus: [n_splits, 2, rows] from flash (merged into [2, rows] by
    // split-K), copied into the outputs asked for.
    let rows = s.bh() * s.m;
    let row_stats = stats.then(|| {
        let final_stats = program.scratch("row_stats", bytes(2 * rows));
        let parts = split_k.then(|| program.scratch("split_row_stats", bytes(2 * rows * splits)));
        (final_stats, parts)
    });
    if let Some((_, Some(_))) = row_stats {
        check_binding(
            "split-K partial row statistics",
            bytes(2 * rows * splits),
            caps,
        )?;
    }
    let mut base = AttnParams {
        n_splits: splits as u32,
        split_len: split_len as u32,
        ..base_params(&s, req.scale, &req.masks)
    };
    if split_k {
        base.flags |= flags::SPLIT_STATS;
    }
    for (bh0, nbh, r0, nr) in chunks(&s, max_wg, rows_max) {
        let params = AttnParams {
            bh_offset: bh0 as u32,
            bh_count: nbh as u32,
            row_offset: r0 as u32,
            rows: nr as u32,
            ..base
        };
        let mut buffers = vec![io.q, io.k, io.v, io.lens, io.mask, io.bias, out_o, out_lse];
        if let Some((final_stats, parts)) = row_stats {
            buffers.push(parts.unwrap_or(final_stats));
        }
        program.dispatch(
            kernel,
            &params,
            [nr.div_ceil(br as usize) as u32, splits as u32, nbh as u32],
            &buffers,
        );
    }
    let path = if split_k {
        let rows = row_stats.map(|(final_stats, parts)| [parts.expect("split-K"), final_stats]);
        merge_step(
            &s,
            splits as u32,
            (true, rows),
            caps,
            program,
            [out_o, out_lse, io.o, io.lse],
        )?;
        Path::SplitK
    } else {
        Path::Fused
    };
    if let Some((final_stats, _)) = row_stats {
        let size = bytes(rows);
        for (out, offset) in [(io.stats.entropy, 0), (io.stats.focus, size)] {
            if let Some(out) = out {
                program.copy((final_stats, offset), (out, 0), size);
            }
        }
    }
    let how = match kernel {
        Kernel::Flash(Flash {
            r,
            wide,
            lanes,
            broadcast,
            ..
        }) => format!(
            "{r} query row(s) per {}, {br} per workgroup, {bc}-key K/V tiles in workgroup \
             memory{}, {}",
            if lanes > 1 {
                format!("subgroup of {lanes} lanes sharing their keys")
            } else {
                "invocation".to_string()
            },
            if broadcast > 1 {
                format!(", each K/V row loaded once per subgroup of {broadcast} and broadcast")
            } else {
                String::new()
            },
            if wide {
                "Q, K, V and O in vec4s"
            } else {
                "Q, K, V and O element by element: a head dim is not a multiple of 4"
            },
        ),
        Kernel::FlashCoop(FlashCoop {
            tile,
            half_inputs,
            lanes,
            ..
        }) => format!(
            "matrix units: {tile}×{tile} tiles with {} inputs and f32 accumulators, one \
             subgroup of {lanes} lanes per {br} query rows, {bc}-key K/V tiles in workgroup \
             memory{}",
            if half_inputs { "f16" } else { "f32" },
            if half_inputs {
                "; the weights P are rounded to f16 for P·V"
            } else {
                ""
            }
        ),
        _ => unreachable!("fused_kernel returns flash or flash_coop"),
    };
    Ok((
        path,
        format!(
            "{} ({how}); {}",
            kernel.label(),
            if split_k {
                format!(
                    "{splits} key split(s) of {split_len} (whole tiles): {}",
                    split.why
                )
            } else {
                format!("all keys in one pass: {}", split.why)
            }
        ),
    ))
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
/// With `row_stats` (`[parts, out]`), split-K's row entropy and focus are merged too.
fn merge_step(
    s: &AttnShape,
    splits: u32,
    (split_stats, row_stats): (bool, Option<[BufferId; 2]>),
    caps: &DeviceCaps,
    program: &mut Program,
    buffers: [BufferId; 4],
) -> Result<()> {
    let grid = fold_grid("merge_partials", s.batch * s.m * s.q_heads * s.d_v, caps)?;
    let mut params = AttnParams {
        n_splits: splits,
        ..base_params(s, 1.0, &MaskSpec::default())
    };
    if split_stats {
        params.flags |= flags::SPLIT_STATS;
    }
    let mut buffers = buffers.to_vec();
    buffers.extend(row_stats.into_iter().flatten());
    let kernel = MergePartials {
        stats: row_stats.is_some(),
    };
    program.dispatch(kernel, &params, grid, &buffers);
    Ok(())
}

/// Output features per workgroup tile of `linear` (and rows per tile).
const LINEAR_TILE: usize = 64;

/// Appends `y [rows, out_dim] = x [rows, in_dim]·w [out_dim, in_dim]ᵀ (+ b)` to `program`:
/// one dispatch per chunk of rows that fits the grid (one, for any realistic layer).
pub fn linear(
    program: &mut Program,
    (rows, in_dim, out_dim): (usize, usize, usize),
    [x, w, b, y]: [BufferId; 4],
    (x_type, w_type): (DType, DType),
    has_bias: bool,
    caps: &DeviceCaps,
) -> Result<()> {
    let kernel = Linear {
        x: Storage::of(x_type, caps.native_f16),
        w: Storage::of(w_type, caps.native_f16),
    };
    check_binding(
        &format!("linear input [{rows}, {in_dim}] {x_type}"),
        x_type.bytes(rows * in_dim),
        caps,
    )?;
    check_binding(
        &format!("linear weight [{out_dim}, {in_dim}] {w_type}"),
        w_type.bytes(out_dim * in_dim),
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
    let mut r0 = 0;
    while r0 < rows {
        let nr = rows_max.min(rows - r0);
        program.dispatch(
            kernel,
            &(LinearParams {
                row_offset: r0 as u32,
                rows: nr as u32,
                in_dim: in_dim as u32,
                out_dim: out_dim as u32,
                has_bias: u32::from(has_bias),
                ..Default::default()
            }),
            [col_tiles, nr.div_ceil(LINEAR_TILE) as u32, 1],
            &[x, w, b, y],
        );
        r0 += nr;
    }
    Ok(())
}

/// Appends the weights `[batch, q_heads, M, N]` in `from` averaged over heads into `to`
/// `[batch, M, N]`.
pub fn mean_heads(
    program: &mut Program,
    s: &AttnShape,
    [from, to]: [BufferId; 2],
    caps: &DeviceCaps,
) -> Result<()> {
    program.dispatch(
        MeanHeads,
        &(base_params(s, 1.0, &MaskSpec::default())),
        fold_grid("mean_heads", s.batch * s.m * s.n, caps)?,
        &[from, to],
    );
    Ok(())
}

/// Refuses programs with a dispatch whose loops the device would cut short (see
/// [`DeviceCaps::loop_cap`]). The planner splits what it can before this; what reaches here
/// has no split. Every program the engine binds passes through here.
pub fn check_loops(program: &Program, caps: &DeviceCaps) -> Result<()> {
    let Some(cap) = caps.loop_cap else {
        return Ok(());
    };
    for d in program.dispatches() {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A device without a loop cap or subgroups, filled as a GPU (the tuner's tests start here too).
    pub(crate) const CAPS: DeviceCaps = DeviceCaps {
        max_binding: 128 << 20,
        max_buffer: 2 << 30,
        max_workgroups: 65535,
        max_workgroup_bytes: 32 << 10,
        uniform_align: 256,
        loop_cap: None,
        native_f16: false,
        fill: GPU_FILL,
        subgroup_lanes: None,
        scalar_lane_loads: false,
        matrix_units: None,
    };

    fn caps_filled_by(workgroups: u32) -> DeviceCaps {
        DeviceCaps {
            fill: Fill {
                workgroups,
                basis: "test",
            },
            ..CAPS
        }
    }

    fn shape(m: usize, n: usize, heads: usize) -> AttnShape {
        AttnShape {
            batch: 1,
            m,
            n,
            q_heads: heads,
            kv_heads: heads,
            d_k: 64,
            d_v: 64,
        }
    }

    fn plan(s: AttnShape, path: Option<Path>, caps: &DeviceCaps) -> Plan {
        let req = Request {
            shape: s,
            scale: 0.125,
            weights: false,
            path,
            masks: MaskSpec::default(),
            dtype: DType::F32,
            out_dtype: DType::F32,
            stats: Stats::default(),
            pool: None,
            fused: None,
        };
        Plan::new(&req, caps).expect("plans")
    }

    /// The flash dispatch's grid: [row blocks, key splits, heads].
    fn flash_grid(plan: &Plan) -> [u32; 3] {
        plan.program
            .dispatches()
            .find(|d| d.kernel.name() == "flash")
            .expect("a flash dispatch")
            .grid
    }

    /// A device with 16×16 f16 tiles and subgroups of 32 (tensor cores through Vulkan).
    const TENSOR_CORES: DeviceCaps = DeviceCaps {
        matrix_units: Some(MatrixUnits {
            f32_tile: None,
            f16_tile: Some(16),
        }),
        subgroup_lanes: Some(32),
        native_f16: true,
        max_workgroup_bytes: 48 << 10,
        ..CAPS
    };

    fn matrix_request(dtype: DType, entropy: bool) -> Request {
        Request {
            shape: shape(40, 77, 2),
            scale: 0.125,
            weights: false,
            path: None,
            masks: MaskSpec::default(),
            dtype,
            out_dtype: DType::F32,
            stats: Stats {
                entropy,
                ..Stats::default()
            },
            pool: None,
            fused: None,
        }
    }

    #[test]
    fn matrix_units_of_keep_square_f32_accumulating_tiles() {
        use wgpu::CooperativeScalarType::{F16, F32};
        let config = |m, n, k, ab, cr| wgpu::CooperativeMatrixProperties {
            m_size: m,
            n_size: n,
            k_size: k,
            ab_type: ab,
            cr_type: cr,
            saturating_accumulation: false,
        };
        assert_eq!(matrix_units_of(&[]), None);
        // f16 accumulators and non-square tiles are of no use.
        assert_eq!(
            matrix_units_of(&[config(16, 16, 16, F16, F16), config(16, 8, 16, F16, F32)]),
            None
        );
        assert_eq!(
            matrix_units_of(&[
                config(8, 8, 8, F16, F32),
                config(16, 16, 16, F16, F32),
                config(8, 8, 8, F32, F32),
            ]),
            Some(MatrixUnits {
                f32_tile: Some(8),
                f16_tile: Some(16),
            })
        );
    }

    #[test]
    fn matrix_units_run_only_where_forced_and_fitting() {
        let label = |p: &Plan| -> Vec<String> {
            p.program
                .dispatches()
                .filter(|d| d.kernel.name().starts_with("flash"))
                .map(|d| d.kernel.label())
                .collect()
        };
        // Neither the default nor any other configuration picks them.
        let auto = Plan::new(&matrix_request(DType::F16, false), &TENSOR_CORES).unwrap();
        assert!(
            label(&auto).iter().all(|l| l.starts_with("xattn.flash_dk")),
            "{auto}"
        );
        // Forced with f16 inputs: 16×16 f16 tiles.
        let forced = matrix_request(DType::F16, false).with_fused_config(FusedConfig::MATRIX_UNITS);
        let p = Plan::new(&forced, &TENSOR_CORES).unwrap();
        assert_eq!(
            label(&p),
            ["xattn.flash_coop_dk64_dv64_bc64_t16_f16_lanes32_f16"],
            "{p}"
        );
        // Refused, with the reason: no matrix units; f32 inputs on f16-only tiles; row
        // statistics; no fixed subgroup size; too little workgroup memory.
        let refused = |req: &Request, caps: &DeviceCaps, why: &str| {
            let err = Plan::new(req, caps).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        };
        refused(&forced, &CAPS, "cooperative matrices");
        let f32_inputs =
            matrix_request(DType::F32, false).with_fused_config(FusedConfig::MATRIX_UNITS);
        refused(&f32_inputs, &TENSOR_CORES, "f16 inputs only");
        let stats = matrix_request(DType::F16, true).with_fused_config(FusedConfig::MATRIX_UNITS);
        refused(&stats, &TENSOR_CORES, "entropy");
        let no_lanes = DeviceCaps {
            subgroup_lanes: None,
            ..TENSOR_CORES
        };
        refused(&forced, &no_lanes, "subgroup");
        let small = DeviceCaps {
            max_workgroup_bytes: 4 << 10,
            ..TENSOR_CORES
        };
        refused(&forced, &small, "max_compute_workgroup_storage_size");
    }

    #[test]
    fn vec4_bindings_where_both_head_dims_allow() {
        for (d_k, d_v, wide) in [
            (64, 64, true),
            (40, 8, true),
            (64, 30, false),
            (3, 64, false),
        ] {
            let p = plan(
                AttnShape {
                    d_k,
                    d_v,
                    ..shape(8, 8, 1)
                },
                Some(Path::Fused),
                &CAPS,
            );
            let flash = p.program.dispatches().find(|d| d.kernel.name() == "flash");
            let got = matches!(flash.expect("a flash dispatch").kernel, Kernel::Flash(Flash { wide, .. }) if wide);
            assert_eq!(got, wide, "d_k {d_k}, d_v {d_v}: {p}");
        }
    }

    #[test]
    fn more_workgroups_take_fewer_splits() {
        let caps = caps_filled_by(256);
        let mut last = usize::MAX;
        for heads in [1, 2, 3, 8, 64, 255, 256, 1000] {
            let got = split_count(&shape(1, 1 << 16, heads), 64, &caps, usize::MAX, false);
            assert_eq!(got.splits, 256usize.div_ceil(heads).max(1), "{heads} heads");
            assert!(got.splits <= last, "{heads} heads: {got:?}");
            last = got.splits;
        }
        assert_eq!(last, 1, "a grid past the fill is not split");
    }

    #[test]
    fn a_larger_device_takes_more_splits() {
        let s = shape(256, 16384, 1);
        let counts: Vec<usize> = [1, 2, 16, 64, 256]
            .map(|fill| split_count(&s, 256, &caps_filled_by(fill), usize::MAX, false).splits)
            .to_vec();
        // One 256-row workgroup: as many splits as the device runs workgroups, up to
        // N / MIN_SPLIT_KEYS = 128.
        assert_eq!(counts, [1, 2, 16, 64, 128]);
    }

    #[test]
    fn splits_keep_min_keys_loop_cap_and_forced_minimum() {
        let caps = caps_filled_by(256);
        // 300 keys hold two splits of ≥ 128 keys, not 256.
        let s = shape(1, 300, 1);
        assert_eq!(split_count(&s, 64, &caps, usize::MAX, false).splits, 2);
        // A grid that fills the device is split only as far as the loop cap needs.
        let s = shape(4096, 10_000, 16);
        assert_eq!(split_count(&s, 256, &caps, usize::MAX, false).splits, 1);
        let capped = split_count(&s, 256, &caps, 3000, false);
        assert_eq!(capped.splits, 4, "{capped:?}");
        assert!(capped.why.contains("loop cap"), "{capped:?}");
        // Split-K asked for on a filled device still splits.
        let forced = split_count(&s, 256, &caps, usize::MAX, true);
        assert_eq!(forced.splits, 2, "{forced:?}");
    }

    #[test]
    fn workgroups_are_counted_in_rows_of_the_chosen_r() {
        // Square B1 H8 M1024 d64 runs R = 4: 256 rows per workgroup, 4 × 8 = 32 workgroups.
        // On a device filled by 64 that is 2 splits (counting 64-row blocks, 128 workgroups,
        // would not split).
        let p = plan(shape(1024, 1024, 8), None, &caps_filled_by(64));
        assert_eq!(p.path, Path::SplitK, "{p}");
        assert_eq!(flash_grid(&p), [4, 2, 8], "{p}");
        let p = plan(shape(1024, 1024, 8), None, &caps_filled_by(32));
        assert_eq!((p.path, flash_grid(&p)), (Path::Fused, [4, 1, 8]), "{p}");
    }

    #[test]
    fn the_auto_path_follows_the_device() {
        // Decode B1 H8 M1 N1500: 8 one-row workgroups fill a 2-thread CPU adapter (one pass);
        // a discrete GPU gets splits of ≥ 128 keys.
        let decode = shape(1, 1500, 8);
        let cpu = DeviceCaps {
            fill: fill_of(wgpu::DeviceType::Cpu, 2),
            ..CAPS
        };
        let p = plan(decode, None, &cpu);
        assert_eq!((p.path, flash_grid(&p)), (Path::Fused, [1, 1, 8]), "{p}");
        assert!(p.tiling.contains("one workgroup per host thread"), "{p}");
        let p = plan(decode, None, &CAPS);
        assert_eq!((p.path, flash_grid(&p)), (Path::SplitK, [1, 10, 8]), "{p}");
        // 11 splits of ≥ 128 keys asked, 10 once rounded to whole 32-key tiles.
        assert!(p.tiling.contains("11 with ≥ 128 keys each"), "{p}");
        // Perceiver B1 H1 M256 N16384: one workgroup; two splits fill two threads.
        let p = plan(shape(256, 16384, 1), None, &cpu);
        assert_eq!((p.path, flash_grid(&p)), (Path::SplitK, [1, 2, 1]), "{p}");
    }

    #[test]
    fn fill_by_device_type() {
        use wgpu::DeviceType::*;
        assert_eq!(fill_of(Cpu, 16).workgroups, 16);
        assert_eq!(fill_of(Cpu, 0).workgroups, 1);
        assert_eq!(fill_of(IntegratedGpu, 16).workgroups, 64);
        for t in [DiscreteGpu, VirtualGpu, Other] {
            assert_eq!(fill_of(t, 16), GPU_FILL);
        }
    }
}
