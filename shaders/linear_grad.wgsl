// The backward of linear (Y = X·Wᵀ + b; X [rows, in_dim], W [out_dim, in_dim], dY [rows, out_dim],
// all row-major): both products as G[m, c] (+)= Σ_k A[m, k]·B[k, c] over k_begin .. k_end, with
// B [K, in_dim] row-major, for output rows m_offset .. m_offset + m:
//   product INPUT:  dX = dY·W,  A[m, k] = dY[m, k], B = W, K = out_dim, G = dX [rows, in_dim];
//   product WEIGHT: dW = dYᵀ·X, A[m, k] = dY[k, m], B = X, K = rows,    G = dW [out_dim, in_dim];
//                   where has_bias, column in_dim of B reads as ones: its sums Σ_k dY[k, m] are
//                   db[m].
// The product is a param, not a specialization: one pipeline per storage of B serves both.
// A dispatch sums one range of k. The first (k_begin = 0) starts from zero; later ones start
// from what the earlier ones wrote and continue the same f32 sums, so any split gives the result
// of one long range, bit for bit: the planner bounds each dispatch's loop (llvmpipe's loop cap,
// kernels::LoopCost) with no float atomics, deterministically.
// Tiling of common/tile_gemm.wgsl: A rows in a_tile, B columns in b_tile, BK terms at a time.

// Keep in sync with LinearGradParams in src/params.rs; tests/shaders.rs checks the layout.
struct LinearGradParams {
    product: u32,
    m_offset: u32,
    m: u32,
    in_dim: u32,
    out_dim: u32,
    k_begin: u32,
    k_end: u32,
    has_bias: u32,
}

// LinearGradParams.product (src/params.rs, mod linear_grad).
const INPUT: u32 = 0u;

//!include common/tile_gemm.wgsl

@group(0) @binding(0) var<uniform> p: LinearGradParams;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<Elem>;
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> db: array<f32>;

// What earlier ranges wrote at output (m, c) of this chunk: G, or db in the ones column.
fn read_out(m: u32, c: u32, ones: bool) -> f32 {
    if m < p.m {
        let row = p.m_offset + m;
        if c < p.in_dim {
            return grad[row * p.in_dim + c];
        }
        if ones && c == p.in_dim {
            return db[row];
        }
    }
    return 0.0;
}

fn write_out(m: u32, c: u32, ones: bool, value: f32) {
    if m < p.m {
        let row = p.m_offset + m;
        if c < p.in_dim {
            grad[row * p.in_dim + c] = value;
        } else if ones && c == p.in_dim {
            db[row] = value;
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let m0 = wg.y * TILE;
    let c0 = wg.x * TILE;
    let weight = p.product != INPUT;
    let ones = weight && p.has_bias != 0u;
    let col = c0 + lid.x;
    var acc: array<vec4<f32>, 4>;

    // A later range continues the sums of the earlier ones.
    if p.k_begin > 0u {
        for (var i = 0u; i < PER; i++) {
            let m = m0 + lid.y + i * WG;
            acc[i] = vec4<f32>(
                read_out(m, col, ones),
                read_out(m, col + WG, ones),
                read_out(m, col + 2u * WG, ones),
                read_out(m, col + 3u * WG, ones),
            );
        }
    }

    for (var k0 = p.k_begin; k0 < p.k_end; k0 += BK) {
        for (var e = li; e < BK * TILE; e += WG * WG) {
            // A: consecutive invocations read consecutive words of dY, along its rows (k) for
            // the input product and along its columns (m) for the weight product.
            var r = e / BK;
            var kk = e % BK;
            if weight {
                r = e % TILE;
                kk = e / TILE;
            }
            let m = m0 + r;
            let k = k0 + kk;
            var av = 0.0;
            if m < p.m && k < p.k_end {
                if weight {
                    av = dy[k * p.out_dim + p.m_offset + m];
                } else {
                    av = dy[(p.m_offset + m) * p.out_dim + k];
                }
            }
            a_tile[kk * TILE + r] = av;
            // B: consecutive invocations read consecutive columns of one row.
            let c = c0 + e % TILE;
            let kb = k0 + e / TILE;
            var bv = 0.0;
            if kb < p.k_end {
                if c < p.in_dim {
                    bv = load_src(kb * p.in_dim + c);
                } else if ones && c == p.in_dim {
                    bv = 1.0;
                }
            }
            b_tile[e] = bv;
        }
        workgroupBarrier();
        accumulate_tile(&acc, lid);
        workgroupBarrier();
    }

    for (var i = 0u; i < PER; i++) {
        let m = m0 + lid.y + i * WG;
        let v = acc[i];
        write_out(m, col, ones, v.x);
        write_out(m, col + WG, ones, v.y);
        write_out(m, col + 2u * WG, ones, v.z);
        write_out(m, col + 3u * WG, ones, v.w);
    }
}
