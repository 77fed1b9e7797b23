//! Uniform parameters shared by every attention kernel.
//!
//! Keep in sync with `shaders/common/params.wgsl`; `tests/shaders.rs` compares size and
//! member offsets with naga's layouter.

use bytemuck::{Pod, Zeroable};

/// Per-dispatch parameters. Sizes live here, never in pipeline keys, so one pipeline serves
/// every sequence length and batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct AttnParams {
    /// Batch entries.
    pub batch: u32,
    /// Query rows of the whole problem.
    pub m: u32,
    /// Key rows of the whole problem.
    pub n: u32,
    /// Query heads.
    pub q_heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// Query/key head dimension.
    pub d_k: u32,
    /// Value head dimension.
    pub d_v: u32,
    /// Logit scale.
    pub scale: f32,
    /// First batch·head index of this chunk.
    pub bh_offset: u32,
    /// Batch·head problems in this chunk.
    pub bh_count: u32,
    /// First query row of this chunk (`weight_blocks`: of each block's pass, block-relative).
    pub row_offset: u32,
    /// Query rows in this chunk (`weight_blocks`: of each block's pass).
    pub rows: u32,
    /// Key splits (split-K) or merged shards; 1 otherwise.
    pub n_splits: u32,
    /// Keys per split.
    pub split_len: u32,
    /// Which per-key logit controls are on ([`flags`]).
    pub flags: u32,
    /// Softcap `cap` of `cap·tanh(logit/cap)` (with `flags::SOFTCAP`).
    pub softcap: f32,
    /// Keys a row sees before its diagonal, or [`UNBOUNDED`].
    pub win_left: u32,
    /// Keys a row sees after its diagonal (0 = causal), or [`UNBOUNDED`].
    pub win_right: u32,
    /// 1 when the diagonal is bottom-right aligned (row i ↔ key i + kv_len − q_len), else 0.
    pub bottom_right: u32,
    /// Key segments with their own temperature (≤ 4).
    pub n_segments: u32,
    /// Bool-mask strides in u32 words over batch, head and row (0 = broadcast).
    pub mask_b: u32,
    /// See `mask_b`.
    pub mask_h: u32,
    /// See `mask_b`.
    pub mask_row: u32,
    /// Bias strides in elements over batch, head and row (0 = broadcast).
    pub bias_b: u32,
    /// See `bias_b`.
    pub bias_h: u32,
    /// See `bias_b`.
    pub bias_row: u32,
    /// First key `weighted_sum` sums in this dispatch (0 writes O, later ranges add to it);
    /// for `weight_blocks`, the first key of each block's pass, block-relative.
    pub key_begin: u32,
    /// One past the last key `weighted_sum` (`weight_blocks`) sums in this dispatch.
    pub key_end: u32,
    /// Query rows per block of `weight_blocks`.
    pub block_rows: u32,
    /// Keys per block of `weight_blocks`.
    pub block_cols: u32,
    /// Blocks down the M rows (`⌈M / block_rows⌉`).
    pub grid_rows: u32,
    /// Blocks across the N keys (`⌈N / block_cols⌉`).
    pub grid_cols: u32,
    /// Dropout (with `flags::DROPOUT`): a weight is dropped when its Philox draw is below
    /// this, `round(p·2³²)` (see [`crate::dropout`]).
    pub drop_below: u32,
    /// Factor of a kept weight under dropout, `1/(1 − p)`.
    pub keep_scale: f32,
    /// Dropout seed, low then high word (the Philox key).
    pub seed: [u32; 2],
    /// Dropout offset, low then high word (the Philox counter's upper half).
    pub offset: [u32; 2],
    /// Added to every row's diagonal key (see `mask::Block`): a block of a longer sequence,
    /// rows from `r0` and keys from `n0`, has its top-left diagonal at `r0 − n0`; 0 otherwise.
    pub diag_shift: i32,
    /// Padding to a multiple of 16 bytes.
    pub _pad: u32,
    /// First key of each segment.
    pub seg_start: [u32; 4],
    /// One past the last key of each segment.
    pub seg_end: [u32; 4],
    /// Logit factor (inverse temperature) of each segment.
    pub seg_factor: [f32; 4],
}

/// `win_left`/`win_right` value for "no bound on this side".
pub const UNBOUNDED: u32 = u32::MAX;

/// Bits of [`AttnParams::flags`]: per-key work the kernels must do.
pub mod flags {
    /// A bool mask is bound (`mask_*` strides).
    pub const MASK: u32 = 1;
    /// An additive bias is bound (`bias_*` strides).
    pub const BIAS: u32 = 2;
    /// Logits are soft-capped.
    pub const SOFTCAP: u32 = 4;
    /// Key segments scale their logits.
    pub const SEGMENTS: u32 = 8;
    /// Split-K partial statistics: `flash` writes, and `merge_partials` reads, two rows per
    /// split, the max logit and the log of the sum, instead of their sum, the LSE. Kept apart,
    /// ln(sum) survives logits so large (a bias of −9e29) that f32 would absorb it in the LSE.
    pub const SPLIT_STATS: u32 = 16;
    /// `weight_blocks` combines this pass with what earlier passes wrote (sum or max).
    pub const ACCUMULATE: u32 = 32;
    /// Attention weights are dropped at random ([`crate::dropout`]).
    pub const DROPOUT: u32 = 64;
}

/// Parameters of the `linear` kernel: `Y[r, o] = Σ_i X[r, i]·W[o, i] + b[o]` for rows
/// `row_offset .. row_offset + rows` (PyTorch `Linear` layout: W is `[out_dim, in_dim]`).
///
/// Keep in sync with `LinearParams` in `shaders/linear.wgsl`; `tests/shaders.rs` checks it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct LinearParams {
    /// First row of this chunk.
    pub row_offset: u32,
    /// Rows in this chunk.
    pub rows: u32,
    /// Input features.
    pub in_dim: u32,
    /// Output features.
    pub out_dim: u32,
    /// 1 when a bias is bound, else 0.
    pub has_bias: u32,
    /// Padding to a multiple of 16 bytes.
    pub _pad: [u32; 3],
}

