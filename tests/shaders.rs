//! Every WGSL file validated by naga (no GPU needed), registered, and bound as declared.

use xattn::kernels::flash_coop::FlashCoop;
use xattn::kernels::linear::Linear;
use xattn::kernels::linear_grad::LinearGrad;
use xattn::kernels::pack::Pack;
use xattn::kernels::qk_scores::QkScores;
use xattn::kernels::{Access, Kernel, SHADER_FILES};
use xattn::mha::{MhaConfig, NeedWeights};
use xattn::params::{AttnParams, LinearGradParams, LinearParams};
use xattn::plan::layer::{layer_program, linear_backward, LayerTypes};
use xattn::plan::{BackwardPlan, DeviceCaps, MatrixUnits, MergePlan, Plan, Request};
use xattn::{Alignment, Attention, AttnShape, FusedConfig, Path, Pool, PoolOp, Stats};
use xattn::{DType, Storage};

const CAPS: DeviceCaps = DeviceCaps {
    max_binding: 128 << 20,
    max_buffer: 2 << 30,
    max_workgroups: 65535,
    max_workgroup_bytes: 16 << 10,
    loop_cap: Some(xattn::plan::LLVMPIPE_LOOP_CAP),
    native_f16: true,
    fill: xattn::plan::GPU_FILL,
    subgroup_lanes: Some(32),
    scalar_lane_loads: false,
    matrix_units: None,
};

fn collect(out: &mut Vec<Kernel>, program: &xattn::program::Program) {
    for d in program.dispatches() {
        if !out.contains(&d.kernel) {
            out.push(d.kernel);
        }
    }
}

/// Planner caps with and without native f16.
fn caps_for(native_f16: bool) -> DeviceCaps {
    DeviceCaps { native_f16, ..CAPS }
}

