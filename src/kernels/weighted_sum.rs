//! `weighted_sum`: `O = P·V`, tiled; the last pass of three-pass attention.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{any_masking, gemm_cost, variant_suffix, GEMM_WORKGROUP_BYTES};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// The specialization of `weighted_sum`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightedSum {
    /// Whether the call has any masking: P then holds removed keys (weight 0), whose V must
    /// add nothing (not 0·∞); without, the plain product is compiled.
    pub masked: bool,
    /// How V is read.
    pub storage: Storage,
}

impl KernelSpec for WeightedSum {
    type Params = AttnParams;
    const NAME: &'static str = "weighted_sum";
    const FILE: &'static str = include_str!("../../shaders/weighted_sum.wgsl");
    const LONG_LOOP: &'static str = "keys";

    fn bindings(&self) -> &'static [Access] {
        // weights, v → o
        &[Uniform, Read, Read, ReadWrite]
    }

    fn label(&self) -> String {
        format!(
            "xattn.weighted_sum{}",
            variant_suffix(self.storage, self.masked)
        )
    }

    fn workgroup_bytes(&self) -> u64 {
        GEMM_WORKGROUP_BYTES
    }

    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        (gemm_cost(), u64::from(p.key_end - p.key_begin))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        self.storage.wgsl("Elem", &["v"], false) + &any_masking(self.masked)
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::weighted_sum::run(p, (self.storage, self.masked), buffers)
    }
}
