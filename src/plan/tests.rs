//! The planner's unit tests.

use super::attention::*;
use super::device::*;
use super::request::*;
use crate::dtype::DType;
use crate::fused_config::FusedConfig;
use crate::kernels::flash::Flash;
use crate::kernels::Kernel;
use crate::mask::MaskSpec;
use crate::shape::AttnShape;
use crate::stats::Stats;

/// A device without a loop cap or subgroups, filled as a GPU (the tuner's tests start here too).
pub(crate) const CAPS: DeviceCaps = DeviceCaps {
    max_binding: 128 << 20,
    max_buffer: 2 << 30,
    max_workgroups: 65535,
    max_workgroup_bytes: 32 << 10,
    loop_cap: None,
    native_f16: false,
    fill: GPU_FILL,
    subgroup_lanes: None,
    scalar_lane_loads: false,
    matrix_units: None,
};

fn caps_filled_by(workgroups: u32) -> DeviceCaps {
    DeviceCaps {
        fill: Fill {
            workgroups,
            basis: "test",
        },
        ..CAPS
    }
}

fn shape(m: usize, n: usize, heads: usize) -> AttnShape {
    AttnShape {
        batch: 1,
        m,
        n,
        q_heads: heads,
        kv_heads: heads,
        d_k: 64,
        d_v: 64,
    }
}

fn plan(s: AttnShape, path: Option<Path>, caps: &DeviceCaps) -> Plan {
    let req = Request {
        shape: s,
        scale: 0.125,
        weights: false,
        path,
        masks: MaskSpec::default(),
        dtype: DType::F32,
        out_dtype: DType::F32,
        stats: Stats::default(),
        pool: None,
        fused: None,
    };
    Plan::new(&req, caps).expect("plans")
}

/// The flash dispatch's grid: [row blocks, key splits, heads].
fn flash_grid(plan: &Plan) -> [u32; 3] {
    plan.program
        .dispatches()
        .find(|d| d.kernel.name() == "flash")
        .expect("a flash dispatch")
        .grid
}

/// A device with 16×16 f16 tiles and subgroups of 32 (tensor cores through Vulkan).
const TENSOR_CORES: DeviceCaps = DeviceCaps {
    matrix_units: Some(MatrixUnits {
        f32_tile: None,
        f16_tile: Some(16),
    }),
    subgroup_lanes: Some(32),
    native_f16: true,
    max_workgroup_bytes: 48 << 10,
    ..CAPS
};

fn matrix_request(dtype: DType, entropy: bool) -> Request {
    Request {
        shape: shape(40, 77, 2),
        scale: 0.125,
        weights: false,
        path: None,
        masks: MaskSpec::default(),
        dtype,
        out_dtype: DType::F32,
        stats: Stats {
            entropy,
            ..Stats::default()
        },
        pool: None,
        fused: None,
    }
}

#[test]
fn matrix_units_of_keep_square_f32_accumulating_tiles() {
    use wgpu::CooperativeScalarType::{F16, F32};
    let config = |m, n, k, ab, cr| wgpu::CooperativeMatrixProperties {
        m_size: m,
        n_size: n,
        k_size: k,
        ab_type: ab,
        cr_type: cr,
        saturating_accumulation: false,
    };
    assert_eq!(matrix_units_of(&[]), None);
    // f16 accumulators and non-square tiles are of no use.
    assert_eq!(
        matrix_units_of(&[config(16, 16, 16, F16, F16), config(16, 8, 16, F16, F32)]),
        None
    );
    assert_eq!(
        matrix_units_of(&[
            config(8, 8, 8, F16, F32),
            config(16, 16, 16, F16, F32),
            config(8, 8, 8, F32, F32),
        ]),
        Some(MatrixUnits {
            f32_tile: Some(8),
            f16_tile: Some(16),
        })
    );
}

