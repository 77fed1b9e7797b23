//! The kernel registry: every WGSL file, its bindings, its specialization and its label.
//!
//! One kernel = `shaders/<name>.wgsl` + an entry here (bindings, specialization, workgroup
//! memory, loop cost, the call of its twin) + a CPU twin `src/cpu/<name>.rs`.
//! Bindings follow the house convention: binding 0 is the params uniform, then read-only
//! inputs in argument order, then read-write outputs. `tests/shaders.rs` checks these lists
//! against what naga reads from each shader, validates every specialization, and fails if a
//! file in `shaders/` is not registered here.

use crate::dtype::{DType, Storage};
use crate::error::{Error, Result};

/// How one binding of a kernel is accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `var<uniform>` params.
    Uniform,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// A kernel together with its compile-time specialization: the pipeline cache key.
/// Sequence lengths and batch sizes are never part of it; they travel in `AttnParams`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `S = scale·Q·Kᵀ`, tiled, masked.
    QkScores {
        /// Whether the call has any masking; without, the per-element mask code is compiled
        /// out (it cost 15% of three-pass time on llvmpipe).
        masked: bool,
        /// How Q and K are read.
        storage: Storage,
    },
    /// Stable row softmax of S in place, with LSE.
    SoftmaxRows,
    /// `O = P·V`, tiled.
    WeightedSum {
        /// How V is read.
        storage: Storage,
    },
    /// Fused online-softmax attention (also each split of split-K).
    Flash {
        /// Head dim of Q/K, rounded up to a multiple of 4.
        dk: u32,
        /// Head dim of V, rounded up to a multiple of 4.
        dv: u32,
        /// Keys per K/V tile in workgroup memory.
        bc: u32,
        /// Query rows per workgroup.
        br: u32,
        /// Query rows per invocation (1, 2 or 4; divides `br`): each K/V element read from
        /// the tile serves all of them. The workgroup has `br / r` invocations.
        r: u32,
        /// Whether the call has any masking (lengths, window, mask, bias, softcap,
        /// segments). Without, every tile is whole and the per-key loop is compiled out:
        /// its mere presence slowed unmasked runs by up to 16% on llvmpipe.
        masked: bool,
        /// How Q, K and V are read.
        storage: Storage,
        /// Whether each row's entropy and focus are written too (`row_stats`).
        stats: bool,
        /// Whether Q, K, V and O are bound in units of four elements (vec4 loads and stores;
        /// both head dims divisible by 4), or element by element.
        wide: bool,
        /// Invocations per row group (1, or the device's fixed subgroup size): the lanes of
        /// one subgroup share R rows and take their keys in turn, merged by subgroup
        /// reductions at the end. The workgroup has `br / r · lanes` invocations.
        lanes: u32,
        /// Lanes that load each K/V row of the tile together, one vec4 each, and pass the
        /// vec4s on by `subgroupBroadcast` (the device's fixed subgroup size), or 1: each
        /// invocation loads every vec4 it reads (see `FusedConfig::broadcast_loads`).
        broadcast: u32,
    },
    /// Fused online-softmax attention on matrix units (cooperative matrices), the contract of
    /// `Flash` without row statistics: one subgroup per workgroup owns `tile` query rows.
    FlashCoop {
        /// Head dim of Q/K, rounded up to a multiple of `tile`.
        dk: u32,
        /// Head dim of V, rounded up to a multiple of `tile`.
        dv: u32,
        /// Keys per K/V tile in workgroup memory (a multiple of `tile`).
        bc: u32,
        /// Side of the device's square matrix tiles (8 or 16), also the query rows per
        /// workgroup.
        tile: u32,
        /// Whether the matrix inputs (Q, K, V staged, and P) are f16 (only where Q, K and V
        /// are f16 already, so that only P is rounded), else f32.
        half_inputs: bool,
        /// Whether the call has any masking (as `Flash`).
        masked: bool,
        /// How Q, K and V are read.
        storage: Storage,
        /// Invocations per workgroup: the device's fixed subgroup size.
        lanes: u32,
    },
    /// Merge of partial (O, LSE) over disjoint key ranges.
    MergePartials {
        /// Whether split-K's row entropy and focus are merged too.
        stats: bool,
    },
    /// `Y = X·Wᵀ + b`, tiled (the projections of a layer).
    Linear {
        /// How X is read.
        x: Storage,
        /// How W and b are read.
        w: Storage,
    },
    /// Attention weights averaged over heads.
    MeanHeads,
    /// f32 values packed into f16 or bf16 pairs (half-precision outputs).
    Pack {
        /// `DType::F16` or `DType::Bf16`.
        to: DType,
    },
    /// Each key's coverage Σ_i P_ij, P rebuilt from Q, K and the LSE; Q tiles in workgroup
    /// memory, one key per invocation.
    KeyCoverage {
        /// Head dim of Q/K, rounded up to a multiple of 4.
        dk: u32,
        /// Query rows per tile in workgroup memory.
        bq: u32,
        /// Whether the call has any masking (as `QkScores`).
        masked: bool,
        /// How Q and K are read.
        storage: Storage,
    },
    /// Reductions of P = exp(s − LSE), rebuilt from Q, K and the LSE, over blocks of
    /// (query rows × keys): the statistics and pooled heatmaps.
    WeightBlocks {
        /// What each block reduces to.
        op: BlockOp,
        /// Whether the call has any masking (as `QkScores`).
        masked: bool,
        /// How Q and K are read.
        storage: Storage,
    },
}

/// What `weight_blocks` reduces a block of attention weights P to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockOp {
    /// `Σ P`: key coverage, mean pooling.
    Sum,
    /// `max P`: row focus, max pooling.
    Max,
    /// `Σ −P ln P`: row entropy.
    Entropy,
    /// The mean of P over the block's real elements: mean pooling.
    Mean,
}

impl BlockOp {
    /// Lower-case name, as in labels.
    pub fn name(self) -> &'static str {
        match self {
            BlockOp::Sum => "sum",
            BlockOp::Max => "max",
            BlockOp::Entropy => "entropy",
            BlockOp::Mean => "mean",
        }
    }
}

