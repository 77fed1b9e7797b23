//! `softmax_rows`: the stable row softmax of S in place, with the LSE; the second pass of
//! three-pass attention.

use crate::cpu;
use crate::kernels::Access::{ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// Invocations of a `softmax_rows` workgroup (`WG` in the shader).
const WG: u64 = 128;

/// The specialization of `softmax_rows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SoftmaxRows {
    /// Whether the weights written are dropped out (common/dropout.wgsl) after the LSE is
    /// taken; without, the dropout code is compiled out.
    pub dropout: bool,
}

impl KernelSpec for SoftmaxRows {
    type Params = AttnParams;
    const NAME: &'static str = "softmax_rows";
    const FILE: &'static str = include_str!("../../shaders/softmax_rows.wgsl");
    const LONG_LOOP: &'static str = "keys per row";

    fn bindings(&self) -> &'static [Access] {
        // scores (in place), lse
        &[Uniform, ReadWrite, ReadWrite]
    }

    fn label(&self) -> String {
        let dropout = if self.dropout { "_dropout" } else { "" };
        format!("xattn.softmax_rows{dropout}")
    }

    fn workgroup_bytes(&self) -> u64 {
        WG * 4
    }

    /// Three strided key loops; two tree reductions of log2(WG) levels (dropout's Philox is
    /// straight-line).
    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let cost = LoopCost {
            fixed: 3 * looped(0) + 2 * looped(WG.ilog2().into()),
            per_step: 3,
            step: WG,
        };
        (cost, u64::from(p.n))
    }

    fn prelude(&self) -> String {
        format!("const DROPOUT: bool = {};\n", self.dropout)
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::softmax_rows::run(p, self.dropout, buffers)
    }
}
