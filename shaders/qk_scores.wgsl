// S = scale · Q·Kᵀ for one chunk of (batch·head, query rows), with the masks and logit
// controls of common/mask.wgsl applied (a removed key's score is MASKED).
// S is the chunk's scratch: [bh_count, rows, N], row-major.
// A 16×16 workgroup computes a 64×64 tile of S; each invocation owns a 4×4 register block
// whose rows and columns are strided by 16, so shared-memory reads are conflict-free and
// stores to S are coalesced. Q and K tiles of BK head-dim steps are staged in workgroup memory.
//!include common/params.wgsl
//!include common/mask.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> lens: array<u32>;
@group(0) @binding(4) var<storage, read> mask_bits: array<u32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> s: array<f32>;

const TILE: u32 = 64u;
const BK: u32 = 16u;
const WG: u32 = 16u;
const PER: u32 = 4u; // TILE / WG

var<workgroup> q_tile: array<f32, 1024>; // [BK][TILE], indexed kk * TILE + row
var<workgroup> k_tile: array<f32, 1024>; // [BK][TILE], indexed kk * TILE + key

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
    var acc: array<f32, 16>;

    for (var d0 = 0u; d0 < p.d_k; d0 += BK) {
        // Consecutive invocations load consecutive head-dim elements (coalesced).
        for (var e = li; e < BK * TILE; e += WG * WG) {
            let r = e / BK;
            let kk = e % BK;
            let d = d0 + kk;
            let row = row0 + r;
            var qv = 0.0;
            if row < p.rows && d < p.d_k {
                qv = q[((hd.b * p.m + p.row_offset + row) * p.q_heads + hd.h) * p.d_k + d];
            }
            q_tile[kk * TILE + r] = qv;
            let key = key0 + r;
            var kv = 0.0;
            if key < p.n && d < p.d_k {
                kv = k[((hd.b * p.n + key) * p.kv_heads + hd.hk) * p.d_k + d];
            }
            k_tile[kk * TILE + r] = kv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, 4>;
            var c: array<f32, 4>;
            for (var i = 0u; i < PER; i++) {
                a[i] = q_tile[kk * TILE + lid.y + i * WG];
                c[i] = k_tile[kk * TILE + lid.x + i * WG];
            }
            for (var i = 0u; i < PER; i++) {
                for (var j = 0u; j < PER; j++) {
                    acc[i * PER + j] = fma(a[i], c[j], acc[i * PER + j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < PER; i++) {
        let row = row0 + lid.y + i * WG;
        for (var j = 0u; j < PER; j++) {
            let key = key0 + lid.x + j * WG;
            if row < p.rows && key < p.n {
                let x = acc[i * PER + j] * p.scale;
                s[(lbh * p.rows + row) * p.n + key] =
                    masked_logit(x, hd.b, hd.h, p.row_offset + row, key);
            }
        }
    }
}
