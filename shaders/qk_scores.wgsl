// S = scale · Q·Kᵀ for one chunk of (batch·head, query rows), with the masks and logit
// controls of common/mask.wgsl applied (a removed key's score is MASKED).
// S is the chunk's scratch: [bh_count, rows, N], row-major. Specialized by the host (prelude):
// ANY_MASKING, whether the call masks anything.
// Tiling of common/tile_gemm.wgsl: Q rows in a_tile, K rows in b_tile, BK head dims at a time.
//!include common/params.wgsl
//!include common/tile_gemm.wgsl
//!include common/mask.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> lens: array<u32>;
@group(0) @binding(4) var<storage, read> mask_bits: array<u32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> s: array<f32>;

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let lbh = wg.z;
    let hd = head_of(p, p.bh_offset + lbh);
    let row0 = wg.y * TILE;
    let key0 = wg.x * TILE;
    var acc: array<vec4<f32>, 4>;

    for (var d0 = 0u; d0 < p.d_k; d0 += BK) {
        // Consecutive invocations load consecutive head-dim elements (coalesced).
        for (var e = li; e < BK * TILE; e += WG * WG) {
            let r = e / BK;
            let kk = e % BK;
            let d = d0 + kk;
            let row = row0 + r;
            var qv = 0.0;
            if row < p.rows && d < p.d_k {
                qv = load_q(((hd.b * p.m + p.row_offset + row) * p.q_heads + hd.h) * p.d_k + d);
            }
            a_tile[kk * TILE + r] = qv;
            let key = key0 + r;
            var kv = 0.0;
            if key < p.n && d < p.d_k {
                kv = load_k(((hd.b * p.n + key) * p.kv_heads + hd.hk) * p.d_k + d);
            }
            b_tile[kk * TILE + r] = kv;
        }
        workgroupBarrier();
        accumulate_tile(&acc, lid);
        workgroupBarrier();
    }

    for (var i = 0u; i < PER; i++) {
        let row = row0 + lid.y + i * WG;
        for (var j = 0u; j < PER; j++) {
            let key = key0 + lid.x + j * WG;
            if row < p.rows && key < p.n {
                var x = acc[i][j] * p.scale;
                // ANY_MASKING (a specialization) is false when the call masks nothing.
                if ANY_MASKING {
                    x = masked_logit(x, hd.b, hd.h, p.row_offset + row, key);
                }
                s[(lbh * p.rows + row) * p.n + key] = x;
            }
        }
    }
}
