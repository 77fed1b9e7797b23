// Reductions of the attention weights over blocks of (query rows × keys), with P rebuilt from
// Q, K and the LSE of a finished attention, P_ij = exp(s_ij − LSE_i): the statistics and the
// pooled heatmaps of P without ever storing M×N.
//   OP_SUM:     Σ P_ij          (key coverage: blocks of all rows × one key; mean pooling)
//   OP_MAX:     max P_ij        (row focus: one row × all keys; max pooling)
//   OP_ENTROPY: Σ −P_ij ln P_ij = Σ P_ij (LSE_i − s_ij)   (row entropy: one row × all keys)
//   OP_MEAN:    Σ P_ij / (the block's real rows × keys)    (mean pooling)
// Removed keys (s = MASKED) and rows that saw no key (LSE = −∞) add nothing; an empty block
// reduces to 0.
//
// The grid: p.grid_rows × p.grid_cols blocks of p.block_rows × p.block_cols per batch·head
// (the last ones clipped at M and N); out [batch·q_heads, grid_rows, grid_cols], one
// invocation per block. One dispatch (pass) covers the same local sub-block of every block:
// rows [row_offset, row_offset + rows) and keys [key_begin, key_end) relative to the block's
// corner, so the planner bounds each invocation's loops (llvmpipe's cap: LoopCost in
// src/kernels.rs). The first pass writes, later ones (FLAG_ACCUMULATE) combine.
//
// Specialized by the host (prelude): OP and ANY_MASKING, whether the call masks anything.
//!include common/params.wgsl
//!include common/mask.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> lens: array<u32>;
@group(0) @binding(4) var<storage, read> mask_bits: array<u32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;

const OP_SUM: u32 = 0u;
const OP_MAX: u32 = 1u;
const OP_ENTROPY: u32 = 2u;
const OP_MEAN: u32 = 3u;
const WG: u32 = 64u;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let cell = gid.x + (gid.y + gid.z * nwg.y) * nwg.x * WG;
    let cells = p.grid_rows * p.grid_cols;
    if cell >= p.bh_count * cells {
        return;
    }
    let bh = cell / cells;
    let gr = (cell % cells) / p.grid_cols;
    let gc = cell % p.grid_cols;
    let hd = head_of(p, bh);
    let r0 = gr * p.block_rows;
    let c0 = gc * p.block_cols;
    let i_end = min(min(r0 + p.row_offset + p.rows, r0 + p.block_rows), p.m);
    let j_end = min(min(c0 + p.key_end, c0 + p.block_cols), p.n);

    var acc = 0.0;
    for (var i = r0 + p.row_offset; i < i_end; i++) {
        let row_lse = lse[bh * p.m + i];
        if row_lse <= REMOVED_BELOW {
            continue;
        }
        let qbase = ((hd.b * p.m + i) * p.q_heads + hd.h) * p.d_k;
        for (var j = c0 + p.key_begin; j < j_end; j++) {
            let kbase = ((hd.b * p.n + j) * p.kv_heads + hd.hk) * p.d_k;
            var dot = 0.0;
            for (var d = 0u; d < p.d_k; d++) {
                dot = fma(load_q(qbase + d), load_k(kbase + d), dot);
            }
            var s = dot * p.scale;
            // ANY_MASKING (a specialization) is false when the call masks nothing.
            if ANY_MASKING {
                s = masked_logit(s, hd.b, hd.h, i, j);
            }
            if s > REMOVED_BELOW {
                let w = exp(s - row_lse);
                if OP == OP_SUM || OP == OP_MEAN {
                    acc += w;
                } else if OP == OP_MAX {
                    acc = max(acc, w);
                } else {
                    acc += w * (row_lse - s);
                }
            }
        }
    }
    if OP == OP_MEAN {
        // Each pass adds its sum over the block's size: the passes add up to the mean.
        acc /= f32((min(r0 + p.block_rows, p.m) - r0) * (min(c0 + p.block_cols, p.n) - c0));
    }
    let at = cell;
    if (p.flags & FLAG_ACCUMULATE) != 0u {
        if OP == OP_MAX {
            acc = max(acc, out[at]);
        } else {
            acc += out[at];
        }
    }
    out[at] = acc;
}