#[test]
fn matrix_units_run_only_where_forced_and_fitting() {
    let label = |p: &Plan| -> Vec<String> {
        p.program
            .dispatches()
            .filter(|d| d.kernel.name().starts_with("flash"))
            .map(|d| d.kernel.label())
            .collect()
    };
    // Neither the default nor any other configuration picks them.
    let auto = Plan::new(&matrix_request(DType::F16, false), &TENSOR_CORES).unwrap();
    assert!(
        label(&auto).iter().all(|l| l.starts_with("xattn.flash_dk")),
        "{auto}"
    );
    // Forced with f16 inputs: 16×16 f16 tiles.
    let forced = matrix_request(DType::F16, false).with_fused_config(FusedConfig::MATRIX_UNITS);
    let p = Plan::new(&forced, &TENSOR_CORES).unwrap();
    assert_eq!(
        label(&p),
        ["xattn.flash_coop_dk64_dv64_bc64_t16_f16_lanes32_f16"],
        "{p}"
    );
    // Refused, with the reason: no matrix units; f32 inputs on f16-only tiles; row
    // statistics; no fixed subgroup size; too little workgroup memory.
    let refused = |req: &Request, caps: &DeviceCaps, why: &str| {
        let err = Plan::new(req, caps).unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    };
    refused(&forced, &CAPS, "cooperative matrices");
    let f32_inputs = matrix_request(DType::F32, false).with_fused_config(FusedConfig::MATRIX_UNITS);
    refused(&f32_inputs, &TENSOR_CORES, "f16 inputs only");
    let stats = matrix_request(DType::F16, true).with_fused_config(FusedConfig::MATRIX_UNITS);
    refused(&stats, &TENSOR_CORES, "entropy");
    let no_lanes = DeviceCaps {
        subgroup_lanes: None,
        ..TENSOR_CORES
    };
    refused(&forced, &no_lanes, "subgroup");
    let small = DeviceCaps {
        max_workgroup_bytes: 4 << 10,
        ..TENSOR_CORES
    };
    refused(&forced, &small, "max_compute_workgroup_storage_size");
}

#[test]
fn vec4_bindings_where_both_head_dims_allow() {
    for (d_k, d_v, wide) in [
        (64, 64, true),
        (40, 8, true),
        (64, 30, false),
        (3, 64, false),
    ] {
        let p = plan(
            AttnShape {
                d_k,
                d_v,
                ..shape(8, 8, 1)
            },
            Some(Path::Fused),
            &CAPS,
        );
        let flash = p.program.dispatches().find(|d| d.kernel.name() == "flash");
        let got = matches!(flash.expect("a flash dispatch").kernel, Kernel::Flash(Flash { wide, .. }) if wide);
        assert_eq!(got, wide, "d_k {d_k}, d_v {d_v}: {p}");
    }
}

#[test]
fn more_workgroups_take_fewer_splits() {
    let caps = caps_filled_by(256);
    let mut last = usize::MAX;
    for heads in [1, 2, 3, 8, 64, 255, 256, 1000] {
        let got = split_count(&shape(1, 1 << 16, heads), 64, &caps, usize::MAX, false);
        assert_eq!(got.splits, 256usize.div_ceil(heads).max(1), "{heads} heads");
        assert!(got.splits <= last, "{heads} heads: {got:?}");
        last = got.splits;
    }
    assert_eq!(last, 1, "a grid past the fill is not split");
}

#[test]
fn a_larger_device_takes_more_splits() {
    let s = shape(256, 16384, 1);
    let counts: Vec<usize> = [1, 2, 16, 64, 256]
        .map(|fill| split_count(&s, 256, &caps_filled_by(fill), usize::MAX, false).splits)
        .to_vec();
    // One 256-row workgroup: as many splits as the device runs workgroups, up to
    // N / MIN_SPLIT_KEYS = 128.
    assert_eq!(counts, [1, 2, 16, 64, 128]);
}

#[test]
fn splits_keep_min_keys_loop_cap_and_forced_minimum() {
    let caps = caps_filled_by(256);
    // 300 keys hold two splits of ≥ 128 keys, not 256.
    let s = shape(1, 300, 1);
    assert_eq!(split_count(&s, 64, &caps, usize::MAX, false).splits, 2);
    // A grid that fills the device is split only as far as the loop cap needs.
    let s = shape(4096, 10_000, 16);
    assert_eq!(split_count(&s, 256, &caps, usize::MAX, false).splits, 1);
    let capped = split_count(&s, 256, &caps, 3000, false);
    assert_eq!(capped.splits, 4, "{capped:?}");
    assert!(capped.why.contains("loop cap"), "{capped:?}");
    // Split-K asked for on a filled device still splits.
    let forced = split_count(&s, 256, &caps, usize::MAX, true);
    assert_eq!(forced.splits, 2, "{forced:?}");
}

