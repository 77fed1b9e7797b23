//! `linear_grad`: the backward of `linear`, `dX = dY·W` and `dW = dYᵀ·X` (with `db = Σ dY`),
//! tiled, one product per dispatch (see [`LinearGradParams`]).

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{gemm_cost, storage_suffix, GEMM_WORKGROUP_BYTES};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::LinearGradParams;

/// The specialization of `linear_grad`: how its B operand is read (W for the input gradient,
/// X for the weight gradient). The product is a param, so f32 layers need one pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearGrad {
    /// How B (W or X) is read.
    pub src: Storage,
}

impl KernelSpec for LinearGrad {
    type Params = LinearGradParams;
    const NAME: &'static str = "linear_grad";
    const FILE: &'static str = include_str!("../../shaders/linear_grad.wgsl");
    const LONG_LOOP: &'static str = "reduction terms (output features or rows)";

    fn bindings(&self) -> &'static [Access] {
        // dy, src (W or X) → grad (dX or dW), db
        &[Uniform, Read, Read, ReadWrite, ReadWrite]
    }

    fn label(&self) -> String {
        format!("xattn.linear_grad{}", storage_suffix(self.src))
    }

    fn workgroup_bytes(&self) -> u64 {
        GEMM_WORKGROUP_BYTES
    }

    /// The tiled GEMM's step; fixed: the k loop's exit test, the loop reading what earlier
    /// ranges wrote and the output loop (4 rows each, the 4 columns written out).
    fn loop_cost(&self, p: &LinearGradParams) -> (LoopCost, u64) {
        let cost = LoopCost {
            fixed: looped(0) + 2 * looped(4),
            ..gemm_cost()
        };
        (cost, u64::from(p.k_end.saturating_sub(p.k_begin)))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.src]
    }

    fn prelude(&self) -> String {
        self.src.wgsl("Elem", &["src"], false)
    }

    fn twin(&self, p: &LinearGradParams, buffers: &mut [Vec<u32>]) {
        cpu::linear_grad::run(p, self.src, buffers)
    }
}