/// The shader file of each kernel name, embedded at build time.
pub const SHADER_FILES: &[(&str, &str)] = &[
    ("qk_scores", include_str!("../shaders/qk_scores.wgsl")),
    ("softmax_rows", include_str!("../shaders/softmax_rows.wgsl")),
    ("weighted_sum", include_str!("../shaders/weighted_sum.wgsl")),
    ("flash", include_str!("../shaders/flash.wgsl")),
    ("flash_coop", include_str!("../shaders/flash_coop.wgsl")),
    (
        "merge_partials",
        include_str!("../shaders/merge_partials.wgsl"),
    ),
    ("linear", include_str!("../shaders/linear.wgsl")),
    ("mean_heads", include_str!("../shaders/mean_heads.wgsl")),
    ("pack", include_str!("../shaders/pack.wgsl")),
    (
        "weight_blocks",
        include_str!("../shaders/weight_blocks.wgsl"),
    ),
    ("key_coverage", include_str!("../shaders/key_coverage.wgsl")),
];

/// Shared WGSL pulled in by `//!include <path>` lines.
const COMMON_FILES: &[(&str, &str)] = &[
    (
        "common/params.wgsl",
        include_str!("../shaders/common/params.wgsl"),
    ),
    (
        "common/mask.wgsl",
        include_str!("../shaders/common/mask.wgsl"),
    ),
    (
        "common/tile_gemm.wgsl",
        include_str!("../shaders/common/tile_gemm.wgsl"),
    ),
];

use Access::{Read, ReadWrite, Uniform};

/// Invocations of a `softmax_rows` workgroup (`WG` in the shader).
const SOFTMAX_WG: u64 = 128;
/// Depth of one operand slice of the tiled GEMM kernels (`BK` in common/tile_gemm.wgsl).
const GEMM_BK: u64 = 16;

/// Loop iterations one invocation of a kernel may run in one dispatch, as
/// `fixed + per_step · ⌈len / step⌉` over the kernel's one long loop (keys, a reduction dim or
/// splits; [`Kernel::loop_cost`] says which). Every loop the shader executes is counted as its
/// iterations + 1 (the exit test counts on Mesa's llvmpipe, which ends a shader's loops once
/// 65,535 iterations have run in one invocation, all loops together: see
/// `plan::DeviceCaps::loop_cap`); loops over compile-time constants the shaders write out.
/// An upper bound: the planner keeps every dispatch at or under the device's cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopCost {
    /// Iterations whatever the length.
    pub fixed: u64,
    /// Iterations per step of the long loop.
    pub per_step: u64,
    /// Elements one step covers.
    pub step: u64,
}

impl LoopCost {
    /// Iterations for a long loop over `len` elements.
    pub fn trips(&self, len: u64) -> u64 {
        self.fixed + self.per_step * len.div_ceil(self.step)
    }

    /// The longest loop (a multiple of `step`) whose iterations stay within `cap`; 0 if none,
    /// unbounded for a kernel without a long loop.
    pub fn max_len(&self, cap: u64) -> u64 {
        match self.per_step {
            0 if self.fixed <= cap => u64::MAX,
            0 => 0,
            per_step => cap.saturating_sub(self.fixed) / per_step * self.step,
        }
    }
}

/// The iterations of a loop of `n` iterations, exit test included.
const fn looped(n: u64) -> u64 {
    n + 1
}

