//! `flash_coop`: fused online-softmax attention on matrix units (cooperative matrices), the
//! contract of `flash` without row statistics: one subgroup per workgroup owns `tile` query
//! rows.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{any_masking, variant_suffix};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::AttnParams;

/// The specialization of `flash_coop`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashCoop {
    /// Head dim of Q/K, rounded up to a multiple of `tile`.
    pub dk: u32,
    /// Head dim of V, rounded up to a multiple of `tile`.
    pub dv: u32,
    /// Keys per K/V tile in workgroup memory (a multiple of `tile`).
    pub bc: u32,
    /// Side of the device's square matrix tiles (8 or 16), also the query rows per
    /// workgroup.
    pub tile: u32,
    /// Whether the matrix inputs (Q, K, V staged, and P) are f16 (only where Q, K and V are
    /// f16 already, so that only P is rounded), else f32.
    pub half_inputs: bool,
    /// Whether the call has any masking (as `flash`).
    pub masked: bool,
    /// How Q, K and V are read.
    pub storage: Storage,
    /// Invocations per workgroup: the device's fixed subgroup size.
    pub lanes: u32,
}

impl KernelSpec for FlashCoop {
    type Params = AttnParams;
    const NAME: &'static str = "flash_coop";
    const FILE: &'static str = include_str!("../../shaders/flash_coop.wgsl");
    const LONG_LOOP: &'static str = "keys per split";

    fn bindings(&self) -> &'static [Access] {
        // q, k, v, lens, mask, bias → o, lse
        &[
            Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite,
        ]
    }

    fn label(&self) -> String {
        let FlashCoop {
            dk,
            dv,
            bc,
            tile,
            half_inputs,
            masked,
            storage,
            lanes,
        } = *self;
        let inputs = if half_inputs { "f16" } else { "f32" };
        let variant = variant_suffix(storage, masked);
        format!("xattn.flash_coop_dk{dk}_dv{dv}_bc{bc}_t{tile}_{inputs}_lanes{lanes}{variant}")
    }

    /// Q, K, V and P as matrix inputs; S, the block's O and the row factors in f32; the flag of
    /// V's values that are not finite (u32). The folded O lives in the output rows.
    fn workgroup_bytes(&self) -> u64 {
        let FlashCoop {
            dk, dv, bc, tile, ..
        } = *self;
        let input = if self.half_inputs { 2 } else { 4 };
        let br = tile;
        u64::from(br * dk + bc * dk + bc * dv + br * bc) * input
            + u64::from(br * bc + br * dv + br + 1) * 4
    }

    /// Fixed: Q staging, O zeroing and O writing (by `lanes` invocations), the block loop's
    /// exit. Per tile of bc keys: the tile loop, the block loop, the tile loop's exit and the
    /// fold over O (once per block, counted for every tile), K and V staging, the score blocks
    /// (bc / tile of them, each over dk / tile), the owner's two loops over the tile's keys,
    /// O's rescaling, the P·V blocks (dv / tile of them, each over bc / tile) and the loop over O of the values that are not finite (each over
    /// the tile's keys; run only for tiles whose V holds one, counted for every tile).
    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let [dk, dv, bc, tile, lanes] =
            [self.dk, self.dv, self.bc, self.tile, self.lanes].map(u64::from);
        let spread = |elems: u64| looped(elems.div_ceil(lanes));
        let cost = LoopCost {
            fixed: spread(tile * dk) + 2 * spread(tile * dv) + looped(0),
            per_step: 3
                + spread(bc * dk)
                + spread(bc * dv)
                + looped(bc / tile)
                + bc / tile * looped(dk / tile)
                + 2 * looped(bc)
                + spread(tile * dv)
                + looped(dv / tile)
                + dv / tile * looped(bc / tile)
                + spread(tile * dv)
                + (tile * dv).div_ceil(lanes) * looped(bc)
                + spread(tile * dv),
            step: bc,
        };
        (cost, u64::from(p.split_len.min(p.n)))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn needs_f16(&self) -> bool {
        self.half_inputs || self.storage.needs_f16()
    }

    fn capabilities(&self) -> naga::valid::Capabilities {
        naga::valid::Capabilities::COOPERATIVE_MATRIX
    }

    fn prelude(&self) -> String {
        let mut out = "enable wgpu_cooperative_matrix;\n".to_string();
        out.push_str(&flash_coop_prelude(
            self.dk,
            self.dv,
            self.bc,
            self.tile,
            self.half_inputs,
            self.lanes,
        ));
        out.push_str(&any_masking(self.masked));
        out.push_str(&self.storage.wgsl("Elem", &["q", "k", "v"], false));
        out
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        let shape = (self.bc, self.tile, self.half_inputs);
        cpu::flash_coop::run(p, (shape, self.storage), buffers)
    }
}

/// Constants of one flash_coop specialization (see shaders/flash_coop.wgsl): the matrix types
/// of `tile`×`tile` blocks with f16 or f32 inputs and f32 accumulators, the padded head dims,
/// the key tile, one workgroup of `lanes` invocations owning `tile` rows, and O (binding 7).
fn flash_coop_prelude(
    dk: u32,
    dv: u32,
    bc: u32,
    tile: u32,
    half_inputs: bool,
    lanes: u32,
) -> String {
    assert!(
        matches!(tile, 8 | 16) && [dk, dv, bc].iter().all(|x| x.is_multiple_of(tile)),
        "flash_coop tiles"
    );
    let ce = if half_inputs { "f16" } else { "f32" };
    format!(
        "alias CE = {ce};\n\
         alias MatA = coop_mat{tile}x{tile}<CE, A>;\n\
         alias MatB = coop_mat{tile}x{tile}<CE, B>;\n\
         alias MatC = coop_mat{tile}x{tile}<f32, C>;\n\
         const T: u32 = {tile}u;\nconst DKP: u32 = {dk}u;\nconst DVP: u32 = {dv}u;\n\
         const BC: u32 = {bc}u;\nconst BR: u32 = {tile}u;\nconst WG: u32 = {lanes}u;\n\
         @group(0) @binding(7) var<storage, read_write> o: array<f32>;\n"
    )
}
