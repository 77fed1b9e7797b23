//! `grad_q`: dQ of the backward, P rebuilt from the LSE; K/V tiles in workgroup memory, one
//! query row per invocation.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{
    any_masking, unrolled_axpy, unrolled_dot, unrolled_load, unrolled_store, variant_suffix,
};
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

    /// Per tile of bc keys: the tile loop, the staging loop and the key loop; the row loads,
    /// dot products, updates and the store are written out.
    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let (dk4, dv4, bc) = (
            u64::from(self.dk / 4),
            u64::from(self.dv / 4),
            u64::from(self.bc),
        );
        let staged = (bc * (dk4 + dv4)).div_ceil(64);
        let cost = LoopCost {
            fixed: looped(0),
            per_step: 1 + looped(staged) + looped(bc),
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
            + &rows_helpers(self.dk / 4, self.dv / 4)
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::grad_q::run(p, self.storage, buffers)
    }
}

/// The straight-line helpers of `grad_q` over `dk4` and `dv4` vec4s (see the shader).
fn rows_helpers(dk4: u32, dv4: u32) -> String {
    let mut out = String::from("fn load_rows(qbase: u32, obase: u32) {\n    load_q_row(qbase);\n    load_do_row(obase);\n}\n");
    out += &unrolled_load(
        "load_q_row",
        "qbase: u32",
        dk4,
        "qr",
        "load4_q(qbase, {d}, p.d_k)",
    );
    out += &unrolled_load(
        "load_do_row",
        "obase: u32",
        dv4,
        "dor",
        "load4_d_o(obase, {d}, p.d_v)",
    );
    out += &unrolled_dot("score", dk4, "qr[{u}]", "k_tile[base + {u}u]");
    out += &unrolled_dot("dp_of", dv4, "dor[{u}]", "v_tile[base + {u}u]");
    out += &unrolled_axpy("add_k", dk4, "acc", "k_tile[base + {u}u]");
    out += &unrolled_store("store_dq", dk4, "acc", "dq", "p.d_k");
    out
}