/// Every kernel specialization the planners produce: attention on every path (every flash
/// rows-per-invocation variant) for head dims 1..=256 in f32 (and a spread of head dims in every half storage, native and packed, with
/// half outputs), unmasked and masked; a merge; layers of every type.
fn all_kernels() -> Vec<Kernel> {
    let mut out = Vec::new();
    let typed = [
        (DType::F32, true),
        (DType::F16, true),
        (DType::F16, false),
        (DType::Bf16, false),
    ];
    for d_k in 1..=256 {
        let types: &[(DType, bool)] = if d_k <= 9 || [40, 64, 128, 255, 256].contains(&d_k) {
            &typed
        } else {
            &typed[..1]
        };
        for (d_v, &(dtype, native_f16)) in [d_k, 257 - d_k]
            .into_iter()
            .flat_map(|d| types.iter().map(move |t| (d, t)))
        {
            let shape = AttnShape {
                batch: 1,
                m: 1,
                n: 1,
                q_heads: 1,
                kv_heads: 1,
                d_k,
                d_v,
            };
            let causal = Attention::default().with_causal(Alignment::TopLeft);
            let spec = |a: Attention| a.masking().spec(&shape).unwrap();
            let mut mask_specs = vec![Default::default(), spec(causal.clone())];
            // The dropout variants, alone and with masks, where the dtypes vary too.
            if types.len() > 1 {
                let dropout = Attention::default().with_dropout(0.5, 1, 2);
                mask_specs.extend([spec(dropout), spec(causal.with_dropout(0.5, 1, 2))]);
            }
            for masks in mask_specs {
                for path in Path::ALL {
                    let req = Request {
                        shape,
                        scale: 1.0,
                        weights: false,
                        path: Some(path),
                        masks,
                        dtype,
                        out_dtype: dtype,
                        stats: Stats::ALL,
                        pool: Some(Pool {
                            max_side: 1,
                            op: if d_k % 2 == 0 {
                                PoolOp::Max
                            } else {
                                PoolOp::Mean
                            },
                        }),
                        fused: None,
                    };
                    let caps = caps_for(native_f16);
                    collect(&mut out, Plan::new(&req, &caps).unwrap().program());
                    // Every rows-per-invocation variant R of the flash kernel, with and
                    // without subgroup lanes.
                    if path != Path::ThreePass {
                        for config in FusedConfig::ALL {
                            let forced = req.clone().with_fused_config(config);
                            collect(&mut out, Plan::new(&forced, &caps).unwrap().program());
                        }
                    }
                }
                // The backward's kernels, gradients in the inputs' type: specialized by
                // head dims in vec4s, so every fourth d_k reaches each of them.
                if d_k % 4 != 1 && types.len() == 1 {
                    continue;
                }
                let req = Request {
                    masks,
                    dtype,
                    out_dtype: dtype,
                    ..Attention::default().request(shape).unwrap()
                };
                let caps = caps_for(native_f16);
                let plan = BackwardPlan::new(&req, (dtype, dtype), false, &caps).unwrap();
                collect(&mut out, plan.program());
            }
        }
    }
    // The matrix-unit kernel where its tiles fit the portable 16 KiB (head dims to 64; every
    // head dim in `matrix_unit_kernels`).
    for d in [1, 3, 8, 16, 40, 64] {
        out.extend(matrix_unit_kernels(d, 16 << 10));
    }
    let shape = AttnShape {
        batch: 1,
        m: 3,
        n: 5,
        q_heads: 2,
        kv_heads: 2,
        d_k: 4,
        d_v: 4,
    };
    collect(&mut out, &MergePlan::new(&shape, 2, &CAPS).unwrap().program);
    let biased = Attention::default().with_bias([1, 1, 3, 5], vec![0.5; 15]);
    let plan = BackwardPlan::new(
        &biased.request(shape).unwrap(),
        (DType::F32, DType::F32),
        true,
        &CAPS,
    )
    .unwrap();
    collect(&mut out, plan.program());
    let c = MhaConfig::new(8, 2);
    let req = Request {
        weights: true,
        path: Some(Path::ThreePass),
        ..Attention::default().request(c.attn_shape(1, 3, 5)).unwrap()
    };
    for (dtype, native_f16) in typed {
        for weights in [DType::F32, dtype] {
            let types = LayerTypes {
                input: dtype,
                weights,
                out: dtype,
            };
            let layer = layer_program(
                &c,
                &req,
                (false, NeedWeights::Averaged, [true; 4]),
                types,
                &caps_for(native_f16),
            )
            .unwrap();
            collect(&mut out, &layer.program);
        }
    }
    // Edge-list attention: every value-dim slot count, whole lists and chunks, every storage.
    for (dtype, native_f16) in typed {
        for d_v in [1, 64, 65, 129, 256] {
            out.extend(graph_kernels(dtype, native_f16, d_v));
        }
    }
    // linear's backward with inputs and weights of every type, with a bias.
    for (dtype, native_f16) in typed {
        for types in [(dtype, DType::F32), (DType::F32, dtype), (dtype, dtype)] {
            let mut program = xattn::program::Program::new();
            let mut input = |name| program.input(name, 64);
            let [x, w, dy] = [input("x"), input("w"), input("dy")];
            let [dx, dw, db] = ["dx", "dw", "db"].map(|name| program.output(name, 64));
            linear_backward(
                &mut program,
                (3, 5, 2),
                [x, w, dy, dx, dw, db],
                types,
                true,
                &caps_for(native_f16),
            )
            .unwrap();
            collect(&mut out, &program);
        }
    }
    // The sum of gradients (the GCA layer's backward).
    let mut program = xattn::program::Program::new();
    let (x, acc) = (program.input("x", 64), program.output("acc", 64));
    xattn::plan::add(&mut program, 16, [x, acc], &caps_for(true)).unwrap();
    collect(&mut out, &program);
    out
}

/// The kernels of edge-list attention plans at value head dim `d_v`: whole lists and forced
/// chunks (which add graph_merge), and the backward's.
fn graph_kernels(dtype: DType, native_f16: bool, d_v: usize) -> Vec<Kernel> {
    use xattn::cpu::graph_reference::GraphDims;
    use xattn::plan::graph::{GraphPlan, GraphRequest};
    let mut out = Vec::new();
    let (row_ptr, col_idx) = ([0u32, 2, 2, 5], [0u32, 3, 1, 1, 2]);
    for chunk_len in [None, Some(64)] {
        let req = GraphRequest {
            dims: GraphDims {
                m: 3,
                n: 4,
                heads: 2,
                kv_heads: 1,
                d_k: 5,
                d_v,
            },
            scale: 1.0,
            dtype,
            bias: true,
            edge_features: false,
            mean_heads: chunk_len.is_some(),
            stats: true,
            chunk_len,
        };
        let plan = GraphPlan::new(&req, (&row_ptr, &col_idx), &caps_for(native_f16)).unwrap();
        collect(&mut out, plan.program());
        // The backward: grad_rowdot (heads side by side), graph_grad_q and graph_grad_kv.
        let edge_ids = [4u32, 0, 3, 1, 2];
        let back = xattn::plan::graph_backward::GraphBackwardPlan::new(
            &req,
            (&row_ptr, &col_idx, &edge_ids),
            &caps_for(native_f16),
        )
        .unwrap();
        collect(&mut out, back.program());
    }
    out
}

