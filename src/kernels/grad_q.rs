//! `grad_q`: dQ of the backward, P rebuilt from the LSE; K/V tiles in workgroup memory, one
//! query row per invocation.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{any_masking, segment_lookup, variant_suffix};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// The specialization of `grad_q`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GradQ {
    /// Head dim of Q/K, rounded up to a multiple of 4.
    pub dk: u32,
    /// Head dim of V, rounded up to a multiple of 4.
    pub dv: u32,
    /// Keys per tile in workgroup memory.
    pub bc: u32,
    /// Whether the call has any masking, dropout included (as `qk_scores`).
    pub masked: bool,
    /// How Q, K and V are read.
    pub storage: Storage,
}

impl KernelSpec for GradQ {
    type Params = AttnParams;
    const NAME: &'static str = "grad_q";
    const FILE: &'static str = include_str!("../../shaders/grad_q.wgsl");
    const LONG_LOOP: &'static str = "keys per pass";

    fn bindings(&self) -> &'static [Access] {
        // q, k, v, lens, mask, bias, lse, d_o, delta → dq
        &[
            Uniform, Read, Read, Read, Read, Read, Read, Read, Read, Read, ReadWrite,
        ]
    }

    fn label(&self) -> String {
        let variant = variant_suffix(self.storage, self.masked);
        format!(
            "xattn.grad_q_dk{}_dv{}_bc{}{variant}",
            self.dk, self.dv, self.bc
        )
    }

    fn workgroup_bytes(&self) -> u64 {
        u64::from(self.bc * (self.dk + self.dv)) * 4
    }

    /// The row loads and the dQ store (per vec4, and per element within it); per tile of bc
    /// keys: the tile loop, the staging loop and the key loop, and per key the two vec4
    /// dot-product loops, the dQ update and two segment lookups (logit and slope).
    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let (dk4, dv4, bc) = (
            u64::from(self.dk / 4),
            u64::from(self.dv / 4),
            u64::from(self.bc),
        );
        let staged = (bc * (dk4 + dv4)).div_ceil(64);
        let per_key = 2 * looped(dk4) + looped(dv4) + 2 * segment_lookup(p);
        let cost = LoopCost {
            fixed: looped(dk4) + dv4 * looped(4) + looped(dv4) + dk4 * looped(4) + looped(dk4),
            per_step: 1 + looped(staged) + looped(bc) + bc * per_key,
            step: bc,
        };
        (cost, u64::from(p.key_end - p.key_begin))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        self.storage.wgsl("Elem", &["q", "k", "v"], false)
            + &format!(
                "const DK4: u32 = {}u;\nconst DV4: u32 = {}u;\nconst BC: u32 = {}u;\n",
                self.dk / 4,
                self.dv / 4,
                self.bc
            )
            + &any_masking(self.masked)
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::grad_q::run(p, self.storage, buffers)
    }
}
