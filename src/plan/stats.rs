//! The statistics planners: key coverage and reductions of P over blocks (entropy, focus,
//! pooled maps) on any path.

use crate::dtype::Storage;
use crate::error::Result;
use crate::kernels::key_coverage::KeyCoverage;
use crate::kernels::weight_blocks::WeightBlocks;
use crate::kernels::KernelSpec;
use crate::params::{flags, AttnParams, BlockOp};
use crate::plan::attention::{base_params, FUSED_MAX_HEAD_DIM};
use crate::plan::check::{bytes, check_binding, check_grid, fold_grid, tile_rows};
use crate::plan::device::DeviceCaps;
use crate::plan::request::{AttnIo, Request};
use crate::program::{BufferId, Program};
use crate::stats::PoolOp;

/// Appends the statistics and the pooled map `io.stats` asks for, from the attention's LSE
/// (entropy and focus only where the fused kernel did not write them: `rows_done`).
pub(super) fn stats(
    req: &Request,
    caps: &DeviceCaps,
    program: &mut Program,
    io: &AttnIo,
    rows_done: bool,
) -> Result<()> {
    let s = &req.shape;
    let row_outputs = if rows_done {
        [None, None]
    } else {
        [io.stats.entropy, io.stats.focus]
    };
    // Coverage by its own kernel where K rows fit in registers as in the fused kernel.
    let tiled_coverage = s.d_k <= FUSED_MAX_HEAD_DIM;
    if let (Some(out), true) = (io.stats.coverage, tiled_coverage) {
        key_coverage(req, caps, program, io, out)?;
    }
    let outputs = [
        (row_outputs[0], BlockOp::Entropy, (1, s.n)),
        (row_outputs[1], BlockOp::Max, (1, s.n)),
        (
            io.stats.coverage.filter(|_| !tiled_coverage),
            BlockOp::Sum,
            (s.m, 1),
        ),
    ];
    for (out, op, block) in outputs {
        if let Some(out) = out {
            weight_blocks(req, caps, program, io, (op, block), out)?;
        }
    }
    if let (Some(out), Some(pool)) = (io.stats.pooled, req.pool) {
        let op = match pool.op {
            PoolOp::Max => BlockOp::Max,
            PoolOp::Mean => BlockOp::Mean,
        };
        weight_blocks(req, caps, program, io, (op, pool.block(s.m, s.n)), out)?;
    }
    Ok(())
}

/// Appends each key's coverage `Σ_i P_ij` into `out [batch·q_heads, N]` by `key_coverage`:
/// as many passes over the query rows as the device's loop cap needs.
pub(super) fn key_coverage(
    req: &Request,
    caps: &DeviceCaps,
    program: &mut Program,
    io: &AttnIo,
    out: BufferId,
) -> Result<()> {
    let s = &req.shape;
    check_binding("key coverage", bytes(s.bh() * s.n), caps)?;
    let dk = s.d_k.next_multiple_of(4) as u32;
    // Rows of Q and their LSE per tile.
    let bq = tile_rows(
        &format!("key coverage Q tiles (d_k {dk} + LSE per row)"),
        dk + 1,
        caps,
    )?;
    let kernel = KeyCoverage {
        dk,
        bq,
        masked: req.masks.masks_logits(),
        storage: Storage::of(req.dtype, caps.native_f16),
    };
    let base = base_params(s, req.scale, &req.masks);
    let per_pass = caps.loop_len(&kernel.loop_cost(&base).0);
    // Whole tiles per pass, so that only the last pass has a partial one; where not even one
    // tile fits, check_loops refuses the plan with the cap.
    let bq_rows = bq as usize;
    let per_pass =
        (usize::try_from(per_pass).unwrap_or(usize::MAX) / bq_rows * bq_rows).max(bq_rows);
    let max_wg = caps.max_workgroups as usize;
    let groups = s.n.div_ceil(64);
    let x = groups.min(max_wg);
    let y = check_grid("key coverage", groups.div_ceil(x), caps)?;
    for bh0 in (0..s.bh()).step_by(max_wg) {
        let nbh = max_wg.min(s.bh() - bh0);
        for r0 in (0..s.m).step_by(per_pass) {
            let mut p = AttnParams {
                bh_offset: bh0 as u32,
                bh_count: nbh as u32,
                row_offset: r0 as u32,
                rows: per_pass.min(s.m - r0) as u32,
                ..base
            };
            if r0 > 0 {
                p.flags |= flags::ACCUMULATE;
            }
            let buffers = [io.q, io.k, io.lens, io.mask, io.bias, io.lse, out];
            program.dispatch(kernel, &p, [x as u32, y, nbh as u32], &buffers);
        }
    }
    Ok(())
}

/// Appends `op` over blocks of `block_rows × block_cols` of P, rebuilt from `io`'s Q, K, masks
/// and LSE, into `out [batch·q_heads, ⌈M / block_rows⌉, ⌈N / block_cols⌉]`: as many passes
/// over sub-blocks as the device's loop cap needs (one where it has none).
pub fn weight_blocks(
    req: &Request,
    caps: &DeviceCaps,
    program: &mut Program,
    io: &AttnIo,
    (op, (block_rows, block_cols)): (BlockOp, (usize, usize)),
    out: BufferId,
) -> Result<()> {
    let s = &req.shape;
    let (grid_rows, grid_cols) = (s.m.div_ceil(block_rows), s.n.div_ceil(block_cols));
    let cells = s.bh() * grid_rows * grid_cols;
    check_binding(
        &format!(
            "{} of P over {grid_rows}×{grid_cols} blocks per head",
            op.name()
        ),
        bytes(cells),
        caps,
    )?;
    let kernel = WeightBlocks {
        op,
        masked: req.masks.masks_logits(),
        storage: Storage::of(req.dtype, caps.native_f16),
    };
    let base = AttnParams {
        block_rows: block_rows as u32,
        block_cols: block_cols as u32,
        grid_rows: grid_rows as u32,
        grid_cols: grid_cols as u32,
        bh_count: s.bh() as u32,
        row_offset: 0,
        rows: 1,
        key_begin: 0,
        key_end: 1,
        ..base_params(s, req.scale, &req.masks)
    };
    // (row, key) pairs one pass may walk per block.
    let per_pass = caps.loop_len(&kernel.loop_cost(&base).0);
    // Where not even one pair fits, check_loops refuses the plan with the cap.
    let per_pass = usize::try_from(per_pass).unwrap_or(usize::MAX).max(1);
    let keys = block_cols.min(per_pass);
    let rows = block_rows.min(per_pass / keys);
    let grid = fold_grid("weight_blocks", cells, caps)?;
    let mut first = true;
    for r0 in (0..block_rows).step_by(rows) {
        for c0 in (0..block_cols).step_by(keys) {
            let mut p = AttnParams {
                row_offset: r0 as u32,
                rows: rows.min(block_rows - r0) as u32,
                key_begin: c0 as u32,
                key_end: (c0 + keys).min(block_cols) as u32,
                ..base
            };
            if !first {
                p.flags |= flags::ACCUMULATE;
            }
            first = false;
            let buffers = [io.q, io.k, io.lens, io.mask, io.bias, io.lse, out];
            program.dispatch(kernel, &p, grid, &buffers);
        }
    }
    Ok(())
}
