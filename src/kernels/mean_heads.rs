//! `mean_heads`: attention weights averaged over heads.

use crate::cpu;
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// The specialization of `mean_heads` (none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MeanHeads;

impl KernelSpec for MeanHeads {
    type Params = AttnParams;
    const NAME: &'static str = "mean_heads";
    const FILE: &'static str = include_str!("../../shaders/mean_heads.wgsl");
    const LONG_LOOP: &'static str = "heads";

    fn bindings(&self) -> &'static [Access] {
        // weights → mean
        &[Uniform, Read, ReadWrite]
    }

    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let cost = LoopCost {
            fixed: looped(0),
            per_step: 1,
            step: 1,
        };
        (cost, u64::from(p.q_heads))
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::mean_heads::run(p, buffers)
    }
}
