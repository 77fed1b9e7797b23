//! The attention planners: three-pass, fused and split-K, the merge of shards, and the
//! [`Plan`] of one call.

use std::fmt;

use crate::dtype::{DType, Storage};
use crate::error::{Error, Result};
use crate::fused_config::{ConfigChoice, ConfigSource, FusedConfig, FUSED_ROWS};
use crate::kernels::flash::Flash;
use crate::kernels::flash_coop::FlashCoop;
use crate::kernels::merge_partials::MergePartials;
use crate::kernels::qk_scores::QkScores;
use crate::kernels::softmax_rows::SoftmaxRows;
use crate::kernels::weighted_sum::WeightedSum;
use crate::kernels::{Kernel, KernelSpec};
use crate::mask::MaskSpec;
use crate::params::{flags, AttnParams};
use crate::plan::check::{
    bytes, check_binding, check_grid, check_loops, fold_grid, limit_err, tile_rows,
};
use crate::plan::device::DeviceCaps;
use crate::plan::layer::pack;
use crate::plan::request::{mask_input_bytes, AttnIo, Path, Request};
use crate::plan::stats::stats;
use crate::program::{BufferId, Program};
use crate::shape::human_bytes;
use crate::shape::AttnShape;
use crate::stats::Pool;

/// The work for one attention call: its program and how it was chosen.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The path chosen.
    pub(crate) path: Path,
    /// The problem.
    pub(crate) shape: AttnShape,
    /// Masks, lengths and logit controls baked into the params.
    pub(crate) masks: MaskSpec,
    /// The steps and buffers.
    pub(crate) program: Program,
    /// The call's buffers in `program`.
    pub(crate) io: AttnIo,
    /// Element type of Q, K and V.
    pub(crate) in_dtype: DType,
    /// Element type of O.
    pub(crate) out_dtype: DType,
    /// The pooled map of P computed, if any.
    pub(crate) pool: Option<Pool>,
    /// One line on the tiling (for people).
    pub(crate) tiling: String,
    /// The fused kernel's configuration and why, where the plan runs it.
    pub(crate) fused: Option<ConfigChoice>,
}

/// How the planner computes one attention ([`append`]).
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
pub(super) const MIN_SPLIT_KEYS: usize = 128;

/// The three-pass scratch is capped here even where bindings may be larger.
pub(super) const SCRATCH_BUDGET: u64 = 256 << 20;

/// Largest head dim the fused kernel keeps in registers.
pub const FUSED_MAX_HEAD_DIM: usize = 256;

/// Tile of the three-pass GEMM kernels (rows and columns per workgroup).
pub(super) const GEMM_TILE: usize = 64;

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
        } = append(req, caps, &mut program, &io)?;
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

    /// The path chosen.
    pub fn path(&self) -> Path {
        self.path
    }

    /// The problem.
    pub fn shape(&self) -> AttnShape {
        self.shape
    }

    /// Masks, lengths and logit controls baked into the params.
    pub fn masks(&self) -> &MaskSpec {
        &self.masks
    }

    /// Element type of Q, K and V.
    pub fn in_dtype(&self) -> DType {
        self.in_dtype
    }

    /// Element type of O.
    pub fn out_dtype(&self) -> DType {
        self.out_dtype
    }

    /// The pooled map of P computed, if any.
    pub fn pool(&self) -> Option<Pool> {
        self.pool
    }

    /// One line on the tiling (for people).
    pub fn tiling(&self) -> &str {
        &self.tiling
    }

    /// The fused kernel's configuration and why, where the plan runs it.
    pub fn fused(&self) -> Option<&ConfigChoice> {
        self.fused.as_ref()
    }

    /// The steps and buffers (the IR the executors run; for tests and tools).
    #[doc(hidden)]
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The call's buffers in the program (for tests and tools).
    #[doc(hidden)]
    pub fn io(&self) -> &AttnIo {
        &self.io
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
pub fn append(
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
                (
                    req.masks.masks_logits(),
                    row_stats,
                    req.masks.dropout.is_some(),
                ),
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
pub(super) fn chunks(
    s: &AttnShape,
    bh_max: usize,
    rows_max: usize,
) -> Vec<(usize, usize, usize, usize)> {
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

pub(super) fn three_pass(
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
        masked: req.masks.masks_logits(),
        storage,
    };
    // softmax_rows drops weights out after taking the LSE; weighted_sum then sees P ∘ Z/(1 − p),
    // whose zeros (removed or dropped keys) must add nothing.
    let softmax_rows = SoftmaxRows {
        dropout: req.masks.dropout.is_some(),
    };
    let weighted_sum = WeightedSum {
        masked: !req.masks.is_empty(),
        storage,
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
            softmax_rows,
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

/// The fused kernel with `config`: keys per tile the largest power of two ≤ 64 whose K and V
/// tiles fit in 16 KiB of workgroup memory (the WebGPU default limit), or the device's limit
/// if lower ([`tile_rows`]); subgroup lanes where `config` asks for them and the device has
/// them (else [`Error::Argument`]). `masked`: keys removed or logits shaped; `dropout`: the
/// weights dropped out ([`crate::dropout`]), which the matrix-unit kernel does not do.
pub(super) fn fused_kernel(
    s: &AttnShape,
    caps: &DeviceCaps,
    (masked, stats, dropout): (bool, bool, bool),
    storage: Storage,
    config: FusedConfig,
) -> Result<Kernel> {
    if config.matrix_units {
        if dropout {
            return Err(Error::Unsupported(
                "the matrix-unit kernel does not apply dropout; leave dropout out or use \
                 the default configuration"
                    .into(),
            ));
        }
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
        dropout,
    }))
}

/// The fused kernel on matrix units (`flash_coop`), where the device has them for these
/// inputs: f16 matrix inputs only where Q, K and V are f16 already (rounding f32 or bf16
/// inputs to f16 would change the answer), f32 inputs for any storage (widening is exact);
/// one subgroup per workgroup; keys per tile the largest of 64, 32, 16 and 8 (a multiple of
/// the tile side) whose workgroup memory fits the device. Else [`Error::Argument`] or a limit
/// error saying what is missing.
pub(super) fn matrix_unit_kernel(
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
pub(super) fn fused_tiles(kernel: &Kernel) -> (u32, u32) {
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
/// `MIN_SPLIT_KEYS` (128) keys; at least two when split-K is `forced`; always enough that none is
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
pub(super) fn fused(
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

/// The merge of `splits` stacked partials: split-K statistics (`split_stats`, two rows per
/// split) or one LSE row per shard.
/// With `row_stats` (`[parts, out]`), split-K's row entropy and focus are merged too.
pub(super) fn merge_step(
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
