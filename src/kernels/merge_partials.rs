//! `merge_partials`: the exact merge of partial (O, LSE) over disjoint key ranges (split-K's
//! splits, or shards).

use crate::cpu;
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// The specialization of `merge_partials`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MergePartials {
    /// Whether split-K's row entropy and focus are merged too.
    pub stats: bool,
}

impl KernelSpec for MergePartials {
    type Params = AttnParams;
    const NAME: &'static str = "merge_partials";
    const FILE: &'static str = include_str!("../../shaders/merge_partials.wgsl");
    const LONG_LOOP: &'static str = "splits";

    fn bindings(&self) -> &'static [Access] {
        if self.stats {
            // The row statistics' bindings come after the others (declared by the prelude).
            &[Uniform, Read, Read, ReadWrite, ReadWrite, Read, ReadWrite]
        } else {
            // partial o, partial stats → o, lse
            &[Uniform, Read, Read, ReadWrite, ReadWrite]
        }
    }

    fn label(&self) -> String {
        let stats = if self.stats { "_stats" } else { "" };
        format!("xattn.merge_partials{stats}")
    }

    /// Two loops over the splits, three with the row statistics.
    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let loops = if self.stats { 3 } else { 2 };
        let cost = LoopCost {
            fixed: loops * looped(0),
            per_step: loops,
            step: 1,
        };
        (cost, u64::from(p.n_splits))
    }

    fn prelude(&self) -> String {
        let mut out = format!("const ROW_STATS: bool = {};\n", self.stats);
        out.push_str(if self.stats {
            "@group(0) @binding(5) var<storage, read> row_parts: array<f32>;\n\
             @group(0) @binding(6) var<storage, read_write> row_out: array<f32>;\n\
             fn row_part(i: u32) -> f32 {\n    return row_parts[i];\n}\n\
             fn write_row_out(i: u32, j: u32, entropy: f32, focus: f32) {\n    \
             row_out[i] = entropy;\n    row_out[j] = focus;\n}\n"
        } else {
            "fn row_part(i: u32) -> f32 {\n    return 0.0;\n}\n\
             fn write_row_out(i: u32, j: u32, entropy: f32, focus: f32) {}\n"
        });
        out
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::merge_partials::run(p, buffers)
    }
}