/// A device with matrix units of both input types (16×16 with f16 inputs as on tensor cores,
/// 8×8 with f32 inputs as on Apple GPUs) and `max_workgroup_bytes` of workgroup memory.
fn matrix_caps(native_f16: bool, max_workgroup_bytes: u64) -> DeviceCaps {
    DeviceCaps {
        matrix_units: Some(MatrixUnits {
            f32_tile: Some(8),
            f16_tile: Some(16),
        }),
        max_workgroup_bytes,
        ..caps_for(native_f16)
    }
}

/// The matrix-unit kernels the planner makes for head dims `d` (d_k = d_v) on `matrix_caps`:
/// fused and split-K, unmasked and masked, f32 and f16 inputs (f16 tiles for native f16, f32
/// tiles for packed halves and f32).
fn matrix_unit_kernels(d: usize, max_workgroup_bytes: u64) -> Vec<Kernel> {
    let mut out = Vec::new();
    let shape = AttnShape {
        batch: 1,
        m: 1,
        n: 1,
        q_heads: 1,
        kv_heads: 1,
        d_k: d,
        d_v: d,
    };
    let causal = Attention::default().with_causal(Alignment::TopLeft);
    for (dtype, native_f16) in [
        (DType::F32, true),
        (DType::F16, true),
        (DType::F16, false),
        (DType::Bf16, false),
    ] {
        let caps = matrix_caps(native_f16, max_workgroup_bytes);
        for masks in [Default::default(), causal.masking().spec(&shape).unwrap()] {
            for path in [Path::Fused, Path::SplitK] {
                let req = Request {
                    shape,
                    scale: 1.0,
                    weights: false,
                    path: Some(path),
                    masks,
                    dtype,
                    out_dtype: DType::F32,
                    stats: Stats::default(),
                    pool: None,
                    fused: None,
                }
                .with_fused_config(FusedConfig::MATRIX_UNITS);
                let plan = Plan::new(&req, &caps).unwrap_or_else(|e| panic!("d {d} {dtype}: {e}"));
                collect(&mut out, plan.program());
            }
        }
    }
    out.retain(|k| matches!(k, Kernel::FlashCoop(_)));
    out
}

#[test]
fn matrix_unit_kernels_validate_and_write_spirv() {
    // Every head dim at 48 KiB of workgroup memory (NVIDIA's Vulkan limit).
    let kernels: Vec<Kernel> = (1..=256)
        .flat_map(|d| matrix_unit_kernels(d, 48 << 10))
        .collect();
    for tile_and_inputs in [(8, false), (16, true)] {
        assert!(
            kernels
                .iter()
                .any(|k| matches!(k, Kernel::FlashCoop(FlashCoop { tile, half_inputs, .. }) if (*tile, *half_inputs) == tile_and_inputs)),
            "no kernel with {tile_and_inputs:?}"
        );
    }
    let mut seen = std::collections::HashSet::new();
    for k in kernels {
        if !seen.insert(k) {
            continue;
        }
        assert!(k.workgroup_bytes() <= 48 << 10, "{}", k.label());
        let module = k.validate().unwrap_or_else(|e| panic!("{e}"));
        // What wgpu's Vulkan backend does with it: naga's SPIR-V writer.
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap();
        let options = naga::back::spv::Options {
            lang_version: (1, 3),
            ..Default::default()
        };
        let words = naga::back::spv::write_vec(&module, &info, &options, None)
            .unwrap_or_else(|e| panic!("{}: SPIR-V: {e}", k.label()));
        assert_eq!(words[0], 0x0723_0203, "{}: SPIR-V magic", k.label());
        // Q·Kᵀ and P·V each as OpCooperativeMatrixMulAddKHR (opcode 4459).
        let (mut at, mut mul_adds) = (5, 0);
        while at < words.len() {
            let (count, opcode) = (words[at] >> 16, words[at] & 0xffff);
            mul_adds += usize::from(opcode == 4459);
            at += count.max(1) as usize;
        }
        assert_eq!(mul_adds, 2, "{}: matrix multiply-adds in SPIR-V", k.label());
    }
}

