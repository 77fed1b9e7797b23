//! `key_coverage`: each key's coverage Σ_i P_ij, P rebuilt from Q, K and the LSE; Q tiles in
//! workgroup memory, one key per invocation.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{any_masking, variant_suffix};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// The specialization of `key_coverage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyCoverage {
    /// Head dim of Q/K, rounded up to a multiple of 4.
    pub dk: u32,
    /// Query rows per tile in workgroup memory.
    pub bq: u32,
    /// Whether the call has any masking (as `qk_scores`).
    pub masked: bool,
    /// How Q and K are read.
    pub storage: Storage,
}

impl KernelSpec for KeyCoverage {
    type Params = AttnParams;
    const NAME: &'static str = "key_coverage";
    const FILE: &'static str = include_str!("../../shaders/key_coverage.wgsl");
    const LONG_LOOP: &'static str = "query rows per pass";

    fn bindings(&self) -> &'static [Access] {
        // q, k, lens, mask, bias, lse → coverage
        &[Uniform, Read, Read, Read, Read, Read, Read, ReadWrite]
    }

    fn label(&self) -> String {
        let variant = variant_suffix(self.storage, self.masked);
        format!("xattn.key_coverage_dk{}_bq{}{variant}", self.dk, self.bq)
    }

    fn workgroup_bytes(&self) -> u64 {
        u64::from(self.bq * (self.dk + 1)) * 4
    }

    /// The K row load (per vec4); per tile of bq rows: the tile loop, the staging loop and
    /// the row loop, and per row the vec4 dot-product loop.
    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let (dk4, bq) = (u64::from(self.dk / 4), u64::from(self.bq));
        let staged = (bq * dk4).div_ceil(64);
        let cost = LoopCost {
            fixed: looped(dk4) + looped(0),
            per_step: 1 + looped(staged) + looped(bq) + bq * looped(dk4),
            step: bq,
        };
        (cost, u64::from(p.rows))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        self.storage.wgsl("Elem", &["q", "k"], false)
            + &format!(
                "const DK4: u32 = {}u;\nconst BQ: u32 = {}u;\n",
                self.dk / 4,
                self.bq
            )
            + &any_masking(self.masked)
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::key_coverage::run(p, self.storage, buffers)
    }
}
