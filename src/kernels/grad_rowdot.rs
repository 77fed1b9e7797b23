//! `grad_rowdot`: the backward's first pass, D = rowsum(dO ∘ O) and dO in f32.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::storage_suffix;
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// The specialization of `grad_rowdot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GradRowdot {
    /// How O and dO are read.
    pub storage: Storage,
}

impl KernelSpec for GradRowdot {
    type Params = AttnParams;
    const NAME: &'static str = "grad_rowdot";
    const FILE: &'static str = include_str!("../../shaders/grad_rowdot.wgsl");
    const LONG_LOOP: &'static str = "value head dims d_v";

    fn bindings(&self) -> &'static [Access] {
        // o, d_o → delta, d_o32
        &[Uniform, Read, Read, ReadWrite, ReadWrite]
    }

    fn label(&self) -> String {
        format!("xattn.grad_rowdot{}", storage_suffix(self.storage))
    }

    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let cost = LoopCost {
            fixed: looped(0),
            per_step: 1,
            step: 1,
        };
        (cost, u64::from(p.d_v))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        self.storage.wgsl("Elem", &["o", "d_o"], false)
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::grad_rowdot::run(p, self.storage, buffers)
    }
}
