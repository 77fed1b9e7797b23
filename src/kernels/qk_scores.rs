//! `qk_scores`: `S = scale·Q·Kᵀ`, tiled, masked; the first pass of three-pass attention.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{any_masking, gemm_cost, variant_suffix, GEMM_WORKGROUP_BYTES};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// The specialization of `qk_scores`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QkScores {
    /// Whether the call has any masking; without, the per-element mask code is compiled
    /// out (it cost 15% of three-pass time on llvmpipe).
    pub masked: bool,
    /// How Q and K are read.
    pub storage: Storage,
}

impl KernelSpec for QkScores {
    type Params = AttnParams;
    const NAME: &'static str = "qk_scores";
    const FILE: &'static str = include_str!("../../shaders/qk_scores.wgsl");
    const LONG_LOOP: &'static str = "head dims d_k";

    fn bindings(&self) -> &'static [Access] {
        // q, k, lens, mask, bias → scores
        &[Uniform, Read, Read, Read, Read, Read, ReadWrite]
    }

    fn label(&self) -> String {
        format!(
            "xattn.qk_scores{}",
            variant_suffix(self.storage, self.masked)
        )
    }

    fn workgroup_bytes(&self) -> u64 {
        GEMM_WORKGROUP_BYTES
    }

    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        (gemm_cost(), u64::from(p.d_k))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        self.storage.wgsl("Elem", &["q", "k"], false) + &any_masking(self.masked)
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::qk_scores::run(p, self.storage, buffers)
    }
}
