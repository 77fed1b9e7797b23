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
    /// First query row of this chunk.
    pub row_offset: u32,
    /// Query rows in this chunk.
    pub rows: u32,
    /// Key splits (split-K) or merged shards; 1 otherwise.
    pub n_splits: u32,
    /// Keys per split.
    pub split_len: u32,
    /// Padding to a multiple of 16 bytes.
    pub _pad: [u32; 2],
}