impl Kernel {
    /// The file name (without `.wgsl`) of this kernel, also the first part of its label.
    pub fn name(&self) -> &'static str {
        match self {
            Kernel::QkScores { .. } => "qk_scores",
            Kernel::SoftmaxRows => "softmax_rows",
            Kernel::WeightedSum { .. } => "weighted_sum",
            Kernel::Flash { .. } => "flash",
            Kernel::FlashCoop { .. } => "flash_coop",
            Kernel::MergePartials { .. } => "merge_partials",
            Kernel::Linear { .. } => "linear",
            Kernel::MeanHeads => "mean_heads",
            Kernel::Pack { .. } => "pack",
            Kernel::WeightBlocks { .. } => "weight_blocks",
            Kernel::KeyCoverage { .. } => "key_coverage",
        }
    }

    /// Bindings of `@group(0)` in order.
    pub fn bindings(&self) -> &'static [Access] {
        match self {
            Kernel::QkScores { .. } => &[Uniform, Read, Read, Read, Read, Read, ReadWrite],
            Kernel::WeightedSum { .. } => &[Uniform, Read, Read, ReadWrite],
            Kernel::SoftmaxRows => &[Uniform, ReadWrite, ReadWrite],
            Kernel::Flash { stats: false, .. } | Kernel::FlashCoop { .. } => &[
                Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite,
            ],
            Kernel::Flash { stats: true, .. } => &[
                Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite,
            ],
            Kernel::MergePartials { stats: false } => &[Uniform, Read, Read, ReadWrite, ReadWrite],
            // The row statistics' bindings come after the others (declared by the prelude).
            Kernel::MergePartials { stats: true } => {
                &[Uniform, Read, Read, ReadWrite, ReadWrite, Read, ReadWrite]
            }
            Kernel::Linear { .. } => &[Uniform, Read, Read, Read, ReadWrite],
            Kernel::MeanHeads | Kernel::Pack { .. } => &[Uniform, Read, ReadWrite],
            Kernel::WeightBlocks { .. } | Kernel::KeyCoverage { .. } => {
                &[Uniform, Read, Read, Read, Read, Read, Read, ReadWrite]
            }
        }
    }

    /// Pipeline label: name plus specialization, e.g. `xattn.flash_dk64_dv64_bc32_br64_r2`.
    pub fn label(&self) -> String {
        match self {
            Kernel::Flash {
                dk,
                dv,
                bc,
                br,
                r,
                masked,
                storage,
                stats,
                wide,
                lanes,
                broadcast,
            } => {
                let stats = if *stats { "_stats" } else { "" };
                let wide = if *wide { "" } else { "_scalar" };
                let mut lanes = if *lanes > 1 {
                    format!("_lanes{lanes}")
                } else {
                    String::new()
                };
                if *broadcast > 1 {
                    lanes.push_str(&format!("_bcast{broadcast}"));
                }
                let variant = variant_suffix(*storage, *masked);
                format!("xattn.flash_dk{dk}_dv{dv}_bc{bc}_br{br}_r{r}{lanes}{wide}{variant}{stats}")
            }
            Kernel::FlashCoop {
                dk,
                dv,
                bc,
                tile,
                half_inputs,
                masked,
                storage,
                lanes,
            } => {
                let inputs = if *half_inputs { "f16" } else { "f32" };
                let variant = variant_suffix(*storage, *masked);
                format!(
                    "xattn.flash_coop_dk{dk}_dv{dv}_bc{bc}_t{tile}_{inputs}_lanes{lanes}{variant}"
                )
            }
            Kernel::MergePartials { stats: true } => "xattn.merge_partials_stats".into(),
            Kernel::KeyCoverage {
                dk,
                bq,
                masked,
                storage,
            } => {
                let variant = variant_suffix(*storage, *masked);
                format!("xattn.key_coverage_dk{dk}_bq{bq}{variant}")
            }
            Kernel::QkScores { masked, storage } => {
                format!("xattn.qk_scores{}", variant_suffix(*storage, *masked))
            }
            Kernel::WeightedSum { storage } => {
                format!("xattn.weighted_sum{}", storage_suffix(*storage))
            }
            Kernel::Linear { x, w } => format!(
                "xattn.linear{}{}",
                storage_suffix(*x).replacen('_', "_x_", 1),
                storage_suffix(*w).replacen('_', "_w_", 1)
            ),
            Kernel::Pack { to } => format!("xattn.pack_{to}"),
            Kernel::WeightBlocks {
                op,
                masked,
                storage,
            } => {
                let variant = variant_suffix(*storage, *masked);
                format!("xattn.weight_blocks_{}{variant}", op.name())
            }
            other => format!("xattn.{}", other.name()),
        }
    }

    /// Workgroup-memory bytes the kernel declares (checked against the device limit).
    pub fn workgroup_bytes(&self) -> u64 {
        match *self {
            Kernel::QkScores { .. } | Kernel::WeightedSum { .. } | Kernel::Linear { .. } => {
                2 * 1024 * 4
            }
            Kernel::SoftmaxRows => SOFTMAX_WG * 4,
            Kernel::Flash { dk, dv, bc, .. } => u64::from(bc * (dk + dv)) * 4,
            Kernel::FlashCoop {
                dk,
                dv,
                bc,
                tile,
                half_inputs,
                ..
            } => {
                // Q, K, V and P as matrix inputs; S, O and the row factors in f32.
                let input = if half_inputs { 2 } else { 4 };
                let br = tile;
                u64::from(br * dk + bc * dk + bc * dv + br * bc) * input
                    + u64::from(br * bc + br * dv + br) * 4
            }
            Kernel::KeyCoverage { dk, bq, .. } => u64::from(bq * (dk + 1)) * 4,
            Kernel::MergePartials { .. }
            | Kernel::MeanHeads
            | Kernel::Pack { .. }
            | Kernel::WeightBlocks { .. } => 0,
        }
    }

    /// What the kernel's long loop runs over (for messages).
    pub fn long_loop(&self) -> &'static str {
        match self {
            Kernel::QkScores { .. } => "head dims d_k",
            Kernel::SoftmaxRows => "keys per row",
            Kernel::WeightedSum { .. } => "keys",
            Kernel::Flash { .. } | Kernel::FlashCoop { .. } => "keys per split",
            Kernel::MergePartials { .. } => "splits",
            Kernel::Linear { .. } => "input features",
            Kernel::MeanHeads => "heads",
            Kernel::Pack { .. } => "(none)",
            Kernel::WeightBlocks { .. } => "(query row, key) pairs per block and pass",
            Kernel::KeyCoverage { .. } => "query rows per pass",
        }
    }

    /// What bounds this kernel's loops for a dispatch with params `p` (see [`LoopCost`]), and
    /// the long loop's length in that dispatch.
    pub fn loop_cost(&self, p: &crate::program::Params) -> (LoopCost, u64) {
        use crate::params::flags;
        use crate::program::Params;
        // The tiled GEMM step: its loop, the staging loop (1024 elements / 256 invocations)
        // and the BK loop of accumulate_tile. The 4×4 output loops and, where the logit is
        // shaped per element, the segment lookup (≤ n_segments + 1 each) run once.
        let gemm = |segments: u64| LoopCost {
            fixed: looped(0) + looped(4) + 4 * looped(4) + 16 * segments,
            per_step: 1 + looped(4) + looped(GEMM_BK),
            step: GEMM_BK,
        };
        let attn = match p {
            Params::Attn(a) => *a,
            Params::Linear(l) => {
                return (gemm(0), u64::from(l.in_dim));
            }
            // One word per invocation, no loop.
            Params::Pack(_) => {
                let none = LoopCost {
                    fixed: 0,
                    per_step: 0,
                    step: 1,
                };
                return (none, 0);
            }
        };
        let segments = if attn.flags & flags::SEGMENTS != 0 {
            looped(u64::from(attn.n_segments))
        } else {
            0
        };
        match *self {
            Kernel::QkScores { .. } => (gemm(segments), u64::from(attn.d_k)),
            Kernel::WeightedSum { .. } => (gemm(0), u64::from(attn.key_end - attn.key_begin)),
            Kernel::Linear { .. } | Kernel::Pack { .. } => {
                unreachable!("linear and pack dispatches carry their own params")
            }
            // Three strided key loops; two tree reductions of log2(WG) levels.
            Kernel::SoftmaxRows => (
                LoopCost {
                    fixed: 3 * looped(0) + 2 * looped(SOFTMAX_WG.ilog2().into()),
                    per_step: 3,
                    step: SOFTMAX_WG,
                },
                u64::from(attn.n),
            ),
            // Two loops over the splits, three with the row statistics.
            Kernel::MergePartials { stats } => {
                let loops = if stats { 3 } else { 2 };
                (
                    LoopCost {
                        fixed: loops * looped(0),
                        per_step: loops,
                        step: 1,
                    },
                    u64::from(attn.n_splits),
                )
            }
            Kernel::MeanHeads => (
                LoopCost {
                    fixed: looped(0),
                    per_step: 1,
                    step: 1,
                },
                u64::from(attn.q_heads),
            ),
            // Per (row, key) pair of the pass: its share of the row loop (one iteration per
            // row, at most one per pair) and of the key loop (with each row's exit test: at
            // most one per pair), the head-dim loop and the segment lookup.
            // The K row load (per vec4); per tile of bq rows: the tile loop, the staging loop
            // and the row loop, and per row the vec4 dot-product loop and the segment lookup.
            Kernel::KeyCoverage { dk, bq, .. } => {
                let (dk4, bq) = (u64::from(dk / 4), u64::from(bq));
                let staged = (bq * dk4).div_ceil(64);
                (
                    LoopCost {
                        fixed: looped(dk4) + looped(0),
                        per_step: 1 + looped(staged) + looped(bq) + bq * (looped(dk4) + segments),
                        step: bq,
                    },
                    u64::from(attn.rows),
                )
            }
            Kernel::WeightBlocks { .. } => (
                LoopCost {
                    fixed: looped(0),
                    per_step: 1 + 2 + looped(u64::from(attn.d_k)) + segments,
                    step: 1,
                },
                u64::from(attn.rows) * u64::from(attn.key_end - attn.key_begin),
            ),
            // Per tile of bc keys: the tile loop, K and V staging (by br / r · lanes
            // invocations), the mask-word scan of each of the r rows, the score loop over the
            // lane's pairs of keys (per key with the segment lookup per key and row, or per
            // pair) and the accumulate loop (per pair). Fixed: the row set-up loop and the row
            // loop writing the LSE (Q and O rows are loaded and stored straight-line).
            Kernel::Flash {
                dk,
                dv,
                bc,
                br,
                r,
                lanes,
                ..
            } => {
                let [dk, dv, bc, br, r, lanes] = [dk, dv, bc, br, r, lanes].map(u64::from);
                let invocations = br / r * lanes;
                let pairs = bc.div_ceil(2 * lanes);
                let mask_words = if attn.flags & flags::MASK != 0 {
                    r * looped(bc.div_ceil(32) + 1)
                } else {
                    0
                };
                (
                    LoopCost {
                        fixed: looped(0) + looped(r) + looped(r),
                        per_step: 1
                            + looped((bc * dk / 4).div_ceil(invocations))
                            + looped((bc * dv / 4).div_ceil(invocations))
                            + mask_words
                            + looped(2 * pairs)
                            + 2 * pairs * r * segments
                            + looped(pairs),
                        step: bc,
                    },
                    u64::from(attn.split_len.min(attn.n)),
                )
            }
            // Fixed: Q staging, O zeroing and O writing (by `lanes` invocations), the tile
            // loop's exit. Per tile of bc keys: the tile loop, K and V staging, the score
            // blocks (bc / tile of them, each over dk / tile), the owner's two loops over the
            // tile's keys (with the segment lookup per key), O's rescaling and the P·V blocks
            // (dv / tile of them, each over bc / tile).
            Kernel::FlashCoop {
                dk,
                dv,
                bc,
                tile,
                lanes,
                ..
            } => {
                let [dk, dv, bc, tile, lanes] = [dk, dv, bc, tile, lanes].map(u64::from);
                let spread = |elems: u64| looped(elems.div_ceil(lanes));
                (
                    LoopCost {
                        fixed: spread(tile * dk) + 2 * spread(tile * dv) + looped(0),
                        per_step: 1
                            + spread(bc * dk)
                            + spread(bc * dv)
                            + looped(bc / tile)
                            + bc / tile * looped(dk / tile)
                            + 2 * looped(bc)
                            + bc * segments
                            + spread(tile * dv)
                            + looped(dv / tile)
                            + dv / tile * looped(bc / tile),
                        step: bc,
                    },
                    u64::from(attn.split_len.min(attn.n)),
                )
            }
        }
    }

    /// Runs the kernel's CPU twin (`src/cpu/<name>.rs`) on host buffers given in binding
    /// order (bindings 1..) as 32-bit words; what the kernel writes is written in place.
    /// Panics if the buffers do not match the bindings (a program bug).
    pub fn run_twin(&self, params: &crate::program::Params, buffers: &mut [Vec<u32>]) {
        use crate::cpu;
        use crate::program::Params;
        use bytemuck::{cast_slice as f, cast_slice_mut as fm};
        fn masks<'a>(
            lens: &'a [u32],
            mask_bits: &'a [u32],
            bias: &'a [u32],
        ) -> cpu::mask::MaskData<'a> {
            cpu::mask::MaskData {
                lens,
                mask_bits,
                bias: f(bias),
            }
        }
        let arity = |n: usize| -> ! { panic!("{} got {n} buffers", self.label()) };
        // Every element the words of this storage hold, widened.
        let widen = |storage: Storage, words: &[u32]| -> Vec<f32> {
            let dtype = storage.dtype();
            let elems = words.len() * 4 / dtype.size() as usize;
            dtype.decode(bytemuck::cast_slice(words), elems)
        };
        match *self {
            Kernel::QkScores { storage, .. } => {
                let [q, k, lens, mask, bias, scores] = buffers else {
                    arity(buffers.len())
                };
                let m = masks(lens, mask, bias);
                let (q, k) = (widen(storage, q), widen(storage, k));
                cpu::qk_scores::qk_scores(params.attn(), &q, &k, &m, fm(scores));
            }
            Kernel::SoftmaxRows => {
                let [scores, lse] = buffers else {
                    arity(buffers.len())
                };
                cpu::softmax_rows::softmax_rows(params.attn(), fm(scores), fm(lse));
            }
            Kernel::WeightedSum { storage } => {
                let [scores, v, o] = buffers else {
                    arity(buffers.len())
                };
                let v = widen(storage, v);
                cpu::weighted_sum::weighted_sum(params.attn(), f(scores), &v, fm(o));
            }
            Kernel::Flash {
                bc,
                br,
                r,
                lanes,
                storage,
                ..
            } => {
                let (inputs, outputs) = buffers.split_at_mut(6);
                let [q, k, v, lens, mask, bias] = inputs else {
                    arity(buffers.len())
                };
                let (o, lse, row_stats) = match outputs {
                    [o, lse] => (o, lse, None),
                    [o, lse, row_stats] => (o, lse, Some(fm(row_stats))),
                    _ => arity(6 + outputs.len()),
                };
                let m = masks(lens, mask, bias);
                let p = params.attn();
                let (q, k, v) = (widen(storage, q), widen(storage, k), widen(storage, v));
                let out = (fm(o), fm(lse), row_stats);
                cpu::flash::flash(p, (bc, br, r, lanes), (&q, &k, &v), &m, out);
            }
            Kernel::FlashCoop {
                bc,
                tile,
                half_inputs,
                storage,
                ..
            } => {
                let [q, k, v, lens, mask, bias, o, lse] = buffers else {
                    arity(buffers.len())
                };
                let m = masks(lens, mask, bias);
                let (q, k, v) = (widen(storage, q), widen(storage, k), widen(storage, v));
                let shape = (bc, tile, half_inputs);
                cpu::flash_coop::flash_coop(
                    params.attn(),
                    shape,
                    (&q, &k, &v),
                    &m,
                    (fm(o), fm(lse)),
                );
            }
            Kernel::MergePartials { .. } => {
                let p = params.attn();
                match buffers {
                    [part_o, part_stats, o, lse] => cpu::merge_partials::merge_partials(
                        p,
                        (f(part_o), f(part_stats), None),
                        (fm(o), fm(lse), None),
                    ),
                    [part_o, part_stats, o, lse, row_parts, row_out] => {
                        cpu::merge_partials::merge_partials(
                            p,
                            (f(part_o), f(part_stats), Some(f(row_parts))),
                            (fm(o), fm(lse), Some(fm(row_out))),
                        )
                    }
                    _ => arity(buffers.len()),
                }
            }
            Kernel::Linear { x: xs, w: ws } => {
                let [x, w, b, y] = buffers else {
                    arity(buffers.len())
                };
                let (x, w, b) = (widen(xs, x), widen(ws, w), widen(ws, b));
                cpu::linear::linear(params.linear(), &x, &w, &b, fm(y));
            }
            Kernel::MeanHeads => {
                let [w, mean] = buffers else {
                    arity(buffers.len())
                };
                cpu::mean_heads::mean_heads(params.attn(), f(w), fm(mean));
            }
            Kernel::Pack { to } => {
                let [src, dst] = buffers else {
                    arity(buffers.len())
                };
                let Params::Pack(p) = params else {
                    panic!("pack dispatches carry PackParams")
                };
                cpu::pack::pack(p, to, f(src), dst);
            }
            Kernel::KeyCoverage { storage, .. } => {
                let [q, k, lens, mask, bias, lse, out] = buffers else {
                    arity(buffers.len())
                };
                let m = masks(lens, mask, bias);
                let (q, k) = (widen(storage, q), widen(storage, k));
                let p = params.attn();
                cpu::key_coverage::key_coverage(p, (&q, &k), &m, f(lse), fm(out));
            }
            Kernel::WeightBlocks { op, storage, .. } => {
                let [q, k, lens, mask, bias, lse, out] = buffers else {
                    arity(buffers.len())
                };
                let m = masks(lens, mask, bias);
                let (q, k) = (widen(storage, q), widen(storage, k));
                let p = params.attn();
                cpu::weight_blocks::weight_blocks(p, op, (&q, &k), &m, f(lse), fm(out));
            }
        }
    }

    /// The full WGSL source: specialization prelude, the file, and its includes resolved.
    pub fn source(&self) -> String {
        let file = SHADER_FILES
            .iter()
            .find(|(name, _)| *name == self.name())
            .map(|(_, src)| *src)
            .expect("every Kernel variant has an entry in SHADER_FILES");
        let mut out = String::new();
        if self.needs_f16() {
            out.push_str("enable f16;\n");
        }
        if let Kernel::FlashCoop {
            dk,
            dv,
            bc,
            tile,
            half_inputs,
            masked,
            lanes,
            ..
        } = *self
        {
            out.push_str("enable wgpu_cooperative_matrix;\n");
            out.push_str(&flash_coop_prelude(dk, dv, bc, tile, half_inputs, lanes));
            out.push_str(&format!("const ANY_MASKING: bool = {masked};\n"));
        }
        match *self {
            Kernel::Flash { storage, wide, .. } => {
                out.push_str(&storage.wgsl("Elem", self.half_arrays(), wide));
                out.push_str(&store4_o(wide));
            }
            Kernel::QkScores { storage, .. }
            | Kernel::WeightedSum { storage }
            | Kernel::FlashCoop { storage, .. }
            | Kernel::WeightBlocks { storage, .. }
            | Kernel::KeyCoverage { storage, .. } => {
                out.push_str(&storage.wgsl("Elem", self.half_arrays(), false));
            }
            Kernel::Linear { x, w } => {
                out.push_str(&x.wgsl("XElem", &["x"], false));
                out.push_str(&w.wgsl("WElem", &["w", "b"], false));
            }
            Kernel::Pack { to } => {
                out.push_str(&format!("const TO_BF16: bool = {};\n", to == DType::Bf16));
            }
            _ => {}
        }
        if let Kernel::Flash {
            dk,
            dv,
            bc,
            br,
            r,
            masked,
            stats,
            lanes,
            broadcast,
            ..
        } = *self
        {
            out.push_str(&flash_prelude(
                dk / 4,
                dv / 4,
                bc,
                (br, r, lanes),
                broadcast,
            ));
            out.push_str(&format!("const ANY_MASKING: bool = {masked};\n"));
            out.push_str(&format!("const ROW_STATS: bool = {stats};\n"));
            out.push_str(if stats {
                "@group(0) @binding(9) var<storage, read_write> row_stats: array<f32>;\n\
                 fn write_row_stats(i: u32, j: u32, entropy: f32, focus: f32) {\n    \
                 row_stats[i] = entropy;\n    row_stats[j] = focus;\n}\n"
            } else {
                "fn write_row_stats(i: u32, j: u32, entropy: f32, focus: f32) {}\n"
            });
        }
        if let Kernel::MergePartials { stats } = *self {
            out.push_str(&format!("const ROW_STATS: bool = {stats};\n"));
            out.push_str(if stats {
                "@group(0) @binding(5) var<storage, read> row_parts: array<f32>;\n\
                 @group(0) @binding(6) var<storage, read_write> row_out: array<f32>;\n\
                 fn row_part(i: u32) -> f32 {\n    return row_parts[i];\n}\n\
                 fn write_row_out(i: u32, j: u32, entropy: f32, focus: f32) {\n    \
                 row_out[i] = entropy;\n    row_out[j] = focus;\n}\n"
            } else {
                "fn row_part(i: u32) -> f32 {\n    return 0.0;\n}\n\
                 fn write_row_out(i: u32, j: u32, entropy: f32, focus: f32) {}\n"
            });
        }
        if let Kernel::QkScores { masked, .. } = *self {
            out.push_str(&format!("const ANY_MASKING: bool = {masked};\n"));
        }
        if let Kernel::KeyCoverage { dk, bq, masked, .. } = *self {
            out.push_str(&format!(
                "const DK4: u32 = {}u;\nconst BQ: u32 = {bq}u;\nconst ANY_MASKING: bool = {masked};\n",
                dk / 4
            ));
        }
        if let Kernel::WeightBlocks { op, masked, .. } = *self {
            let op = match op {
                BlockOp::Sum => 0,
                BlockOp::Max => 1,
                BlockOp::Entropy => 2,
                BlockOp::Mean => 3,
            };
            out.push_str(&format!(
                "const OP: u32 = {op}u;\nconst ANY_MASKING: bool = {masked};\n"
            ));
        }
        out.push_str(&resolve_includes(file));
        out
    }

    /// How the kernel reads its element arrays (empty for kernels that read only f32).
    pub fn storages(&self) -> Vec<Storage> {
        match *self {
            Kernel::QkScores { storage, .. }
            | Kernel::WeightedSum { storage }
            | Kernel::Flash { storage, .. }
            | Kernel::FlashCoop { storage, .. }
            | Kernel::WeightBlocks { storage, .. }
            | Kernel::KeyCoverage { storage, .. } => vec![storage],
            Kernel::Linear { x, w } => vec![x, w],
            _ => Vec::new(),
        }
    }

    /// Whether the shader declares f16 values (`enable f16`): f16 arrays, or f16 matrix
    /// inputs.
    fn needs_f16(&self) -> bool {
        matches!(
            self,
            Kernel::FlashCoop {
                half_inputs: true,
                ..
            }
        ) || self.storages().iter().any(|s| s.needs_f16())
    }

    /// The arrays a kernel with one storage reads through `load_<array>`.
    fn half_arrays(&self) -> &'static [&'static str] {
        match self {
            Kernel::QkScores { .. } => &["q", "k"],
            Kernel::WeightedSum { .. } => &["v"],
            Kernel::Flash { .. } | Kernel::FlashCoop { .. } => &["q", "k", "v"],
            Kernel::WeightBlocks { .. } | Kernel::KeyCoverage { .. } => &["q", "k"],
            _ => &[],
        }
    }

    /// Parses and validates the source with naga; returns the module for introspection.
    pub fn validate(&self) -> Result<naga::Module> {
        let label = self.label();
        let source = self.source();
        let module = naga::front::wgsl::parse_str(&source).map_err(|e| Error::Shader {
            kernel: label.clone(),
            message: e.emit_to_string(&source),
        })?;
        // (Un)packing f16 in u32 words needs SHADER_FLOAT16_IN_FLOAT32, which wgpu grants on
        // every native backend (downlevel flag SHADER_F16_IN_F32).
        let mut capabilities = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
        if self.needs_f16() {
            capabilities |= naga::valid::Capabilities::SHADER_FLOAT16;
        }
        let subgroups =
            matches!(self, Kernel::Flash { lanes, broadcast, .. } if *lanes > 1 || *broadcast > 1);
        if subgroups {
            capabilities |= naga::valid::Capabilities::SUBGROUP;
        }
        if matches!(self, Kernel::FlashCoop { .. }) {
            capabilities |= naga::valid::Capabilities::COOPERATIVE_MATRIX;
        }
        let mut validator =
            naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities);
        if subgroups {
            validator
                .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
                .subgroup_operations(naga::valid::SubgroupOperationSet::all());
        }
        validator.validate(&module).map_err(|e| Error::Shader {
            kernel: label,
            message: e.emit_to_string(&source),
        })?;
        Ok(module)
    }
}

