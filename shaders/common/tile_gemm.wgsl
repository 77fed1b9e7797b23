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

// acc[i·PER + j] += Σ_kk a_tile[kk][lid.y + i·WG] · b_tile[kk][lid.x + j·WG].
fn accumulate_tile(acc: ptr<function, array<f32, 16>>, lid: vec3<u32>) {
    for (var kk = 0u; kk < BK; kk++) {
        var a: array<f32, 4>;
        var c: array<f32, 4>;
        for (var i = 0u; i < PER; i++) {
            a[i] = a_tile[kk * TILE + lid.y + i * WG];
            c[i] = b_tile[kk * TILE + lid.x + i * WG];
        }
        for (var i = 0u; i < PER; i++) {
            for (var j = 0u; j < PER; j++) {
                (*acc)[i * PER + j] = fma(a[i], c[j], (*acc)[i * PER + j]);
            }
        }
    }
}
