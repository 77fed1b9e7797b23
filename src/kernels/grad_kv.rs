//! `grad_kv`: dK and dV of the backward, summed over the query heads of each K/V head; Q/dO
//! tiles in workgroup memory, one key per invocation.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{
    any_masking, unrolled_axpy, unrolled_dot, unrolled_load, unrolled_store, variant_suffix,
};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// The specialization of `grad_kv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GradKv {
    /// Head dim of Q/K, rounded up to a multiple of 4.
    pub dk: u32,
    /// Head dim of V, rounded up to a multiple of 4.
    pub dv: u32,
    /// Query rows per tile in workgroup memory.
    pub br: u32,
    /// Whether the call has any masking, dropout included (as `qk_scores`).
    pub masked: bool,
    /// How Q, K and V are read.
    pub storage: Storage,
}

impl KernelSpec for GradKv {
    type Params = AttnParams;
    const NAME: &'static str = "grad_kv";
    const FILE: &'static str = include_str!("../../shaders/grad_kv.wgsl");
    const LONG_LOOP: &'static str = "query rows × query heads per pass";

    fn bindings(&self) -> &'static [Access] {
        // q, k, v, lens, mask, bias, lse, d_o, delta → dk, dv
        &[
            Uniform, Read, Read, Read, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite,
        ]
    }

    fn label(&self) -> String {
        let variant = variant_suffix(self.storage, self.masked);
        format!(
            "xattn.grad_kv_dk{}_dv{}_br{}{variant}",
            self.dk, self.dv, self.br
        )
    }

    fn workgroup_bytes(&self) -> u64 {
        u64::from(self.br * (self.dk + self.dv + 2)) * 4
    }

    /// The head loop, and per head one partial row tile; per tile of br rows: the tile loop,
    /// the staging loop and the row loop; loads, dot products, updates and stores are written out. The long loop runs over the
    /// pass's rows times its heads of the group (`key_begin .. key_end`).
    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let (dk4, dv4, br) = (
            u64::from(self.dk / 4),
            u64::from(self.dv / 4),
            u64::from(self.br),
        );
        let heads = u64::from(p.key_end - p.key_begin);
        let staged = (br * (dk4 + dv4)).div_ceil(64);
        let per_tile = 1 + looped(staged) + looped(br);
        let cost = LoopCost {
            fixed: looped(heads) + heads * (looped(0) + per_tile),
            per_step: per_tile,
            step: br,
        };
        (cost, u64::from(p.rows) * heads)
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        self.storage.wgsl("Elem", &["q", "k", "v"], false)
            + &format!(
                "const DK4: u32 = {}u;\nconst DV4: u32 = {}u;\nconst BR: u32 = {}u;\n",
                self.dk / 4,
                self.dv / 4,
                self.br
            )
            + &any_masking(self.masked)
            + &key_helpers(self.dk / 4, self.dv / 4)
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::grad_kv::run(p, self.storage, buffers)
    }
}

/// The straight-line helpers of `grad_kv` over `dk4` and `dv4` vec4s (see the shader).
fn key_helpers(dk4: u32, dv4: u32) -> String {
    let mut out = String::from(
        "fn load_kv(kbase: u32, vbase: u32) {\n    load_k_row(kbase);\n    load_v_row(vbase);\n}\n",
    );
    out += &unrolled_load(
        "load_k_row",
        "kbase: u32",
        dk4,
        "kr",
        "load4_k(kbase, {d}, p.d_k)",
    );
    out += &unrolled_load(
        "load_v_row",
        "vbase: u32",
        dv4,
        "vr",
        "load4_v(vbase, {d}, p.d_v)",
    );
    out += &unrolled_dot("score", dk4, "q_tile[base + {u}u]", "kr[{u}]");
    out += &unrolled_dot("dp_of", dv4, "do_tile[base + {u}u]", "vr[{u}]");
    out += &unrolled_axpy("add_dv", dv4, "dv_acc", "do_tile[base + {u}u]");
    out += &unrolled_axpy("add_dk", dk4, "dk_acc", "q_tile[base + {u}u]");
    out += &unrolled_store("store_dk", dk4, "dk_acc", "dk", "p.d_k");
    out += &unrolled_store("store_dv", dv4, "dv_acc", "dv", "p.d_v");
    out
}