/// The storage suffix, then `_masked` for kernels specialized for masking.
fn variant_suffix(storage: Storage, masked: bool) -> String {
    let masked = if masked { "_masked" } else { "" };
    format!("{}{masked}", storage_suffix(storage))
}

/// `_<storage>` for half storage, nothing for f32 (labels of f32 kernels are unchanged).
fn storage_suffix(storage: Storage) -> String {
    match storage {
        Storage::F32 => String::new(),
        other => format!("_{}", other.name().replace('-', "_")),
    }
}

/// Flash's O binding (7) and `store4_o(base, d, x, len)`, which writes elements d..d + 4 of
/// x to the O row of `len` at `base`, those below `len`: one vec4 store where `wide`.
fn store4_o(wide: bool) -> String {
    let (elem, body) = if wide {
        ("vec4<f32>", "o[(base + d) >> 2u] = x;".to_string())
    } else {
        let stores: String = (0..4)
            .map(|u| {
                format!("\n    if d + {u}u < len {{\n        o[base + d + {u}u] = x[{u}];\n    }}")
            })
            .collect();
        ("f32", stores)
    };
    format!(
        "@group(0) @binding(7) var<storage, read_write> o: array<{elem}>;\n\
         fn store4_o(base: u32, d: u32, x: vec4<f32>, len: u32) {{\n    {body}\n}}\n"
    )
}

