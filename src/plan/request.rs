//! What a call asks for ([`Request`], [`Path`]) and the buffers an attention program
//! declares for it ([`AttnIo`], [`StatsIo`]).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::fused_config::{ConfigChoice, FusedConfig};
use crate::mask::MaskSpec;
use crate::plan::check::bytes;
use crate::program::{BufferId, Program};
use crate::shape::AttnShape;
use crate::stats::{Pool, Stats};

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
    /// Packed bool-mask bits (absent when unused).
    pub mask: BufferId,
    /// Additive bias (absent when unused).
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
        .map_or(0, |d| d[0] * d[1] * d[2] * d[3].div_ceil(32));
    let bias = masks.bias_dims.map_or(0, |d| d.iter().product());
    [bytes(2 * s.batch), bytes(mask_words), bytes(bias)]
}

/// Declares the lengths, mask and bias inputs of `masks` on `s` (the mask and the bias absent
/// where the call has none), named with `prefix`.
pub fn declare_mask_inputs(
    program: &mut Program,
    prefix: &str,
    s: &AttnShape,
    masks: &MaskSpec,
) -> [BufferId; 3] {
    let [lens, mask, bias] = mask_input_bytes(s, masks);
    [
        program.input(&format!("{prefix}lens"), lens),
        program.optional_input(&format!("{prefix}mask"), mask, masks.mask_dims.is_some()),
        program.optional_input(&format!("{prefix}bias"), bias, masks.bias_dims.is_some()),
    ]
}

impl AttnIo {
    /// Declares Q, K, V and the masks of `req` as inputs and O, LSE (and P if asked) as
    /// outputs, each in its element type.
    pub fn declare(program: &mut Program, req: &Request) -> Self {
        let s = &req.shape;
        let size = |dtype: DType, dims: &[usize]| dtype.bytes(dims.iter().product());
        let [lens, mask, bias] = declare_mask_inputs(program, "", s, &req.masks);
        Self {
            q: program.input("q", size(req.dtype, &s.q_dims())),
            k: program.input("k", size(req.dtype, &s.k_dims())),
            v: program.input("v", size(req.dtype, &s.v_dims())),
            lens,
            mask,
            bias,
            o: program.output("o", size(req.out_dtype, &s.o_dims())),
            lse: program.output("lse", size(DType::F32, &s.lse_dims())),
            weights: req
                .weights
                .then(|| program.output("weights", size(DType::F32, &s.weights_dims()))),
            stats: StatsIo::declare(program, "", s, req.stats, req.pool),
        }
    }
}
