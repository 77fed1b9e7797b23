// The register-tiled product shared by qk_scores, weighted_sum and linear: a 16×16 workgroup
// computes a 64×64 output tile, each invocation a 4×4 block whose rows and columns are strided
// by 16 (conflict-free workgroup reads, coalesced stores). The including kernel stages BK-deep
// operand slices in a_tile (output rows) and b_tile (output columns), both [BK][TILE] and
// indexed kk * TILE + row/column, then calls accumulate_tile between barriers.

const TILE: u32 = 64u;
const BK: u32 = 16u;
const WG: u32 = 16u;
const PER: u32 = 4u; // TILE / WG

var<workgroup> a_tile: array<f32, 1024>;
var<workgroup> b_tile: array<f32, 1024>;

// acc[i][j] += Σ_kk a_tile[kk][lid.y + i·WG] · b_tile[kk][lid.x + j·WG]. The 4×4 block is
// written out as vec4 operations: llvmpipe counts every loop iteration against its cap
// (gpu::kernels::LoopCost), so the BK loop is the only loop here.
fn accumulate_tile(acc: ptr<function, array<vec4<f32>, 4>>, lid: vec3<u32>) {
    for (var kk = 0u; kk < BK; kk++) {
        let ra = kk * TILE + lid.y;
        let rb = kk * TILE + lid.x;
        let a = vec4<f32>(a_tile[ra], a_tile[ra + WG], a_tile[ra + 2u * WG], a_tile[ra + 3u * WG]);
        let c = vec4<f32>(b_tile[rb], b_tile[rb + WG], b_tile[rb + 2u * WG], b_tile[rb + 3u * WG]);
        (*acc)[0] = fma(vec4<f32>(a.x), c, (*acc)[0]);
        (*acc)[1] = fma(vec4<f32>(a.y), c, (*acc)[1]);
        (*acc)[2] = fma(vec4<f32>(a.z), c, (*acc)[2]);
        (*acc)[3] = fma(vec4<f32>(a.w), c, (*acc)[3]);
    }
}