#[test]
fn the_planners_use_every_kernel() {
    let kernels = all_kernels();
    for (name, _) in SHADER_FILES {
        assert!(
            kernels.iter().any(|k| k.name() == *name),
            "no plan dispatches {name}: the kernel tests would not reach it"
        );
    }
    // The dropout variants (src/dropout.rs), each lanes/broadcast/R variant of flash among them.
    for prefix in ["xattn.softmax_rows", "xattn.flash_dk"] {
        let dropout =
            |k: &&Kernel| k.label().starts_with(prefix) && k.label().ends_with("_dropout");
        assert!(
            kernels.iter().any(|k| dropout(&k)),
            "no plan dispatches a dropout variant of {prefix}"
        );
    }
    for part in ["_lanes", "_bcast", "_r4", "_masked"] {
        assert!(
            kernels
                .iter()
                .any(|k| k.label().contains(part) && k.label().ends_with("_dropout")),
            "no dropout variant of flash with {part}"
        );
    }
}

#[test]
fn every_specialization_validates() {
    let kernels = all_kernels();
    assert!(
        kernels.len() > 100,
        "expected many flash specializations, got {}",
        kernels.len()
    );
    for k in kernels {
        if let Err(e) = k.validate() {
            panic!("{e}");
        }
    }
}

#[test]
fn every_shader_file_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "wgsl") {
            let name = path.file_stem().unwrap().to_str().unwrap();
            let registered = SHADER_FILES.iter().find(|(n, _)| *n == name);
            let (_, src) = registered
                .unwrap_or_else(|| panic!("shaders/{name}.wgsl is not registered in SHADER_FILES"));
            assert_eq!(
                *src,
                std::fs::read_to_string(&path).unwrap(),
                "{name}: embedded source is stale"
            );
        }
    }
}

#[test]
fn bindings_match_the_registry() {
    for k in all_kernels() {
        let module = k.validate().unwrap();
        let mut found: Vec<(u32, Access)> = module
            .global_variables
            .iter()
            .filter_map(|(_, var)| {
                let binding = var.binding.as_ref()?;
                assert_eq!(binding.group, 0, "{}: only group 0 is used", k.label());
                let access = match var.space {
                    naga::AddressSpace::Uniform => Access::Uniform,
                    naga::AddressSpace::Storage { access }
                        if access.contains(naga::StorageAccess::STORE) =>
                    {
                        Access::ReadWrite
                    }
                    naga::AddressSpace::Storage { .. } => Access::Read,
                    other => panic!("{}: unexpected address space {other:?}", k.label()),
                };
                Some((binding.binding, access))
            })
            .collect();
        found.sort_by_key(|(b, _)| *b);
        let expected: Vec<(u32, Access)> = k
            .bindings()
            .iter()
            .enumerate()
            .map(|(i, a)| (i as u32, *a))
            .collect();
        assert_eq!(
            found,
            expected,
            "{}: shader bindings differ from the registry",
            k.label()
        );
    }
}

/// Size and offsets of the WGSL struct `name` in `kernel`'s module.
fn wgsl_layout(kernel: Kernel, name: &str) -> (usize, Vec<(String, usize)>) {
    let module = kernel.validate().unwrap();
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).unwrap();
    let (handle, ty) = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{} declares no {name}", kernel.label()));
    let naga::TypeInner::Struct { members, .. } = &ty.inner else {
        panic!("{name} is not a struct")
    };
    let offsets = members
        .iter()
        .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
        .collect();
    (layouter[handle].size as usize, offsets)
}

