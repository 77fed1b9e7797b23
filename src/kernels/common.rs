//! What several kernels share: `shaders/common/` and its include step, label suffixes, the
//! tiled GEMM's costs (`common/tile_gemm.wgsl`) and the segment lookup (`common/mask.wgsl`).

use crate::dtype::Storage;
use crate::kernels::{looped, LoopCost};
use crate::params::{flags, AttnParams};

/// Shared WGSL pulled in by `//!include <path>` lines.
const COMMON_FILES: &[(&str, &str)] = &[
    (
        "common/params.wgsl",
        include_str!("../../shaders/common/params.wgsl"),
    ),
    (
        "common/dropout.wgsl",
        include_str!("../../shaders/common/dropout.wgsl"),
    ),
    (
        "common/grad.wgsl",
        include_str!("../../shaders/common/grad.wgsl"),
    ),
    (
        "common/mask.wgsl",
        include_str!("../../shaders/common/mask.wgsl"),
    ),
    (
        "common/sums.wgsl",
        include_str!("../../shaders/common/sums.wgsl"),
    ),
    (
        "common/tile_gemm.wgsl",
        include_str!("../../shaders/common/tile_gemm.wgsl"),
    ),
];

/// Replaces each `//!include <path>` line with the named common file.
pub fn resolve_includes(file: &str) -> String {
    let mut out = String::with_capacity(file.len() + 2048);
    for line in file.lines() {
        match line.trim().strip_prefix("//!include ") {
            Some(path) => {
                let (_, src) = COMMON_FILES
                    .iter()
                    .find(|(p, _)| *p == path.trim())
                    .expect("include names a file listed in COMMON_FILES");
                out.push_str(src);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The storage suffix, then `_masked` for kernels specialized for masking.
pub(crate) fn variant_suffix(storage: Storage, masked: bool) -> String {
    let masked = if masked { "_masked" } else { "" };
    format!("{}{masked}", storage_suffix(storage))
}

/// `_<storage>` for half storage, nothing for f32 (labels of f32 kernels are unchanged).
pub(crate) fn storage_suffix(storage: Storage) -> String {
    match storage {
        Storage::F32 => String::new(),
        other => format!("_{}", other.name().replace('-', "_")),
    }
}

/// `const ANY_MASKING: bool = …;`: whether the call has any masking; without, the
/// per-element mask code is compiled out.
pub(crate) fn any_masking(masked: bool) -> String {
    format!("const ANY_MASKING: bool = {masked};\n")
}

/// Workgroup memory of the tiled GEMM kernels: two 1024-element operand tiles.
pub(crate) const GEMM_WORKGROUP_BYTES: u64 = 2 * 1024 * 4;

/// Depth of one operand slice of the tiled GEMM kernels (`BK` in common/tile_gemm.wgsl).
const GEMM_BK: u64 = 16;

/// The tiled GEMM step: its loop, the staging loop (1024 elements / 256 invocations) and the
/// BK loop of accumulate_tile. The 4×4 output loops and, where the logit is shaped per
/// element, the segment lookup (`segments` iterations each) run once.
pub(crate) fn gemm_cost(segments: u64) -> LoopCost {
    LoopCost {
        fixed: looped(0) + looped(4) + 4 * looped(4) + 16 * segments,
        per_step: 1 + looped(4) + looped(GEMM_BK),
        step: GEMM_BK,
    }
}

/// Iterations of one segment lookup (`segment_factor` in common/mask.wgsl) under `p`, 0
/// where the logits have no segments.
pub(crate) fn segment_lookup(p: &AttnParams) -> u64 {
    if p.flags & flags::SEGMENTS != 0 {
        looped(u64::from(p.n_segments))
    } else {
        0
    }
}
