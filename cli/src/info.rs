//! `xattn info`: what wgpu can see, so a slow or failing run can be traced to the adapter,
//! its driver, or a limit the planner had to work around.

use std::process::ExitCode;

use clap::Args;
use xattn::device::{adapters, describe_info};
use xattn::Context;

use crate::CliResult;

/// Options of `xattn info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Also list every feature each adapter exposes, not just the ones xattn cares about.
    #[arg(long)]
    all_features: bool,
}

/// Features worth knowing about for attention kernels: timestamps make `bench` time the GPU
/// itself; f16 and subgroups are what faster kernels would need.
const KEY_FEATURES: [(&str, wgpu::Features); 6] = [
    ("TIMESTAMP_QUERY", wgpu::Features::TIMESTAMP_QUERY),
    (
        "TIMESTAMP_QUERY_INSIDE_PASSES",
        wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
    ),
    ("SHADER_F16", wgpu::Features::SHADER_F16),
    ("SUBGROUP", wgpu::Features::SUBGROUP),
    (
        "SHADER_FLOAT32_ATOMIC",
        wgpu::Features::SHADER_FLOAT32_ATOMIC,
    ),
    (
        "EXPERIMENTAL_COOPERATIVE_MATRIX",
        wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
    ),
];

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn print_adapter(index: usize, adapter: &wgpu::Adapter, all_features: bool) {
    let info = adapter.get_info();
    let l = adapter.limits();
    let f = adapter.features();
    println!("[{index}] {}", info.name);
    println!(
        "    backend: {:?}   device type: {:?}",
        info.backend, info.device_type
    );
    let driver: Vec<&str> = [info.driver.as_str(), info.driver_info.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    println!("    driver: {}", driver.join(" "));
    println!(
        "    vendor: {:#06x}   device: {:#06x}   subgroup size: {}..{}",
        info.vendor, info.device, info.subgroup_min_size, info.subgroup_max_size
    );
    println!("    limits:");
    let limits: [(&str, u64); 6] = [
        (
            "max_storage_buffer_binding_size",
            l.max_storage_buffer_binding_size,
        ),
        ("max_buffer_size", l.max_buffer_size),
        (
            "max_compute_workgroups_per_dimension",
            l.max_compute_workgroups_per_dimension.into(),
        ),
        (
            "max_compute_workgroup_storage_size",
            l.max_compute_workgroup_storage_size.into(),
        ),
        (
            "max_compute_invocations_per_workgroup",
            l.max_compute_invocations_per_workgroup.into(),
        ),
        (
            "max_storage_buffers_per_shader_stage",
            l.max_storage_buffers_per_shader_stage.into(),
        ),
    ];
    for (name, value) in limits {
        let human = if name.ends_with("_size") {
            format!(" ({})", xattn::shape::human_bytes(value))
        } else {
            String::new()
        };
        println!("      {name:<40} {value}{human}");
    }
    println!("    features:");
    for (name, flag) in KEY_FEATURES {
        println!("      {name:<40} {}", yes_no(f.contains(flag)));
    }
    if f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        println!("    matrix units (cooperative_matrix_properties: M×N×K, A/B → C):");
        for c in adapter.cooperative_matrix_properties() {
            println!(
                "      {}×{}×{} {:?} → {:?}{}",
                c.m_size,
                c.n_size,
                c.k_size,
                c.ab_type,
                c.cr_type,
                if c.saturating_accumulation {
                    " (saturating)"
                } else {
                    ""
                }
            );
        }
    }
    if all_features {
        let names: Vec<&str> = f.iter_names().map(|(name, _)| name).collect();
        println!("      all ({}): {}", names.len(), names.join(" "));
    }
}

/// Lists every adapter, then opens the default one the way `run` and `bench` do.
pub fn info(args: &InfoArgs) -> CliResult<ExitCode> {
    if let Ok(b) = std::env::var("WGPU_BACKEND") {
        println!("WGPU_BACKEND={b}");
    }
    if let Ok(name) = std::env::var("WGPU_ADAPTER_NAME") {
        println!("WGPU_ADAPTER_NAME={name}");
    }
    let list = adapters();
    println!("{} adapter(s):", list.len());
    for (i, adapter) in list.iter().enumerate() {
        print_adapter(i, adapter, args.all_features);
    }
    // Opening the default device is the real test: it is what `run` and `bench` do.
    let ctx = Context::new()?;
    let index = list.iter().position(|a| a.get_info() == ctx.info);
    let which = index.map(|i| format!("[{i}] ")).unwrap_or_default();
    println!(
        "default (Context::new): {which}{}",
        describe_info(&ctx.info)
    );
    println!(
        "  matrix units: {}",
        match ctx.caps().matrix_units {
            Some(units) => format!(
                "f32 inputs: {}, f16 inputs: {} (flash_coop, forced by --fused-config \
                 matrix-units)",
                units
                    .f32_tile
                    .map_or("none".into(), |t| format!("{t}×{t} tiles")),
                units
                    .f16_tile
                    .map_or("none".into(), |t| format!("{t}×{t} tiles")),
            ),
            None if xattn::settings::matrix_units() => {
                "none fitting (square 8 or 16 tiles with f32 accumulators)".into()
            }
            None =>
                "not enabled (XATTN_MATRIX_UNITS=1 enables them where the adapter has them)".into(),
        }
    );
    println!(
        "  bench timing: {}",
        if ctx.has_timestamps() {
            "GPU timestamps"
        } else {
            "wall clock (no TIMESTAMP_QUERY)"
        }
    );
    let lacks = ctx.degradations();
    if lacks.is_empty() {
        println!("  features xattn uses: all (subgroups, f16 in shaders, timestamps)");
    }
    for lack in lacks {
        println!("  {lack}");
    }
    Ok(ExitCode::SUCCESS)
}
