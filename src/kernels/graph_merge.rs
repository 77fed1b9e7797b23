//! `graph_merge`: the exact merge of each destination's chunks of `graph_attention` (split
//! neighbour lists), by their log-sum-exp.

use crate::cpu;
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::GraphParams;

/// The specialization of `graph_merge` (it has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphMerge;

impl KernelSpec for GraphMerge {
    type Params = GraphParams;
    const NAME: &'static str = "graph_merge";
    const FILE: &'static str = include_str!("../../shaders/graph_merge.wgsl");
    const LONG_LOOP: &'static str = "chunks of one destination";

    fn bindings(&self) -> &'static [Access] {
        // o_parts, stats, chunk_ptr → o, lse
        &[Uniform, Read, Read, Read, ReadWrite, ReadWrite]
    }

    /// Two loops over the destination's chunks.
    fn loop_cost(&self, p: &GraphParams) -> (LoopCost, u64) {
        let cost = LoopCost {
            fixed: 2 * looped(0),
            per_step: 2,
            step: 1,
        };
        (cost, u64::from(p.max_len))
    }

    fn twin(&self, p: &GraphParams, buffers: &mut [Vec<u32>]) {
        cpu::graph_merge::run(p, buffers)
    }
}
