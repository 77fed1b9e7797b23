// O = P·V for one chunk: P is the chunk's scratch [bh_count, rows, N]; O is [batch, M, q_heads, d_v].
// One dispatch sums keys [key_begin, key_end): the first range writes O, later ones add to it,
// so the planner can bound each dispatch's key loop (llvmpipe's loop cap, gpu::kernels::LoopCost).
// Tiling of common/tile_gemm.wgsl: P rows in a_tile, V columns (output dims) in b_tile, BK
// keys at a time.
//!include common/params.wgsl
//!include common/tile_gemm.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<Elem>;
@group(0) @binding(3) var<storage, read_write> o: array<f32>;

// accumulate_tile where P holds removed keys (weight exactly 0, kept keys' are at least
// MIN_WEIGHT): their V adds nothing, not 0·∞ = NaN.
fn accumulate_kept(acc: ptr<function, array<vec4<f32>, 4>>, lid: vec3<u32>) {
    for (var kk = 0u; kk < BK; kk++) {
        let ra = kk * TILE + lid.y;
        let rb = kk * TILE + lid.x;
        let a = vec4<f32>(a_tile[ra], a_tile[ra + WG], a_tile[ra + 2u * WG], a_tile[ra + 3u * WG]);
        let c = vec4<f32>(b_tile[rb], b_tile[rb + WG], b_tile[rb + 2u * WG], b_tile[rb + 3u * WG]);
        (*acc)[0] = select(fma(vec4<f32>(a.x), c, (*acc)[0]), (*acc)[0], vec4<bool>(a.x == 0.0));
        (*acc)[1] = select(fma(vec4<f32>(a.y), c, (*acc)[1]), (*acc)[1], vec4<bool>(a.y == 0.0));
        (*acc)[2] = select(fma(vec4<f32>(a.z), c, (*acc)[2]), (*acc)[2], vec4<bool>(a.z == 0.0));
        (*acc)[3] = select(fma(vec4<f32>(a.w), c, (*acc)[3]), (*acc)[3], vec4<bool>(a.w == 0.0));
    }
}

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let lbh = wg.z;
    let hd = head_of(p, p.bh_offset + lbh);
    let row0 = wg.y * TILE;
    let dim0 = wg.x * TILE;
    var acc: array<vec4<f32>, 4>;

    for (var j0 = p.key_begin; j0 < p.key_end; j0 += BK) {
        for (var e = li; e < BK * TILE; e += WG * WG) {
            // P: consecutive invocations read consecutive keys of a row.
            let r = e / BK;
            let kk = e % BK;
            let row = row0 + r;
            var pv = 0.0;
            if row < p.rows && j0 + kk < p.key_end {
                pv = w[(lbh * p.rows + row) * p.n + j0 + kk];
            }
            a_tile[kk * TILE + r] = pv;
            // V: consecutive invocations read consecutive dims of a key.
            let vk = e / TILE;
            let c = e % TILE;
            var vv = 0.0;
            if j0 + vk < p.key_end && dim0 + c < p.d_v {
                vv = load_v(((hd.b * p.n + j0 + vk) * p.kv_heads + hd.hk) * p.d_v + dim0 + c);
            }
            b_tile[vk * TILE + c] = vv;
        }
        workgroupBarrier();
        if ANY_MASKING {
            accumulate_kept(&acc, lid);
        } else {
            accumulate_tile(&acc, lid);
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < PER; i++) {
        let row = row0 + lid.y + i * WG;
        for (var j = 0u; j < PER; j++) {
            let dim = dim0 + lid.x + j * WG;
            if row < p.rows && dim < p.d_v {
                let at = ((hd.b * p.m + p.row_offset + row) * p.q_heads + hd.h) * p.d_v + dim;
                var sum = acc[i][j];
                if p.key_begin > 0u {
                    sum += o[at];
                }
                o[at] = sum;
            }
        }
    }
}
