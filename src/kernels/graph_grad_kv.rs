//! `graph_grad_kv`: the backward of edge-list attention by source, one workgroup per (source,
//! K/V head): dK and dV over the source's out-edges from the P and dS `graph_grad_q` wrote.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::storage_suffix;
use crate::kernels::graph_attention::GRAPH_WG;
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::GraphParams;

/// The specialization of `graph_grad_kv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphGradKv {
    /// How Q is read.
    pub storage: Storage,
    /// Head dims per invocation, ⌈max(d_k, d_v) / 64⌉ (1..=4).
    pub slots: u32,
}

impl KernelSpec for GraphGradKv {
    type Params = GraphParams;
    const NAME: &'static str = "graph_grad_kv";
    const FILE: &'static str = include_str!("../../shaders/graph_grad_kv.wgsl");
    const LONG_LOOP: &'static str = "out-edges of one source × query heads of its K/V head";

    fn bindings(&self) -> &'static [Access] {
        // q, d_o, src_ptr, out_edges, p_edge, ds_edge → dk, dv
        &[
            Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite,
        ]
    }

    fn label(&self) -> String {
        format!(
            "xattn.graph_grad_kv_s{}{}",
            self.slots,
            storage_suffix(self.storage)
        )
    }

    fn workgroup_bytes(&self) -> u64 {
        // sh_p, sh_ds, sh_i
        3 * u64::from(GRAPH_WG) * 4
    }

    /// Per tile of 64 out-edges of one query head: the tile loop's test and the loop over the
    /// tile's edges with the slots loop in each. Fixed: the slots loops before and after, the
    /// heads loop and each head's tile-loop exit. The long loop runs over `max_len` out-edges
    /// (a whole list, or a chunk of one per pass), rounded up to whole tiles, once per query
    /// head of the group.
    fn loop_cost(&self, p: &GraphParams) -> (LoopCost, u64) {
        let tile = u64::from(GRAPH_WG);
        let slots = u64::from(self.slots);
        let group = u64::from(p.heads / p.kv_heads.max(1));
        let cost = LoopCost {
            fixed: 2 * looped(slots) + looped(group) + group,
            per_step: 1 + looped(tile) + tile * looped(slots),
            step: tile,
        };
        (cost, group * u64::from(p.max_len).div_ceil(tile) * tile)
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        let mut out = self.storage.wgsl("Elem", &["q"], false);
        out.push_str(&Storage::F32.wgsl("Grad", &["d_o"], false));
        out.push_str(&format!("const SLOTS: u32 = {}u;\n", self.slots));
        out
    }

    fn twin(&self, p: &GraphParams, buffers: &mut [Vec<u32>]) {
        cpu::graph_grad_kv::run(p, *self, buffers)
    }
}
