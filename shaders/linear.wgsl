// Y = X·Wᵀ + b (PyTorch Linear): X [rows, in_dim], W [out_dim, in_dim], b [out_dim], Y [rows, out_dim],
// all row-major, for the chunk of rows row_offset .. row_offset + rows. The projections of a
// layer write [batch·seq, heads·d] = [batch, seq, heads, d]: the layout attention reads.
// Tiling of common/tile_gemm.wgsl: X rows in a_tile, W rows (output features) in b_tile.

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

//!include common/tile_gemm.wgsl

@group(0) @binding(0) var<uniform> p: LinearParams;
@group(0) @binding(1) var<storage, read> x: array<XElem>;
@group(0) @binding(2) var<storage, read> w: array<WElem>;
@group(0) @binding(3) var<storage, read> b: array<WElem>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * TILE;
    let out0 = wg.x * TILE;
    var acc: array<vec4<f32>, 4>;

    for (var d0 = 0u; d0 < p.in_dim; d0 += BK) {
        // Consecutive invocations load consecutive input features (coalesced).
        for (var e = li; e < BK * TILE; e += WG * WG) {
            let r = e / BK;
            let kk = e % BK;
            let d = d0 + kk;
            var xv = 0.0;
            if row0 + r < p.rows && d < p.in_dim {
                xv = load_x((p.row_offset + row0 + r) * p.in_dim + d);
            }
            a_tile[kk * TILE + r] = xv;
            var wv = 0.0;
            if out0 + r < p.out_dim && d < p.in_dim {
                wv = load_w((out0 + r) * p.in_dim + d);
            }
            b_tile[kk * TILE + r] = wv;
        }
        workgroupBarrier();
        accumulate_tile(&acc, lid);
        workgroupBarrier();
    }

    for (var j = 0u; j < PER; j++) {
        let col = out0 + lid.x + j * WG;
        if col < p.out_dim {
            var bias = 0.0;
            if p.has_bias != 0u {
                bias = load_b(col);
            }
            for (var i = 0u; i < PER; i++) {
                let row = row0 + lid.y + i * WG;
                if row < p.rows {
                    y[(p.row_offset + row) * p.out_dim + col] = acc[i][j] + bias;
                }
            }
        }
    }
}
