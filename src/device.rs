//! The device side: adapters, what xattn wants of a device it did not open, and what the
//! planner knows about a device (its limits and quirks).

#[cfg(not(target_arch = "wasm32"))]
pub use crate::gpu::context::adapters;
pub use crate::gpu::context::{describe_info, instance, wanted_features, wanted_limits};
pub use crate::plan::device::{
    fill_of, loop_cap_of, DeviceCaps, Fill, MatrixUnits, GPU_FILL, LLVMPIPE_LOOP_CAP,
};
