//! The scheduler: shape + options + device limits → a plan of dispatches and copies.
//!
//! The planner builds a [`Program`](crate::program::Program): every dispatch with its params
//! and grid (already checked against the device's limits) over the buffers it declares. It
//! holds no wgpu objects; the executor (`gpu::executor`) turns it into passes, the CPU
//! executor (`cpu::program`) runs it through the kernels' twins.
//!
//! Split along its seams: [`device`] (what the planner knows about a device: limits and
//! quirks), [`request`] (what a call asks for and the buffers it declares), [`attention`]
//! (three-pass, fused, split-K, merge), [`backward`] (the attention's gradients), [`stats`]
//! (statistics and pooled maps), [`graph`] (attention over a graph's edge list),
//! [`graph_backward`] (its gradients), [`layer`] (projections and the layer's forward
//! program), [`layer_backward`] (the layer's backward program), [`check`] (limits and loop
//! caps) and [`shard`] (cuts, blocks and byte counts of a call sharded over devices).

pub mod attention;
pub mod backward;
pub mod check;
pub mod device;
pub mod graph;
pub mod graph_backward;
pub mod layer;
pub mod layer_backward;
pub mod request;
pub mod shard;
pub mod stats;
#[cfg(test)]
pub(crate) mod tests;

pub use crate::fused_config::{FUSED_ROWS, FUSED_ROW_FLOATS};
pub use attention::{
    base_params, split_count, KeySplits, MergePlan, Plan, Planned, FUSED_MAX_HEAD_DIM,
};
pub use backward::{BackwardPlan, GradIo, GRAD_MAX_HEAD_DIM};
pub use check::check_loops;
pub use device::{
    fill_of, loop_cap_of, matrix_units_of, subgroup_lanes_of, DeviceCaps, Fill, MatrixUnits,
    GPU_FILL, LLVMPIPE_LOOP_CAP,
};
pub use layer::{add, linear, linear_backward, mean_heads, pack};
pub use request::{mask_input_bytes, AttnIo, Path, Request, StatsIo};
