//! What several kernels share: `shaders/common/` and its include step, label suffixes, the
//! tiled GEMM's costs (`common/tile_gemm.wgsl`).

use crate::dtype::Storage;
use crate::kernels::{looped, LoopCost};

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
        "common/graph.wgsl",
        include_str!("../../shaders/common/graph.wgsl"),
    ),
    (
        "common/graph_logit.wgsl",
        include_str!("../../shaders/common/graph_logit.wgsl"),
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
/// BK loop of accumulate_tile; the 4×4 output loops run once.
pub(crate) fn gemm_cost() -> LoopCost {
    LoopCost {
        fixed: looped(0) + looped(4) + 4 * looped(4),
        per_step: 1 + looped(4) + looped(GEMM_BK),
        step: GEMM_BK,
    }
}

/// WGSL `fn {name}(c: u32) -> f32`: the sum over `u < n` of `dot({a}, {b})` written out,
/// `{u}` in the templates standing for u and `base` for `c·n` (so that private arrays are
/// indexed by constants only and can live in registers).
pub(crate) fn unrolled_dot(name: &str, n: u32, a: &str, b: &str) -> String {
    let terms: Vec<String> = (0..n)
        .map(|u| {
            let (a, b) = (
                a.replace("{u}", &u.to_string()),
                b.replace("{u}", &u.to_string()),
            );
            format!("dot({a}, {b})")
        })
        .collect();
    format!(
        "fn {name}(c: u32) -> f32 {{\n    let base = c * {n}u;\n    return {};\n}}\n",
        terms.join("\n        + ")
    )
}

/// WGSL `fn {name}(c: u32, g: f32)`: `{acc}[u] += g * {b}` for each `u < n`, written out
/// (`{u}` and `base = c·n` as in [`unrolled_dot`]).
pub(crate) fn unrolled_axpy(name: &str, n: u32, acc: &str, b: &str) -> String {
    let mut out = format!("fn {name}(c: u32, g: f32) {{\n    let base = c * {n}u;\n");
    for u in 0..n {
        let b = b.replace("{u}", &u.to_string());
        out.push_str(&format!("    {acc}[{u}] += g * {b};\n"));
    }
    out.push_str("}\n");
    out
}

/// WGSL `fn {name}(...)` loading `{arr}[u] = {load}` for each `u < n` (`{d}` standing for
/// `4u`), written out; `args` is the parameter list.
pub(crate) fn unrolled_load(name: &str, args: &str, n: u32, arr: &str, load: &str) -> String {
    let mut out = format!("fn {name}({args}) {{\n");
    for u in 0..n {
        let load = load.replace("{d}", &format!("{}u", 4 * u));
        out.push_str(&format!("    {arr}[{u}] = {load};\n"));
    }
    out.push_str("}\n");
    out
}

/// WGSL `fn {name}(base: u32)` storing the f32 sums `{acc}` (n vec4s) into the first `len`
/// elements of `{out}` from `base`, added to what is there under FLAG_ACCUMULATE, written out.
pub(crate) fn unrolled_store(name: &str, n: u32, acc: &str, out: &str, len: &str) -> String {
    let mut s =
        format!("fn {name}(base: u32) {{\n    let add = (p.flags & FLAG_ACCUMULATE) != 0u;\n");
    for e in 0..4 * n {
        let (u, t) = (e / 4, e % 4);
        s.push_str(&format!(
            "    if {e}u < {len} {{\n        var x = {acc}[{u}][{t}];\n        if add {{\n            x += {out}[base + {e}u];\n        }}\n        {out}[base + {e}u] = x;\n    }}\n"
        ));
    }
    s.push_str("}\n");
    s
}
