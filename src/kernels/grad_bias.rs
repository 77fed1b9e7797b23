//! `grad_bias`: dBias of the backward reduced to the bias's own dims, one bias element per
//! invocation.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{any_masking, storage_suffix};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// The specialization of `grad_bias`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GradBias {
    /// How Q, K and V are read.
    pub storage: Storage,
}

impl KernelSpec for GradBias {
    type Params = AttnParams;
    const NAME: &'static str = "grad_bias";
    const FILE: &'static str = include_str!("../../shaders/grad_bias.wgsl");
    const LONG_LOOP: &'static str = "(batch, head, row) triples summed per pass";

    fn bindings(&self) -> &'static [Access] {
        // q, k, v, lens, mask, bias, lse, d_o, delta → dbias
        &[
            Uniform, Read, Read, Read, Read, Read, Read, Read, Read, Read, ReadWrite,
        ]
    }

    fn label(&self) -> String {
        format!("xattn.grad_bias{}", storage_suffix(self.storage))
    }

    /// Per term: the Q·K loop (4 dims a step), and the dO·V loop.
    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let per_term = 1 + looped(u64::from(p.d_k.div_ceil(4))) + looped(u64::from(p.d_v));
        let cost = LoopCost {
            fixed: looped(0),
            per_step: per_term,
            step: 1,
        };
        (cost, u64::from(p.key_end - p.key_begin))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        self.storage.wgsl("Elem", &["q", "k", "v"], false) + &any_masking(true)
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::grad_bias::run(p, self.storage, buffers)
    }
}
