//! `graph_stats`: entropy and focus per destination, or coverage per source, of an edge-list
//! attention's weights, one workgroup per (segment, head).

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::storage_suffix;
use crate::kernels::graph_attention::GRAPH_WG;
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::GraphParams;

/// The specialization of `graph_stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphStats {
    /// How Q and K are read.
    pub storage: Storage,
    /// Whether segments are sources' out-edges (coverage) rather than destinations'
    /// in-edges (entropy and focus).
    pub by_source: bool,
}

impl KernelSpec for GraphStats {
    type Params = GraphParams;
    const NAME: &'static str = "graph_stats";
    const FILE: &'static str = include_str!("../../shaders/graph_stats.wgsl");
    const LONG_LOOP: &'static str = "edges of one node";

    fn bindings(&self) -> &'static [Access] {
        // q, k, col_idx, dst, perm, ptr, bias, edge_attr, lse → out_a, out_b
        &[
            Uniform, Read, Read, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite,
        ]
    }

    fn label(&self) -> String {
        let by = if self.by_source { "_by_source" } else { "" };
        format!("xattn.graph_stats{by}{}", storage_suffix(self.storage))
    }

    fn workgroup_bytes(&self) -> u64 {
        // sh_a, sh_b
        2 * u64::from(GRAPH_WG) * 4
    }

    /// Per step of 64 edges (one per lane): the edge loop's test and the d_k loop in vec4
    /// steps, exit test included; the tree over the lanes (6 levels) once.
    fn loop_cost(&self, p: &GraphParams) -> (LoopCost, u64) {
        let cost = LoopCost {
            fixed: looped(GRAPH_WG.ilog2().into()),
            per_step: 1 + looped(u64::from(p.d_k).div_ceil(4)),
            step: u64::from(GRAPH_WG),
        };
        (cost, u64::from(p.max_len))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        let mut out = self.storage.wgsl("Elem", &["q", "k"], false);
        out.push_str(&Storage::F32.wgsl("Feature", &["edge_attr"], false));
        out.push_str(&format!("const BY_SOURCE: bool = {};\n", self.by_source));
        out
    }

    fn twin(&self, p: &GraphParams, buffers: &mut [Vec<u32>]) {
        cpu::graph_stats::run(p, *self, buffers)
    }
}