#[test]
fn workgroups_are_counted_in_rows_of_the_chosen_r() {
    // Square B1 H8 M1024 d64 runs R = 4: 256 rows per workgroup, 4 × 8 = 32 workgroups.
    // On a device filled by 64 that is 2 splits (counting 64-row blocks, 128 workgroups,
    // would not split).
    let p = plan(shape(1024, 1024, 8), None, &caps_filled_by(64));
    assert_eq!(p.path, Path::SplitK, "{p}");
    assert_eq!(flash_grid(&p), [4, 2, 8], "{p}");
    let p = plan(shape(1024, 1024, 8), None, &caps_filled_by(32));
    assert_eq!((p.path, flash_grid(&p)), (Path::Fused, [4, 1, 8]), "{p}");
}

#[test]
fn the_auto_path_follows_the_device() {
    // Decode B1 H8 M1 N1500: 8 one-row workgroups fill a 2-thread CPU adapter (one pass);
    // a discrete GPU gets splits of ≥ 128 keys.
    let decode = shape(1, 1500, 8);
    let cpu = DeviceCaps {
        fill: fill_of(wgpu::DeviceType::Cpu, 2),
        ..CAPS
    };
    let p = plan(decode, None, &cpu);
    assert_eq!((p.path, flash_grid(&p)), (Path::Fused, [1, 1, 8]), "{p}");
    assert!(p.tiling.contains("one workgroup per host thread"), "{p}");
    let p = plan(decode, None, &CAPS);
    assert_eq!((p.path, flash_grid(&p)), (Path::SplitK, [1, 10, 8]), "{p}");
    // 11 splits of ≥ 128 keys asked, 10 once rounded to whole 32-key tiles.
    assert!(p.tiling.contains("11 with ≥ 128 keys each"), "{p}");
    // Perceiver B1 H1 M256 N16384: one workgroup; two splits fill two threads.
    let p = plan(shape(256, 16384, 1), None, &cpu);
    assert_eq!((p.path, flash_grid(&p)), (Path::SplitK, [1, 2, 1]), "{p}");
}

#[test]
fn fill_by_device_type() {
    use wgpu::DeviceType::*;
    assert_eq!(fill_of(Cpu, 16).workgroups, 16);
    assert_eq!(fill_of(Cpu, 0).workgroups, 1);
    assert_eq!(fill_of(IntegratedGpu, 16).workgroups, 64);
    for t in [DiscreteGpu, VirtualGpu, Other] {
        assert_eq!(fill_of(t, 16), GPU_FILL);
    }
}

/// Per-edge inputs a call does not have are not held to the device's binding limit: a graph of
/// 600,000 edges plans without edge features (which would need 600,000 · 64 · 4 bytes, over
/// 128 MiB) and is refused, naming them, with.
#[test]
fn graph_inputs_absent_are_not_held_to_binding_limits() {
    use super::graph::{GraphPlan, GraphRequest};
    use crate::cpu::graph_reference::GraphDims;
    let (m, edges) = (1000usize, 600_000usize);
    let row_ptr: Vec<u32> = (0..=m).map(|i| (i * edges / m) as u32).collect();
    let col_idx: Vec<u32> = (0..edges).map(|e| (e % m) as u32).collect();
    let req = GraphRequest {
        dims: GraphDims {
            m,
            n: m,
            heads: 1,
            kv_heads: 1,
            d_k: 64,
            d_v: 64,
        },
        scale: 0.125,
        dtype: DType::F32,
        bias: false,
        edge_features: false,
        mean_heads: false,
        stats: false,
        chunk_len: None,
    };
    GraphPlan::new(&req, (&row_ptr, &col_idx), &CAPS).expect("plans without edge features");
    let with = GraphRequest {
        edge_features: true,
        ..req
    };
    let err = GraphPlan::new(&with, (&row_ptr, &col_idx), &CAPS).unwrap_err();
    assert!(err.to_string().contains("edge_attr"), "{err}");
}
