//! [`LoopCost`]: what bounds a kernel's loops, for devices that end long shader loops.

/// Loop iterations one invocation of a kernel may run in one dispatch, as
/// `fixed + per_step · ⌈len / step⌉` over the kernel's one long loop (keys, a reduction dim or
/// splits; [`KernelSpec::LONG_LOOP`](crate::kernels::KernelSpec::LONG_LOOP) says which).
/// Every loop the shader executes is counted as its iterations + 1 (the exit test counts on Mesa's llvmpipe, which ends a shader's loops
/// once 65,535 iterations have run in one invocation, all loops together: see
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
    /// A kernel without loops.
    pub const NONE: LoopCost = LoopCost {
        fixed: 0,
        per_step: 0,
        step: 1,
    };

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
pub(crate) const fn looped(n: u64) -> u64 {
    n + 1
}