#[test]
fn linear_params_layout_matches_wgsl() {
    let f32s = Kernel::Linear(Linear {
        x: Storage::F32,
        w: Storage::F32,
    });
    let (size, members) = wgsl_layout(f32s, "LinearParams");
    assert_eq!(
        size,
        std::mem::size_of::<LinearParams>(),
        "LinearParams size"
    );
    let rust = [
        ("row_offset", std::mem::offset_of!(LinearParams, row_offset)),
        ("rows", std::mem::offset_of!(LinearParams, rows)),
        ("in_dim", std::mem::offset_of!(LinearParams, in_dim)),
        ("out_dim", std::mem::offset_of!(LinearParams, out_dim)),
        ("has_bias", std::mem::offset_of!(LinearParams, has_bias)),
    ];
    for (name, offset) in rust {
        let found = members.iter().find(|(n, _)| n == name);
        assert_eq!(found.map(|m| m.1), Some(offset), "offset of {name}");
    }
}

#[test]
fn linear_grad_params_layout_matches_wgsl() {
    let kernel = Kernel::LinearGrad(LinearGrad {
        src: Storage::PackedBf16,
    });
    let (size, members) = wgsl_layout(kernel, "LinearGradParams");
    assert_eq!(size, std::mem::size_of::<LinearGradParams>());
    let rust = [
        ("product", std::mem::offset_of!(LinearGradParams, product)),
        ("m_offset", std::mem::offset_of!(LinearGradParams, m_offset)),
        ("m", std::mem::offset_of!(LinearGradParams, m)),
        ("in_dim", std::mem::offset_of!(LinearGradParams, in_dim)),
        ("out_dim", std::mem::offset_of!(LinearGradParams, out_dim)),
        ("k_begin", std::mem::offset_of!(LinearGradParams, k_begin)),
        ("k_end", std::mem::offset_of!(LinearGradParams, k_end)),
        ("has_bias", std::mem::offset_of!(LinearGradParams, has_bias)),
    ];
    assert_eq!(members.len(), rust.len(), "every member is checked");
    for (name, offset) in rust {
        let found = members.iter().find(|(n, _)| n == name);
        assert_eq!(found.map(|m| m.1), Some(offset), "offset of {name}");
    }
}

#[test]
fn params_layout_matches_wgsl() {
    let qk = Kernel::QkScores(QkScores {
        masked: true,
        storage: Storage::F32,
    });
    let (size, members) = wgsl_layout(qk, "AttnParams");
    assert_eq!(size, std::mem::size_of::<AttnParams>(), "AttnParams size");
    let rust_offsets = [
        ("batch", std::mem::offset_of!(AttnParams, batch)),
        ("m", std::mem::offset_of!(AttnParams, m)),
        ("n", std::mem::offset_of!(AttnParams, n)),
        ("q_heads", std::mem::offset_of!(AttnParams, q_heads)),
        ("kv_heads", std::mem::offset_of!(AttnParams, kv_heads)),
        ("d_k", std::mem::offset_of!(AttnParams, d_k)),
        ("d_v", std::mem::offset_of!(AttnParams, d_v)),
        ("scale", std::mem::offset_of!(AttnParams, scale)),
        ("bh_offset", std::mem::offset_of!(AttnParams, bh_offset)),
        ("bh_count", std::mem::offset_of!(AttnParams, bh_count)),
        ("row_offset", std::mem::offset_of!(AttnParams, row_offset)),
        ("rows", std::mem::offset_of!(AttnParams, rows)),
        ("n_splits", std::mem::offset_of!(AttnParams, n_splits)),
        ("split_len", std::mem::offset_of!(AttnParams, split_len)),
        ("flags", std::mem::offset_of!(AttnParams, flags)),
        ("softcap", std::mem::offset_of!(AttnParams, softcap)),
        ("win_left", std::mem::offset_of!(AttnParams, win_left)),
        ("win_right", std::mem::offset_of!(AttnParams, win_right)),
        (
            "bottom_right",
            std::mem::offset_of!(AttnParams, bottom_right),
        ),
        ("n_segments", std::mem::offset_of!(AttnParams, n_segments)),
        ("mask_b", std::mem::offset_of!(AttnParams, mask_b)),
        ("mask_h", std::mem::offset_of!(AttnParams, mask_h)),
        ("mask_row", std::mem::offset_of!(AttnParams, mask_row)),
        ("bias_b", std::mem::offset_of!(AttnParams, bias_b)),
        ("bias_h", std::mem::offset_of!(AttnParams, bias_h)),
        ("bias_row", std::mem::offset_of!(AttnParams, bias_row)),
        ("key_begin", std::mem::offset_of!(AttnParams, key_begin)),
        ("key_end", std::mem::offset_of!(AttnParams, key_end)),
        ("block_rows", std::mem::offset_of!(AttnParams, block_rows)),
        ("block_cols", std::mem::offset_of!(AttnParams, block_cols)),
        ("grid_rows", std::mem::offset_of!(AttnParams, grid_rows)),
        ("grid_cols", std::mem::offset_of!(AttnParams, grid_cols)),
        ("drop_below", std::mem::offset_of!(AttnParams, drop_below)),
        ("keep_scale", std::mem::offset_of!(AttnParams, keep_scale)),
        ("seed", std::mem::offset_of!(AttnParams, seed)),
        ("offset", std::mem::offset_of!(AttnParams, offset)),
        ("diag_shift", std::mem::offset_of!(AttnParams, diag_shift)),
        ("_pad", std::mem::offset_of!(AttnParams, _pad)),
        ("seg_start", std::mem::offset_of!(AttnParams, seg_start)),
        ("seg_end", std::mem::offset_of!(AttnParams, seg_end)),
        ("seg_factor", std::mem::offset_of!(AttnParams, seg_factor)),
    ];
    assert_eq!(members.len(), rust_offsets.len(), "every member is checked");
    for (name, offset) in rust_offsets {
        let found = members.iter().find(|(n, _)| n == name);
        assert_eq!(found.map(|m| m.1), Some(offset), "offset of {name}");
    }
}