/// Constants and unrolled helpers of one flash specialization (see shaders/flash.wgsl): the
/// R rows' statistics travel as one `RV` (f32, vec2 or vec4: one lane per row), their Q rows
/// and accumulators as `qr`/`acc` slices of DK4/DV4 vec4s per row; every K/V vec4 read from the
/// tile is used by all R rows before the next is read.
fn flash_prelude(
    dk4: u32,
    dv4: u32,
    bc: u32,
    (br, r, lanes): (u32, u32, u32),
    broadcast: u32,
) -> String {
    assert!(
        matches!(r, 1 | 2 | 4)
            && br % r == 0
            && lanes.is_power_of_two()
            && broadcast.is_power_of_two()
            && (lanes == 1 || broadcast == 1),
        "flash rows per invocation, lanes and broadcast"
    );
    let rows = 0..r;
    // Lane `i` of an RV named `v`.
    let lane = |v: &str, i: u32| {
        if r == 1 {
            v.to_string()
        } else {
            format!("{v}[{i}]")
        }
    };
    let rv = |parts: Vec<String>| {
        if r == 1 {
            parts.join("")
        } else {
            format!("RV({})", parts.join(", "))
        }
    };
    // The R rows' scores against the K row whose vec4s are named `{k}0, {k}1, …`: each a sum
    // of vec4 dot products in the order 0, 1, … (score_block and score_pair agree exactly).
    let sums = |k: &str| -> String {
        rv(rows
            .clone()
            .map(|row| {
                (0..dk4)
                    .map(|i| format!("dot(qr[{}], {k}{i})", row * dk4 + i))
                    .collect::<Vec<_>>()
                    .join("\n        + ")
            })
            .collect())
    };
    let mut score = String::new();
    let mut score_pair = String::new();
    if broadcast > 1 {
        // Lane `sg_lane` loads vec4 j·B + sg_lane of the key (pair) from K itself, B =
        // broadcast, and vec4 i comes from lane i % B of load i / B.
        score = broadcast_loads("k", &[("k", 0)], dk4, broadcast);
        score_pair = broadcast_loads("k", &[("k", 0), ("x", dk4)], dk4, broadcast);
    } else {
        score.push_str("    let base = c * DK4;\n");
        for i in 0..dk4 {
            score.push_str(&format!("    let k{i} = k_tile[base + {i}u];\n"));
            score_pair.push_str(&format!(
                "    let k{i} = k_tile[a + {i}u];\n    let x{i} = k_tile[a + DK4 + {i}u];\n"
            ));
        }
    }
    let mut scales = String::new();
    let mut add_pair = if broadcast > 1 {
        broadcast_loads("v", &[("v", 0), ("w", dv4)], dv4, broadcast)
    } else {
        String::new()
    };
    for i in 0..dv4 {
        if broadcast == 1 {
            add_pair.push_str(&format!(
                "    let v{i} = v_tile[a + {i}u];\n    let w{i} = v_tile[a + DV4 + {i}u];\n"
            ));
        }
        for row in rows.clone() {
            let a = row * dv4 + i;
            scales.push_str(&format!("    acc[{a}] *= {};\n", lane("alpha", row)));
            // Key c first, then key c + 1.
            add_pair.push_str(&format!(
                "    acc[{a}] = fma(vec4<f32>({}), w{i}, fma(vec4<f32>({}), v{i}, acc[{a}]));\n",
                lane("pd", row),
                lane("pc", row)
            ));
        }
    }
    let any = |f: &dyn Fn(u32) -> String| rows.clone().map(f).collect::<Vec<_>>().join(" | ");
    // The live rows' Q rows (pre-scaled) and O rows, row `i` at `base + i·stride`.
    let (mut q_rows, mut o_rows) = (String::new(), String::new());
    for row in rows.clone() {
        let at = format!("base + {row}u * stride");
        q_rows.push_str(&format!("    if {row}u < live {{\n        let b = {at};\n"));
        o_rows.push_str(&format!("    if {row}u < live {{\n        let b = {at};\n"));
        for i in 0..dk4 {
            q_rows.push_str(&format!(
                "        qr[{}] = load4_q(b, {}u, p.d_k) * qs;\n",
                row * dk4 + i,
                4 * i
            ));
        }
        for i in 0..dv4 {
            o_rows.push_str(&format!(
                "        store4_o(b, {}u, acc[{}] * {}, p.d_v);\n",
                4 * i,
                row * dv4 + i,
                lane("inv", row)
            ));
        }
        q_rows.push_str("    }\n");
        o_rows.push_str("    }\n");
    }
    // The entry point, and the merge of a row group's lanes: each lane's sum, accumulator and
    // Σ p·(m − s) rebased from its own max to the group's (as flash.wgsl rebases per tile).
    let (entry, merge) = if lanes == 1 && broadcast > 1 {
        (
            "fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,\n    \
             @builtin(subgroup_invocation_id) sl: u32) {\n    \
             sg_lane = sl;\n    attend(wg, li, li, 0u);\n}\n",
            String::new(),
        )
    } else if lanes == 1 {
        (
            "fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {\n    \
             attend(wg, li, li, 0u);\n}\n",
            String::new(),
        )
    } else {
        let sums: String = (0..r * dv4)
            .map(|a| {
                format!(
                    "    acc[{a}] = subgroupAdd(acc[{a}] * {});\n",
                    lane("w", a / dv4)
                )
            })
            .collect();
        (
            "fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,\n    \
             @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) sl: u32) {\n    \
             attend(wg, li, sg, sl);\n}\n",
            format!(
                "    let mx = subgroupMax(*m);\n    let w = exp2(*m - mx);\n    \
                 if ROW_STATS {{\n        \
                 *t = subgroupAdd(w * (*t + select(RV(0.0), (mx - *m) * *l, *l > RV(0.0))));\n    }}\n    \
                 *l = subgroupAdd(w * *l);\n{sums}    *m = mx;\n"
            ),
        )
    };
    let rv_type = if r == 1 {
        "f32".to_string()
    } else {
        format!("vec{r}<f32>")
    };
    format!(
        "const DK4: u32 = {dk4}u;\nconst DV4: u32 = {dv4}u;\nconst BC: u32 = {bc}u;\n\
         const BR: u32 = {br}u;\nconst R: u32 = {r}u;\nconst LANES: u32 = {lanes}u;\n\
         const WG: u32 = {wg}u;\nconst BROADCAST: bool = {bcast};\nvar<private> sg_lane: u32;\n\
         alias RV = {rv_type};\n\
         fn lane(v: RV, i: u32) -> f32 {{\n    return {lane_i};\n}}\n\
         fn score_block(c: u32) -> RV {{\n{score}    return {score_k};\n}}\n\
         fn score_pair(c: u32) {{\n    let a = c * DK4;\n{score_pair}    \
         sc[c] = {score_k};\n    sc[c + 1u] = {score_x};\n}}\n\
         fn rescale(alpha: RV) {{\n{scales}}}\n\
         fn accumulate_pair(pc: RV, pd: RV, c: u32) {{\n    let a = c * DV4;\n{add_pair}}}\n\
         fn sees_block(t0: u32, t1: u32) -> bool {{\n    return {sees};\n}}\n\
         fn keeps_block(j: u32) -> bool {{\n    return {keeps};\n}}\n\
         fn logit_block(s: RV, j: u32) -> RV {{\n    return {logits};\n}}\n\
         fn load_q_rows(base: u32, stride: u32, live: u32, qs: f32) {{\n{q_rows}}}\n\
         fn store_o_rows(base: u32, stride: u32, live: u32, inv: RV) {{\n{o_rows}}}\n\
         fn merge_lanes(m: ptr<function, RV>, l: ptr<function, RV>, t: ptr<function, RV>) {{\n{merge}}}\n\
         fn subgroup_any(x: bool) -> bool {{\n    return {any_vote};\n}}\n\
         fn subgroup_all(x: bool) -> bool {{\n    return {all_vote};\n}}\n\
         @compute @workgroup_size(WG, 1, 1)\n{entry}",
        wg = br / r * lanes,
        bcast = broadcast > 1,
        any_vote = if broadcast > 1 { "subgroupAny(x)" } else { "x" },
        all_vote = if broadcast > 1 { "subgroupAll(x)" } else { "x" },
        lane_i = if r == 1 { "v" } else { "v[i]" },
        score_k = sums("k"),
        score_x = sums("x"),
        sees = any(&|i| format!("row_sees({i}u, t0, t1)")),
        keeps = any(&|i| format!("key_kept({i}u, j)")),
        logits = rv(rows
            .clone()
            .map(|i| format!("key_logit({i}u, {}, j)", lane("s", i)))
            .collect()),
    )
}

