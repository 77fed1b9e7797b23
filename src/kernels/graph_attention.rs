//! `graph_attention`: attention over a graph's edge list, one workgroup per (destination or
//! chunk of its neighbour list, head), an online softmax over tiles of 64 edges.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::storage_suffix;
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::GraphParams;

/// Invocations of a `graph_attention` workgroup, and edges per tile (`WG` in the shader).
pub const GRAPH_WG: u32 = 64;

/// Most value dims one invocation accumulates (`SLOTS`): head dims up to 4·64 = 256.
pub const GRAPH_MAX_SLOTS: u32 = 4;

/// The specialization of `graph_attention`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphAttention {
    /// How Q, K and V are read.
    pub storage: Storage,
    /// Value dims per invocation, ⌈d_v / 64⌉ (1..=4).
    pub slots: u32,
    /// Whether work items are chunks of neighbour lists (partial O and statistics for
    /// `graph_merge`) rather than whole lists (the final O and LSE).
    pub split: bool,
}

impl KernelSpec for GraphAttention {
    type Params = GraphParams;
    const NAME: &'static str = "graph_attention";
    const FILE: &'static str = include_str!("../../shaders/graph_attention.wgsl");
    const LONG_LOOP: &'static str = "edges of one work item";

    fn bindings(&self) -> &'static [Access] {
        // q, k, v, row_ptr, col_idx, chunks, bias, edge_attr → o, lse
        &[
            Uniform, Read, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite,
        ]
    }

    fn label(&self) -> String {
        let split = if self.split { "_split" } else { "" };
        format!(
            "xattn.graph_attention_s{}{split}{}",
            self.slots,
            storage_suffix(self.storage)
        )
    }

    fn workgroup_bytes(&self) -> u64 {
        // sh_s, sh_w, sh_j
        3 * u64::from(GRAPH_WG) * 4
    }

    /// Per tile of 64 edges: the tile loop's test, the d_k loop in vec4 steps, the max loop and
    /// the accumulate loop (64 edges each, exit tests included); the value-dim slots are
    /// written out.
    fn loop_cost(&self, p: &GraphParams) -> (LoopCost, u64) {
        let tile = u64::from(GRAPH_WG);
        let cost = LoopCost {
            fixed: looped(0),
            per_step: 1 + looped(u64::from(p.d_k).div_ceil(4)) + 2 * looped(tile),
            step: tile,
        };
        (cost, u64::from(p.max_len))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        let mut out = self.storage.wgsl("Elem", &["q", "k", "v"], false);
        out.push_str(&Storage::F32.wgsl("Feature", &["edge_attr"], false));
        out.push_str(&format!(
            "const SLOTS: u32 = {}u;\nconst SPLIT: bool = {};\n\
             var<private> acc: array<f32, {}>;\n",
            self.slots, self.split, self.slots
        ));
        let each = |body: &dyn Fn(u32) -> String| -> String {
            (0..self.slots).map(body).collect::<String>()
        };
        out.push_str(&format!(
            "fn zero_acc() {{\n{}}}\n",
            each(&|u| format!("    acc[{u}] = 0.0;\n"))
        ));
        out.push_str(&format!(
            "fn rescale_acc(a: f32) {{\n{}}}\n",
            each(&|u| format!("    acc[{u}] *= a;\n"))
        ));
        let wg = GRAPH_WG;
        out.push_str(&format!(
            "fn accumulate_edge(w: f32, row: u32, frow: u32, li: u32) {{\n{}}}\n",
            each(&|u| format!(
                "    if li + {d}u < g.d_v {{\n        acc[{u}] = fma(w, value_at(row, frow, li + {d}u), acc[{u}]);\n    }}\n",
                d = u * wg
            ))
        ));
        out.push_str(&format!(
            "fn store_acc(row: u32, li: u32, inv: f32) {{\n{}}}\n",
            each(&|u| format!(
                "    if li + {d}u < g.d_v {{\n        o[row + li + {d}u] = acc[{u}] * inv;\n    }}\n",
                d = u * wg
            ))
        ));
        out
    }

    fn twin(&self, p: &GraphParams, buffers: &mut [Vec<u32>]) {
        cpu::graph_attention::run(p, *self, buffers)
    }
}
