//! CPU twin of `shaders/weight_blocks.wgsl`: reductions of P = exp(s − LSE) over blocks of
//! (query rows × keys), one pass of block-relative rows and keys at a time.

use crate::cpu::mask::{masked_logit, MaskData, REMOVED_BELOW};
use crate::cpu::widen;
use crate::dtype::Storage;
use crate::params::BlockOp;
use crate::params::{flags, AttnParams};

/// Runs the twin on the kernel's bindings 1.. as words: q, k, lens, mask, bias, lse →
/// blocks.
pub fn run(p: &AttnParams, (op, storage): (BlockOp, Storage), buffers: &mut [Vec<u32>]) {
    let [q, k, lens, mask, bias, lse, out] = buffers else {
        crate::cpu::arity("weight_blocks", buffers.len())
    };
    let m = MaskData::from_words(lens, mask, bias);
    let (q, k) = (widen(storage, q), widen(storage, k));
    weight_blocks(
        p,
        op,
        (&q, &k),
        &m,
        bytemuck::cast_slice(lse),
        bytemuck::cast_slice_mut(out),
    );
}

/// One pass over every block of `p`'s grid into `out [bh_count, grid_rows, grid_cols]`.
pub fn weight_blocks(
    p: &AttnParams,
    op: BlockOp,
    (q, k): (&[f32], &[f32]),
    masks: &MaskData,
    lse: &[f32],
    out: &mut [f32],
) {
    let cells = p.grid_rows * p.grid_cols;
    for cell in 0..p.bh_count * cells {
        let bh = cell / cells;
        let (gr, gc) = ((cell % cells) / p.grid_cols, cell % p.grid_cols);
        let (b, h) = (bh / p.q_heads, bh % p.q_heads);
        let hk = h / (p.q_heads / p.kv_heads);
        let (r0, c0) = (gr * p.block_rows, gc * p.block_cols);
        let i_end = (r0 + p.row_offset + p.rows).min(r0 + p.block_rows).min(p.m);
        let j_end = (c0 + p.key_end).min(c0 + p.block_cols).min(p.n);
        let mut acc = 0.0f32;
        for i in r0 + p.row_offset..i_end {
            let row_lse = lse[(bh * p.m + i) as usize];
            if row_lse <= REMOVED_BELOW {
                continue;
            }
            for j in c0 + p.key_begin..j_end {
                let mut dot = 0.0f32;
                for d in 0..p.d_k {
                    let qv = q[(((b * p.m + i) * p.q_heads + h) * p.d_k + d) as usize];
                    let kv = k[(((b * p.n + j) * p.kv_heads + hk) * p.d_k + d) as usize];
                    dot = qv.mul_add(kv, dot);
                }
                let s = masked_logit(p, masks, dot * p.scale, [b, h, i, j]);
                if s > REMOVED_BELOW {
                    let w = (s - row_lse).exp();
                    match op {
                        BlockOp::Sum | BlockOp::Mean => acc += w,
                        BlockOp::Max => acc = acc.max(w),
                        BlockOp::Entropy => acc += w * (row_lse - s),
                    }
                }
            }
        }
        if op == BlockOp::Mean {
            // Each pass adds its sum over the block's size: the passes add up to the mean.
            let size = (r0 + p.block_rows).min(p.m) - r0;
            acc /= (size * ((c0 + p.block_cols).min(p.n) - c0)) as f32;
        }
        let at = cell as usize;
        if p.flags & flags::ACCUMULATE != 0 {
            acc = match op {
                BlockOp::Max => acc.max(out[at]),
                _ => acc + out[at],
            };
        }
        out[at] = acc;
    }
}
