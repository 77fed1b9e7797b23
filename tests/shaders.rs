//! Every WGSL file validated by naga (no GPU needed), registered, and bound as declared.

use xattn::gpu::kernels::{Access, Kernel, SHADER_FILES};
use xattn::params::{AttnParams, LinearParams};
use xattn::plan::{with_rows_per_invocation, DeviceCaps, Plan, Request, Step};
use xattn::{Alignment, Attention, AttnShape, Path};

const CAPS: DeviceCaps = DeviceCaps {
    max_binding: 128 << 20,
    max_buffer: 2 << 30,
    max_workgroups: 65535,
    max_workgroup_bytes: 16 << 10,
    uniform_align: 256,
    loop_cap: Some(xattn::plan::LLVMPIPE_LOOP_CAP),
};

/// Every kernel specialization the planner can produce for head dims 1..=256, unmasked and
/// masked, with every rows-per-invocation variant.
fn all_kernels() -> Vec<Kernel> {
    let mut out = vec![
        Kernel::QkScores { masked: false },
        Kernel::QkScores { masked: true },
        Kernel::SoftmaxRows,
        Kernel::WeightedSum,
        Kernel::MergePartials,
        Kernel::Linear,
        Kernel::MeanHeads,
    ];
    for d_k in 1..=256 {
        for d_v in [d_k, 257 - d_k] {
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
            for masks in [Default::default(), causal.masking().spec(&shape).unwrap()] {
                let req = Request {
                    shape,
                    scale: 1.0,
                    weights: false,
                    path: Some(Path::Fused),
                    masks,
                };
                // The planner's choice and every rows-per-invocation variant R.
                let plans = [1, 2, 4]
                    .map(|r| with_rows_per_invocation(r, || Plan::new(&req, &CAPS).unwrap()));
                for plan in std::iter::once(Plan::new(&req, &CAPS).unwrap()).chain(plans) {
                    for step in plan.steps {
                        if let Step::Dispatch(d) = step {
                            if !out.contains(&d.kernel) {
                                out.push(d.kernel);
                            }
                        }
                    }
                }
            }
        }
    }
    out
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
    for k in all_kernels().into_iter().take(6) {
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
    let (size, members) = wgsl_layout(Kernel::Linear, "LinearParams");
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
fn params_layout_matches_wgsl() {
    let (size, members) = wgsl_layout(Kernel::QkScores { masked: true }, "AttnParams");
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
        ("seg_start", std::mem::offset_of!(AttnParams, seg_start)),
        ("seg_end", std::mem::offset_of!(AttnParams, seg_end)),
        ("seg_factor", std::mem::offset_of!(AttnParams, seg_factor)),
    ];
    assert_eq!(
        members.len(),
        rust_offsets.len() + 2,
        "every member but the two pads is checked"
    );
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
