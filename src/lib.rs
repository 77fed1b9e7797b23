#![warn(missing_docs)]
//! xattn — cross-attention on any GPU wgpu reaches (Vulkan, Metal, DX12, GL).
//!
//! `O = softmax(scale · Q·Kᵀ) · V` with Q from the target sequence (M rows) and K, V from the
//! source (N rows), computed by WGSL kernels and checked against a CPU reference.
//!
//! ```no_run
//! # fn main() -> xattn::Result<()> {
//! let ctx = xattn::Context::new()?;          // headless; honours WGPU_BACKEND, WGPU_ADAPTER_NAME
//! let engine = xattn::Engine::new(&ctx);
//! let (b, m, n, h, d) = (1, 4, 77, 8, 40);
//! let q = engine.upload(&vec![0.1; b * m * h * d], &[b, m, h, d])?;
//! let k = engine.upload(&vec![0.2; b * n * h * d], &[b, n, h, d])?;   // reusable across calls
//! let v = engine.upload(&vec![0.3; b * n * h * d], &[b, n, h, d])?;
//! let opts = xattn::Attention::default();
//! println!("{}", engine.plan(&q, &k, &v, &opts)?);  // path, tiles, splits, bytes
//! let out = engine.attention(&q, &k, &v, &opts)?;
//! let o: Vec<f32> = out.o.to_host()?;              // [b, m, h, d]
//! # Ok(()) }
//! ```
//!
//! Layouts, row-major; Q, K, V and O in the tensors' element type ([`DType`]: f32, f16 or
//! bf16, computed in f32), LSE and weights in f32 (the CLI's `--layout bhsd` transposes
//! PyTorch SDPA's `[batch, heads, seq, d]` on the host):
//!
//! | tensor | shape |
//! |---|---|
//! | Q | `[batch, M, q_heads, d_k]` |
//! | K | `[batch, N, kv_heads, d_k]` |
//! | V | `[batch, N, kv_heads, d_v]` |
//! | O | `[batch, M, q_heads, d_v]` |
//! | weights P | `[batch, q_heads, M, N]` |
//! | LSE | `[batch, q_heads, M]`, natural log of Σ exp(scaled logits) |

mod call;
pub mod cpu;
pub mod device;
#[cfg(feature = "mpi")]
pub mod distributed;
pub mod dropout;
mod dtype;
mod engine;
mod error;
pub mod fused_config;
mod grad;
pub mod graph;
// Internals, public for the tests, the CLI and the benches; what a user needs is re-exported
// below.
#[doc(hidden)]
pub mod gpu;
#[cfg(feature = "heatmap")]
pub mod heatmap;
#[doc(hidden)]
pub mod kernels;
mod linear_grad;
pub mod mask;
pub mod mha;
#[doc(hidden)]
pub mod params;
#[doc(hidden)]
pub mod plan;
#[doc(hidden)]
pub mod program;
pub mod settings;
pub mod shape;
pub mod shard;
pub mod stats;
pub mod tune;

pub use call::Prepared;
pub use dtype::{DType, Storage};
pub use engine::{Attention, Engine, HostOutput, Output};
pub use error::{Error, Result};
pub use fused_config::{ConfigChoice, ConfigSource, FusedConfig};
pub use gpu::context::Context;
pub use gpu::executor::GpuTimer;
pub use gpu::tensor::Tensor;
pub use grad::{Grads, HostGrads};
pub use graph::backward::{GraphGrads, GraphHostGrads};
pub use graph::gca::{Branch, GcaConfig, GcaGrads, GcaOutput, GcaWeights, GraphCrossAttention};
pub use graph::{
    Graph, GraphAttention, GraphHostOutput, GraphHostStats, GraphOutput, GraphStatsOutput,
};
pub use linear_grad::LinearGrads;
pub use mask::Alignment;
pub use mha::{LayerGrads, MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights, PreparedLayer};
pub use plan::{DeviceCaps, Path, Plan, Request};
pub use shape::AttnShape;
pub use stats::{Pool, PoolOp, Stats, StatsOutput};

// The README's Rust snippets compile as pasted: `cargo test --doc` builds them.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeSnippets;
