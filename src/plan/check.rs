//! The checks every program meets before it runs: bindings, grids and workgroup memory within
//! the device's limits, and every loop under its loop cap.

use crate::error::{Error, Result};
use crate::plan::device::DeviceCaps;
use crate::program::Program;
use crate::shape::F32;

/// Invocations per workgroup of merge_partials and mean_heads.
pub(super) const MERGE_WG: usize = 64;

pub(super) fn bytes(elems: usize) -> u64 {
    elems as u64 * F32
}

pub(super) fn limit_err(what: String, asked: u64, limit_name: &'static str, limit: u64) -> Error {
    Error::Limit {
        what,
        asked,
        limit_name,
        limit,
    }
}

pub(super) fn check_binding(what: &str, size: u64, caps: &DeviceCaps) -> Result<u64> {
    if size > caps.max_binding {
        return Err(limit_err(
            what.to_string(),
            size,
            "max_storage_buffer_binding_size",
            caps.max_binding,
        ));
    }
    Ok(size)
}

pub(super) fn check_grid(what: &str, count: usize, caps: &DeviceCaps) -> Result<u32> {
    if count > caps.max_workgroups as usize {
        return Err(limit_err(
            format!("{what} workgroups"),
            count as u64,
            "max_compute_workgroups_per_dimension",
            u64::from(caps.max_workgroups),
        ));
    }
    Ok(count as u32)
}

/// Rows per workgroup-memory tile of `floats` f32 each: the most of 64, 32, 16, 8, 4 that fit
/// the device's workgroup memory and the portable 16 KiB.
pub(super) fn tile_rows(what: &str, floats: u32, caps: &DeviceCaps) -> Result<u32> {
    let budget = caps.max_workgroup_bytes.min(16 << 10);
    [64u32, 32, 16, 8, 4]
        .into_iter()
        .find(|rows| u64::from(rows * floats) * F32 <= budget)
        .ok_or_else(|| {
            limit_err(
                format!("{what}: 4 rows × {floats} floats"),
                u64::from(4 * floats) * F32,
                "max_compute_workgroup_storage_size",
                caps.max_workgroup_bytes,
            )
        })
}

/// A grid of 64-invocation workgroups over `threads`, folded into y and z where x runs out
/// (merge_partials and mean_heads index `gid.x + (gid.y + gid.z·nwg.y)·nwg.x·64`).
pub(super) fn fold_grid(what: &str, threads: usize, caps: &DeviceCaps) -> Result<[u32; 3]> {
    let most = caps.max_workgroups as usize;
    let groups = threads.div_ceil(MERGE_WG);
    let x = groups.min(most);
    let y = groups.div_ceil(x).min(most);
    let z = check_grid(what, groups.div_ceil(x * y), caps)?;
    Ok([x as u32, y as u32, z])
}

/// Refuses programs with a dispatch whose loops the device would cut short (see
/// [`DeviceCaps::loop_cap`]). The planner splits what it can before this; what reaches here
/// has no split. Every program the engine binds passes through here.
pub fn check_loops(program: &Program, caps: &DeviceCaps) -> Result<()> {
    let Some(cap) = caps.loop_cap else {
        return Ok(());
    };
    for d in program.dispatches() {
        let (cost, len) = d.kernel.loop_cost(&d.params);
        let most = caps.loop_len(&cost);
        if len > most {
            return Err(limit_err(
                format!(
                    "{} over {len} {} (at most {most} fit one dispatch on this device)",
                    d.kernel.name(),
                    d.kernel.long_loop(),
                ),
                cost.trips(len),
                "loop iterations per invocation (Mesa llvmpipe ends loops past it)",
                cap,
            ));
        }
    }
    Ok(())
}
