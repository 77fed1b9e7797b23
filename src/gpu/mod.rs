//! Everything that touches wgpu: the device context, the kernel registry, the pipeline
//! cache, tensors and the executor that runs plans.

pub mod completion;
pub mod context;
pub mod executor;
pub mod pipelines;
pub mod pool;
pub mod tensor;