/// Parameters of the `linear_grad` kernel, one of the two products of `linear`'s backward
/// (`Y = X·Wᵀ + b`, W `[out_dim, in_dim]`, dY `[rows, out_dim]`), both
/// `G[m, c] (+)= Σ_{k ∈ k_begin..k_end} A[m, k]·B[k, c]` with B `[K, in_dim]` row-major:
///
/// - [`linear_grad::INPUT`]: `dX = dY·W`: A = dY, B = W, K = out_dim, G = dX `[rows, in_dim]`;
/// - [`linear_grad::WEIGHT`]: `dW = dYᵀ·X`: A = dYᵀ, B = X, K = rows, G = dW `[out_dim, in_dim]`,
///   and where `has_bias`, `db[m] (+)= Σ_k dY[k, m]` (B's column `in_dim` read as ones).
///
/// Output rows `m_offset .. m_offset + m`. The first reduction range (`k_begin` = 0) writes
/// G; later ones continue its sums from what is there.
///
/// Keep in sync with `LinearGradParams` in `shaders/linear_grad.wgsl`; `tests/shaders.rs`
/// checks it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct LinearGradParams {
    /// Which product: [`linear_grad::INPUT`] or [`linear_grad::WEIGHT`].
    pub product: u32,
    /// First output row of this chunk.
    pub m_offset: u32,
    /// Output rows in this chunk.
    pub m: u32,
    /// Output columns: the layer's input features.
    pub in_dim: u32,
    /// The layer's output features (dY's row length).
    pub out_dim: u32,
    /// First term of the reduction this dispatch sums.
    pub k_begin: u32,
    /// One past its last term.
    pub k_end: u32,
    /// 1 when the weight product also writes db, else 0.
    pub has_bias: u32,
}

/// [`LinearGradParams::product`] values.
pub mod linear_grad {
    /// `dX = dY·W`.
    pub const INPUT: u32 = 0;
    /// `dW = dYᵀ·X` (and `db = Σ_rows dY`).
    pub const WEIGHT: u32 = 1;
}

/// Parameters of the `add` kernel: how many f32 elements to add.
///
/// Keep in sync with `AddParams` in `shaders/add.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct AddParams {
    /// Elements to add.
    pub elems: u32,
    /// Padding to 16 bytes.
    pub _pad: [u32; 3],
}

/// Parameters of the `pack` kernel: how many f32 elements to pack into half pairs.
///
/// Keep in sync with `PackParams` in `shaders/pack.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct PackParams {
    /// Elements to pack.
    pub elems: u32,
    /// Padding to 16 bytes.
    pub _pad: [u32; 3],
}

/// What `weight_blocks` reduces a block of attention weights P to; the value is the
/// shader's `OP` constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockOp {
    /// `Σ P`: key coverage, mean pooling.
    Sum = 0,
    /// `max P`: row focus, max pooling.
    Max = 1,
    /// `Σ −P ln P`: row entropy.
    Entropy = 2,
    /// The mean of P over the block's real elements: mean pooling.
    Mean = 3,
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

/// Parameters of the edge-list attention kernels `graph_attention` and `graph_merge`
/// (`src/plan/graph.rs`): one destination node's softmax over its in-neighbours.
///
/// Keep in sync with `GraphParams` in `shaders/common/graph.wgsl`; `tests/shaders.rs` checks
/// it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct GraphParams {
    /// Destination nodes (query rows).
    pub m: u32,
    /// Source nodes (key/value rows).
    pub n: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads (dividing `heads`: query head h reads kv head h / (heads / kv_heads)).
    pub kv_heads: u32,
    /// Query/key head dimension.
    pub d_k: u32,
    /// Value head dimension.
    pub d_v: u32,
    /// Logit scale.
    pub scale: f32,
    /// [`graph_flags`] bits.
    pub flags: u32,
    /// Work items of `graph_attention`: destinations (whole neighbour lists) or chunks of
    /// them (split); unused by `graph_merge`.
    pub items: u32,
    /// The longest loop of one invocation: edges one `graph_attention` workgroup walks (the
    /// chunk length when split, else the largest in-degree), chunks of one destination for
    /// `graph_merge`.
    pub max_len: u32,
    /// Edges of the graph.
    pub edges: u32,
    /// The backward's passes: the first edge of each list this pass walks (edges `offset ..
    /// offset + max_len` of every list); 0 for the forward.
    pub offset: u32,
}

/// Bits of [`GraphParams::flags`].
pub mod graph_flags {
    /// A per-edge, per-head additive bias `[E, heads]` (in CSR order) is bound.
    pub const BIAS: u32 = 1;
    /// Edge features `[E, heads, d]` (in CSR order, d = d_k = d_v) are bound and added to
    /// each edge's key and value rows, as PyG's `TransformerConv` adds its projected
    /// `edge_attr`.
    pub const EDGE_FEATURES: u32 = 2;
    /// The backward's: O was averaged over heads, so dO is `[M, 1, d_v]` and each head's
    /// share is dO / heads (D = Σ P·dP is then summed over the edges by `graph_grad_q`'s
    /// delta passes: the per-head O is not kept).
    pub const MEAN_HEADS: u32 = 4;
    /// The backward's: a pass after the first over chunks of long lists, which adds its sums
    /// to dQ (or D), dK and dV rather than writing them.
    pub const ACCUMULATE: u32 = 8;
}
