//! What the planner knows about a device: its limits and quirks (llvmpipe's loop cap,
//! subgroup sizes, matrix units, how many workgroups fill it), read from the adapter by the
//! `*_of` helpers. The one home of device quirks.

use std::fmt;

use crate::fused_config::FUSED_ROWS;
use crate::kernels::LoopCost;

/// The device limits the planner respects. Built from `wgpu::Limits`; tests may shrink them
/// to force the splitting paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCaps {
    /// `max_storage_buffer_binding_size`.
    pub max_binding: u64,
    /// `max_buffer_size`.
    pub max_buffer: u64,
    /// `max_compute_workgroups_per_dimension`.
    pub max_workgroups: u32,
    /// `max_compute_workgroup_storage_size`.
    pub max_workgroup_bytes: u64,
    /// Most loop iterations one shader invocation may run where the device ends loops early
    /// without an error ([`LLVMPIPE_LOOP_CAP`] on Mesa's llvmpipe), or `None`. The planner
    /// keeps every dispatch under it by the kernels' [`LoopCost`]: it splits the keys of
    /// the fused and `weighted_sum` kernels and refuses what no split can bound.
    pub loop_cap: Option<u64>,
    /// Whether kernels may declare `f16` arrays (`SHADER_F16` enabled on the device); without,
    /// f16 tensors are read as packed pairs ([`Storage`](crate::Storage)).
    pub native_f16: bool,
    /// How many workgroups the device runs at once: split-K splits the keys until the grid
    /// has this many, and a grid that has them is not split.
    pub fill: Fill,
    /// The subgroup size, where the device has subgroup operations (`Features::SUBGROUP`), one
    /// fixed size (the adapter's min = max) and that size divides the fused kernel's 64
    /// invocations: then `flash` may share a row group's keys among a subgroup's lanes
    /// ([`subgroup_lanes_of`]). `None` elsewhere (wgpu's GL backend has no subgroups).
    pub subgroup_lanes: Option<u32>,
    /// Whether each invocation's load from workgroup or storage memory runs as a scalar load
    /// of its own: a CPU adapter (`DeviceType::Cpu`: Mesa's llvmpipe runs invocations as SIMD
    /// lanes and loads lane by lane unless the address is a constant). Then `flash` loads K
    /// and V rows once per subgroup and broadcasts them by default
    /// ([`FusedConfig::broadcast_loads`](crate::FusedConfig::broadcast_loads)).
    pub scalar_lane_loads: bool,
    /// The device's matrix units (cooperative matrices), where xattn enabled them
    /// ([`matrix_units_of`]); `None` elsewhere.
    pub matrix_units: Option<MatrixUnits>,
}

/// Matrix units a device offers to `flash_coop` (`Features::EXPERIMENTAL_COOPERATIVE_MATRIX`):
/// the side of its square tiles (M = N = K, 8 or 16) with f32 accumulators, for f32 inputs and
/// for f16 inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatrixUnits {
    /// Tile side with f32 inputs (Apple's simdgroup matrices: 8), if any.
    pub f32_tile: Option<u32>,
    /// Tile side with f16 inputs (tensor cores: 16), if any.
    pub f16_tile: Option<u32>,
}

/// The matrix units in `configs` (`wgpu::Adapter::cooperative_matrix_properties`): for each
/// input type, the largest square tile with f32 accumulators (the only accumulator xattn
/// uses); `None` if there is none.
pub fn matrix_units_of(configs: &[wgpu::CooperativeMatrixProperties]) -> Option<MatrixUnits> {
    use wgpu::CooperativeScalarType as Ty;
    let tile = |input: Ty| {
        configs
            .iter()
            .filter(|c| {
                c.m_size == c.n_size
                    && c.n_size == c.k_size
                    && matches!(c.m_size, 8 | 16)
                    && c.ab_type == input
                    && c.cr_type == Ty::F32
            })
            .map(|c| c.m_size)
            .max()
    };
    let units = MatrixUnits {
        f32_tile: tile(Ty::F32),
        f16_tile: tile(Ty::F16),
    };
    (units.f32_tile.is_some() || units.f16_tile.is_some()).then_some(units)
}

