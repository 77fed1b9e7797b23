// Key coverage C[b, h, j] = Σ_i P_ij over the query rows, with P_ij = exp(s_ij − LSE_i)
// rebuilt from Q, K and the LSE of a finished attention: never stores M×N. Removed keys
// (s = MASKED) and rows that saw no key (LSE = −∞) add nothing.
//
// Each invocation owns one key: its K row in registers (pre-scaled, so a dot product is the
// logit), its sum in a register. The workgroup's WG keys walk the pass's query rows in tiles
// of BQ rows of Q (and their LSE) staged in workgroup memory, read by every invocation at once
// (a broadcast), the transpose of flash's walk over keys. One dispatch covers the rows
// [row_offset, row_offset + rows) of every key; the planner splits the rows into passes that
// keep each invocation under llvmpipe's loop cap (LoopCost in src/kernels.rs), and passes
// after the first (FLAG_ACCUMULATE) add to what the earlier ones wrote.
//
// Specialized by the host (prelude): DK4 (d_k in vec4s, zero-padded), BQ (rows per tile) and
// ANY_MASKING (whether the call masks anything).
//!include common/params.wgsl
//!include common/mask.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> lens: array<u32>;
@group(0) @binding(4) var<storage, read> mask_bits: array<u32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read_write> coverage: array<f32>;

const WG: u32 = 64u;

var<workgroup> q_tile: array<vec4<f32>, BQ * DK4>;
var<workgroup> lse_tile: array<f32, BQ>;
var<private> kr: array<vec4<f32>, DK4>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let bh = p.bh_offset + wg.z;
    let hd = head_of(p, bh);
    let j = (wg.x + wg.y * nwg.x) * WG + li;
    let live = j < p.n;
    if live {
        let kbase = ((hd.b * p.n + j) * p.kv_heads + hd.hk) * p.d_k;
        for (var d4 = 0u; d4 < DK4; d4++) {
            kr[d4] = load4_k(kbase, d4 * 4u, p.d_k) * p.scale;
        }
    }
    let row_end = p.row_offset + p.rows;
    var acc = 0.0;
    for (var i0 = p.row_offset; i0 < row_end; i0 += BQ) {
        let len = min(BQ, row_end - i0);
        for (var e = li; e < BQ * DK4; e += WG) {
            let c = min(e / DK4, len - 1u);
            let qbase = ((hd.b * p.m + i0 + c) * p.q_heads + hd.h) * p.d_k;
            q_tile[e] = load4_q(qbase, (e % DK4) * 4u, p.d_k);
        }
        if li < BQ {
            lse_tile[li] = lse[bh * p.m + i0 + min(li, len - 1u)];
        }
        workgroupBarrier();
        if live {
            for (var c = 0u; c < len; c++) {
                let row_lse = lse_tile[c];
                var s = 0.0;
                for (var d = 0u; d < DK4; d++) {
                    s += dot(q_tile[c * DK4 + d], kr[d]);
                }
                // ANY_MASKING (a specialization) is false when the call masks nothing.
                if ANY_MASKING {
                    s = masked_logit(s, hd.b, hd.h, i0 + c, j);
                }
                if s > REMOVED_BELOW && row_lse > REMOVED_BELOW {
                    acc += exp(s - row_lse);
                }
            }
        }
        workgroupBarrier();
    }
    if live {
        let at = bh * p.n + j;
        if (p.flags & FLAG_ACCUMULATE) != 0u {
            acc += coverage[at];
        }
        coverage[at] = acc;
    }
}
