//! `pack`: f32 values packed into f16 or bf16 pairs (half-precision outputs).

use crate::cpu;
use crate::dtype::DType;
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{Access, KernelSpec, LoopCost};
use crate::params::PackParams;

/// The specialization of `pack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pack {
    /// `DType::F16` or `DType::Bf16`.
    pub to: DType,
}

impl KernelSpec for Pack {
    type Params = PackParams;
    const NAME: &'static str = "pack";
    const FILE: &'static str = include_str!("../../shaders/pack.wgsl");
    const LONG_LOOP: &'static str = "(none)";

    fn bindings(&self) -> &'static [Access] {
        // f32 values → packed words
        &[Uniform, Read, ReadWrite]
    }

    fn label(&self) -> String {
        format!("xattn.pack_{}", self.to)
    }

    /// One word per invocation, no loop.
    fn loop_cost(&self, _: &PackParams) -> (LoopCost, u64) {
        (LoopCost::NONE, 0)
    }

    fn prelude(&self) -> String {
        format!("const TO_BF16: bool = {};\n", self.to == DType::Bf16)
    }

    fn twin(&self, p: &PackParams, buffers: &mut [Vec<u32>]) {
        cpu::pack::run(p, self.to, buffers)
    }
}
