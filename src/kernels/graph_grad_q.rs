//! `graph_grad_q`: the backward of edge-list attention by destination, one workgroup per
//! (destination, head): dQ, and per edge and head P and dS (d bias) and, with edge features,
//! their gradient; or, as its delta pass, D = Σ P·dP alone (heads averaged).

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::storage_suffix;
use crate::kernels::graph_attention::GRAPH_WG;
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::GraphParams;

/// The specialization of `graph_grad_q`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphGradQ {
    /// How Q, K and V are read.
    pub storage: Storage,
    /// Head dims per invocation, ⌈max(d_k, d_v) / 64⌉ (1..=4).
    pub slots: u32,
    /// Whether this is the delta pass: D = Σ P·dP per destination and head into `delta`,
    /// nothing else written (heads averaged, where no per-head O exists for grad_rowdot).
    pub delta_pass: bool,
}

impl KernelSpec for GraphGradQ {
    type Params = GraphParams;
    const NAME: &'static str = "graph_grad_q";
    const FILE: &'static str = include_str!("../../shaders/graph_grad_q.wgsl");
    const LONG_LOOP: &'static str = "in-edges of one destination";

    fn bindings(&self) -> &'static [Access] {
        // q, k, v, row_ptr, col_idx, edge_id, bias, edge_attr, lse, d_o
        //   → delta (written by the delta pass only), dq, p_edge, ds_edge, d_edge_attr
        &[
            Uniform, Read, Read, Read, Read, Read, Read, Read, Read, Read, Read, ReadWrite,
            ReadWrite, ReadWrite, ReadWrite, ReadWrite,
        ]
    }

    fn label(&self) -> String {
        let pass = if self.delta_pass { "_delta" } else { "" };
        format!(
            "xattn.graph_grad_q_s{}{pass}{}",
            self.slots,
            storage_suffix(self.storage)
        )
    }

    fn workgroup_bytes(&self) -> u64 {
        // sh_p, sh_ds, sh_j
        3 * u64::from(GRAPH_WG) * 4
    }

    /// Per tile of 64 edges: the tile loop's test, one edge's logit (d_k in vec4 steps) and
    /// dP (d_v in vec4 steps), the loop over the tile's edges with the slots loop in each;
    /// the delta pass per 64 edges: its loop's test, a logit and a dP. Fixed: the slots loops
    /// before and after, the tree over the lanes (6 levels), an exit test. The long loop runs
    /// over `max_len` edges (a whole list, or a chunk of one per pass).
    fn loop_cost(&self, p: &GraphParams) -> (LoopCost, u64) {
        let tile = u64::from(GRAPH_WG);
        let slots = u64::from(self.slots);
        let (dk4, dv4) = (u64::from(p.d_k).div_ceil(4), u64::from(p.d_v).div_ceil(4));
        let edge = looped(dk4) + looped(dv4);
        let per_step = if self.delta_pass {
            1 + edge
        } else {
            1 + edge + looped(tile) + tile * looped(slots)
        };
        let cost = LoopCost {
            fixed: 2 * looped(slots) + looped(GRAPH_WG.ilog2().into()) + 1,
            per_step,
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
        out.push_str(&Storage::F32.wgsl("Grad", &["d_o"], false));
        out.push_str(&format!(
            "const SLOTS: u32 = {}u;\nconst DELTA_PASS: bool = {};\n",
            self.slots, self.delta_pass
        ));
        out
    }

    fn twin(&self, p: &GraphParams, buffers: &mut [Vec<u32>]) {
        cpu::graph_grad_q::run(p, *self, buffers)
    }
}