/// Constants of one flash_coop specialization (see shaders/flash_coop.wgsl): the matrix types
/// of `tile`×`tile` blocks with f16 or f32 inputs and f32 accumulators, the padded head dims,
/// the key tile, one workgroup of `lanes` invocations owning `tile` rows, and O (binding 7).
fn flash_coop_prelude(
    dk: u32,
    dv: u32,
    bc: u32,
    tile: u32,
    half_inputs: bool,
    lanes: u32,
) -> String {
    assert!(
        matches!(tile, 8 | 16) && [dk, dv, bc].iter().all(|x| x.is_multiple_of(tile)),
        "flash_coop tiles"
    );
    let ce = if half_inputs { "f16" } else { "f32" };
    format!(
        "alias CE = {ce};\n\
         alias MatA = coop_mat{tile}x{tile}<CE, A>;\n\
         alias MatB = coop_mat{tile}x{tile}<CE, B>;\n\
         alias MatC = coop_mat{tile}x{tile}<f32, C>;\n\
         const T: u32 = {tile}u;\nconst DKP: u32 = {dk}u;\nconst DVP: u32 = {dv}u;\n\
         const BC: u32 = {bc}u;\nconst BR: u32 = {tile}u;\nconst WG: u32 = {lanes}u;\n\
         @group(0) @binding(7) var<storage, read_write> o: array<f32>;\n"
    )
}