#[test]
fn workgroup_memory_fits_the_portable_limit() {
    for k in all_kernels() {
        assert!(
            k.workgroup_bytes() <= 16 << 10,
            "{} declares {} bytes",
            k.label(),
            k.workgroup_bytes()
        );
    }
}

#[test]
fn graph_params_layout_matches_wgsl() {
    use xattn::params::GraphParams;
    let (size, members) = wgsl_layout(
        Kernel::GraphMerge(xattn::kernels::graph_merge::GraphMerge),
        "GraphParams",
    );
    assert_eq!(size, std::mem::size_of::<GraphParams>(), "GraphParams size");
    let rust = [
        ("m", std::mem::offset_of!(GraphParams, m)),
        ("n", std::mem::offset_of!(GraphParams, n)),
        ("heads", std::mem::offset_of!(GraphParams, heads)),
        ("kv_heads", std::mem::offset_of!(GraphParams, kv_heads)),
        ("d_k", std::mem::offset_of!(GraphParams, d_k)),
        ("d_v", std::mem::offset_of!(GraphParams, d_v)),
        ("scale", std::mem::offset_of!(GraphParams, scale)),
        ("flags", std::mem::offset_of!(GraphParams, flags)),
        ("items", std::mem::offset_of!(GraphParams, items)),
        ("max_len", std::mem::offset_of!(GraphParams, max_len)),
        ("edges", std::mem::offset_of!(GraphParams, edges)),
        ("offset", std::mem::offset_of!(GraphParams, offset)),
    ];
    assert_eq!(members.len(), rust.len(), "every member is checked");
    for (name, offset) in rust {
        let found = members.iter().find(|(n, _)| n == name);
        assert_eq!(found.map(|m| m.1), Some(offset), "offset of {name}");
    }
}

#[test]
fn add_params_layout_matches_wgsl() {
    let (size, members) = wgsl_layout(Kernel::Add(xattn::kernels::add::Add), "AddParams");
    assert_eq!(size, std::mem::size_of::<xattn::params::AddParams>());
    let elems = members.iter().find(|(n, _)| n == "elems").map(|m| m.1);
    assert_eq!(
        elems,
        Some(std::mem::offset_of!(xattn::params::AddParams, elems))
    );
}

#[test]
fn pack_params_layout_matches_wgsl() {
    let (size, members) = wgsl_layout(Kernel::Pack(Pack { to: DType::F16 }), "PackParams");
    assert_eq!(size, std::mem::size_of::<xattn::params::PackParams>());
    let elems = members.iter().find(|(n, _)| n == "elems").map(|m| m.1);
    assert_eq!(
        elems,
        Some(std::mem::offset_of!(xattn::params::PackParams, elems))
    );
}