/// An estimate of how many workgroups keep a device busy, and what it rests on. wgpu reports
/// no compute-unit count, so it is derived from the adapter's device type ([`fill_of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill {
    /// Workgroups the device runs at once (≥ 1).
    pub workgroups: u32,
    /// Why this many (for `--plan`).
    pub basis: &'static str,
}

impl fmt::Display for Fill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "~{} ({})", self.workgroups, self.basis)
    }
}

/// The fill of a GPU the adapter says nothing useful about, and of a discrete one: 20–144
/// compute units, each holding two or more of the fused kernel's workgroups at once.
pub const GPU_FILL: Fill = Fill {
    workgroups: 256,
    basis: "a discrete GPU's estimate: up to ~128 compute units × 2",
};

/// The fill of an adapter of this device type: one workgroup per host thread on a CPU adapter
/// (Mesa's lavapipe and llvmpipe, SwiftShader, WARP run each workgroup on one thread of a pool
/// as large as the host's `host_threads`), 64 on an integrated GPU (8–32 compute units × 2),
/// [`GPU_FILL`] for the rest.
pub fn fill_of(device_type: wgpu::DeviceType, host_threads: usize) -> Fill {
    match device_type {
        wgpu::DeviceType::Cpu => Fill {
            workgroups: u32::try_from(host_threads).unwrap_or(u32::MAX).max(1),
            basis: "a CPU adapter: one workgroup per host thread",
        },
        wgpu::DeviceType::IntegratedGpu => Fill {
            workgroups: 64,
            basis: "an integrated GPU's estimate: up to ~32 compute units × 2",
        },
        _ => GPU_FILL,
    }
}

/// Mesa's llvmpipe (lavapipe on Vulkan, llvmpipe under wgpu's GL backend) ends every loop of a
/// shader invocation once that invocation has run 65,535 loop iterations in all (gallivm's
/// `LP_MAX_TGSI_LOOP_ITERATIONS`, a guard against endless loops). The shader then goes on
/// with partial sums: a wrong answer, no error.
pub const LLVMPIPE_LOOP_CAP: u64 = 65_535;

/// The loop cap of an adapter: [`LLVMPIPE_LOOP_CAP`] for Mesa's llvmpipe (by adapter name or
/// driver, on every backend), `None` for the rest.
pub fn loop_cap_of(info: &wgpu::AdapterInfo) -> Option<u64> {
    let llvmpipe = [&info.name, &info.driver]
        .iter()
        .any(|s| s.to_lowercase().contains("llvmpipe"));
    llvmpipe.then_some(LLVMPIPE_LOOP_CAP)
}

/// [`DeviceCaps::subgroup_lanes`] of a device: its subgroup size where it has `has_subgroups`,
/// a fixed size (`min == max`: the lanes of a row group must be one whole subgroup) and one
/// that divides [`FUSED_ROWS`] invocations into whole subgroups; `None` otherwise.
pub fn subgroup_lanes_of(has_subgroups: bool, min: u32, max: u32) -> Option<u32> {
    (has_subgroups && min == max && min >= 2 && min.is_power_of_two() && min <= FUSED_ROWS)
        .then_some(min)
}

impl DeviceCaps {
    /// The caps of a device with these limits, on an adapter with no loop cap, filled as a
    /// discrete GPU ([`GPU_FILL`]).
    pub fn from_limits(l: &wgpu::Limits) -> Self {
        Self {
            loop_cap: None,
            native_f16: false,
            fill: GPU_FILL,
            subgroup_lanes: None,
            scalar_lane_loads: false,
            matrix_units: None,
            max_binding: l.max_storage_buffer_binding_size,
            max_buffer: l.max_buffer_size,
            max_workgroups: l.max_compute_workgroups_per_dimension,
            max_workgroup_bytes: u64::from(l.max_compute_workgroup_storage_size),
        }
    }

    /// The longest loop a kernel with `cost` may run on this device (unbounded without a cap).
    pub(crate) fn loop_len(&self, cost: &LoopCost) -> u64 {
        // Strictly under the cap: the iteration that reaches it is the one cut.
        self.loop_cap
            .map_or(u64::MAX, |cap| cost.max_len(cap.saturating_sub(1)))
    }
}
