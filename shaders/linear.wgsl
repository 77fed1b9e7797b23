// Y = X·Wᵀ + b (PyTorch Linear): X [rows, in_dim], W [out_dim, in_dim], b [out_dim], Y [rows, out_dim],
// all row-major, for the chunk of rows row_offset .. row_offset + rows. The projections of a
// layer write [batch·seq, heads·d] = [batch, seq, heads, d]: the layout attention reads.
// Tiling as qk_scores: a 16×16 workgroup computes a 64×64 tile of Y, each invocation a 4×4
// block strided by 16; X and W tiles of BK input features are staged in workgroup memory.

// Keep in sync with LinearParams in src/params.rs; tests/shaders.rs checks the layout.
struct LinearParams {
    row_offset: u32,
    rows: u32,
    in_dim: u32,
    out_dim: u32,
    has_bias: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: LinearParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

const TILE: u32 = 64u;
const BK: u32 = 16u;
const WG: u32 = 16u;
const PER: u32 = 4u; // TILE / WG

var<workgroup> x_tile: array<f32, 1024>; // [BK][TILE], indexed kk * TILE + row
var<workgroup> w_tile: array<f32, 1024>; // [BK][TILE], indexed kk * TILE + output feature

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * TILE;
    let out0 = wg.x * TILE;
    var acc: array<f32, 16>;

    for (var d0 = 0u; d0 < p.in_dim; d0 += BK) {
        // Consecutive invocations load consecutive input features (coalesced).
        for (var e = li; e < BK * TILE; e += WG * WG) {
            let r = e / BK;
            let kk = e % BK;
            let d = d0 + kk;
            var xv = 0.0;
            if row0 + r < p.rows && d < p.in_dim {
                xv = x[(p.row_offset + row0 + r) * p.in_dim + d];
            }
            x_tile[kk * TILE + r] = xv;
            var wv = 0.0;
            if out0 + r < p.out_dim && d < p.in_dim {
                wv = w[(out0 + r) * p.in_dim + d];
            }
            w_tile[kk * TILE + r] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, 4>;
            var c: array<f32, 4>;
            for (var i = 0u; i < PER; i++) {
                a[i] = x_tile[kk * TILE + lid.y + i * WG];
                c[i] = w_tile[kk * TILE + lid.x + i * WG];
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
            let col = out0 + lid.x + j * WG;
            if row < p.rows && col < p.out_dim {
                var bias = 0.0;
                if p.has_bias != 0u {
                    bias = b[col];
                }
                y[(p.row_offset + row) * p.out_dim + col] = acc[i * PER + j] + bias;
            }
        }
    }
}
