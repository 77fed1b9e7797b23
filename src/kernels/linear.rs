//! `linear`: `Y = X·Wᵀ + b`, tiled; the projections of a layer.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{gemm_cost, storage_suffix, GEMM_WORKGROUP_BYTES};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{Access, KernelSpec, LoopCost};
use crate::params::LinearParams;

/// The specialization of `linear`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Linear {
    /// How X is read.
    pub x: Storage,
    /// How W and b are read.
    pub w: Storage,
}

impl KernelSpec for Linear {
    type Params = LinearParams;
    const NAME: &'static str = "linear";
    const FILE: &'static str = include_str!("../../shaders/linear.wgsl");
    const LONG_LOOP: &'static str = "input features";

    fn bindings(&self) -> &'static [Access] {
        // x, w, b → y
        &[Uniform, Read, Read, Read, ReadWrite]
    }

    fn label(&self) -> String {
        format!(
            "xattn.linear{}{}",
            storage_suffix(self.x).replacen('_', "_x_", 1),
            storage_suffix(self.w).replacen('_', "_w_", 1)
        )
    }

    fn workgroup_bytes(&self) -> u64 {
        GEMM_WORKGROUP_BYTES
    }

    fn loop_cost(&self, p: &LinearParams) -> (LoopCost, u64) {
        (gemm_cost(), u64::from(p.in_dim))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.x, self.w]
    }

    fn prelude(&self) -> String {
        self.x.wgsl("XElem", &["x"], false) + &self.w.wgsl("WElem", &["w", "b"], false)
    }

    fn twin(&self, p: &LinearParams, buffers: &mut [Vec<u32>]) {
        cpu::linear::run(p, (self.x, self.w), buffers)
    }
}