/// Straight-line loads of the rows of keys `c`, `c + 1`, … of the tile (`names.len()` keys,
/// `n` vec4s each) from `array` (`k` or `v`) by a subgroup of `b` lanes: lane `sg_lane` loads
/// vec4 `j·b + sg_lane` of them (clamped to the last; keys past the tile's end read its last
/// key), then `{name}{i}` is vec4 `i` of its key, taken by `subgroupBroadcast` from the lane
/// that loaded it. Every lane of the subgroup must run it.
fn broadcast_loads(array: &str, names: &[(&str, u32)], n: u32, b: u32) -> String {
    let total = names
        .iter()
        .map(|(_, offset)| offset + n)
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for j in 0..total.div_ceil(b) {
        out.push_str(&format!(
            "    let e{j} = min({}u + sg_lane, {}u);\n    \
             let {array}w{j} = load4_{array}({array}_row(tile_t0 + min(c + e{j} / {n}u, tile_len - 1u)), \
             4u * (e{j} % {n}u), p.d_{array});\n",
            j * b,
            total - 1,
        ));
    }
    for (name, offset) in names {
        for i in 0..n {
            let e = offset + i;
            out.push_str(&format!(
                "    let {name}{i} = subgroupBroadcast({array}w{}, {}u);\n",
                e / b,
                e % b
            ));
        }
    }
    out
}

/// Replaces each `//!include <path>` line with the named common file.
pub fn resolve_includes(file: &str) -> String {
    let mut out = String::with_capacity(file.len() + 2048);
    for line in file.lines() {
        match line.trim().strip_prefix("//!include ") {
            Some(path) => {
                let (_, src) = COMMON_FILES
                    .iter()
                    .find(|(p, _)| *p == path.trim())
                    .expect("include names a file listed in COMMON_FILES");
                out.push_str(src);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
