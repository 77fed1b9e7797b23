//! `weight_blocks`: reductions of P = exp(s − LSE), rebuilt from Q, K and the LSE, over
//! blocks of (query rows × keys): the statistics and pooled heatmaps.

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{any_masking, variant_suffix};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::{AttnParams, BlockOp};

/// The specialization of `weight_blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightBlocks {
    /// What each block reduces to.
    pub op: BlockOp,
    /// Whether the call has any masking (as `qk_scores`).
    pub masked: bool,
    /// How Q and K are read.
    pub storage: Storage,
}

impl KernelSpec for WeightBlocks {
    type Params = AttnParams;
    const NAME: &'static str = "weight_blocks";
    const FILE: &'static str = include_str!("../../shaders/weight_blocks.wgsl");
    const LONG_LOOP: &'static str = "(query row, key) pairs per block and pass";

    fn bindings(&self) -> &'static [Access] {
        // q, k, lens, mask, bias, lse → blocks
        &[Uniform, Read, Read, Read, Read, Read, Read, ReadWrite]
    }

    fn label(&self) -> String {
        let variant = variant_suffix(self.storage, self.masked);
        format!("xattn.weight_blocks_{}{variant}", self.op.name())
    }

    /// Per (row, key) pair of the pass: its share of the row loop (one iteration per row, at
    /// most one per pair) and of the key loop (with each row's exit test: at most one per
    /// pair) and the head-dim loop.
    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let cost = LoopCost {
            fixed: looped(0),
            per_step: 1 + 2 + looped(u64::from(p.d_k)),
            step: 1,
        };
        (cost, u64::from(p.rows) * u64::from(p.key_end - p.key_begin))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn prelude(&self) -> String {
        self.storage.wgsl("Elem", &["q", "k"], false)
            + &format!("const OP: u32 = {}u;\n", self.op as u32)
            + &any_masking(self.masked)
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        cpu::weight_blocks::run(p, (self.op, self.storage), buffers)
    }
}
