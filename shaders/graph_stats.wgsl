// Statistics of an edge-list attention's weights (CPU twin: src/cpu/graph_stats.rs;
// semantics: src/graph.rs). P[e, h] = exp(s[e, h] − LSE[h, dst(e)]), the logit s rebuilt as
// graph_attention computes it (bias, edge features) from Q, K and the finished attention's
// LSE: no weight is stored, work grows with E·d_k.
//
// One workgroup of WG = 64 invocations per (segment, head): segment = wg.x + wg.y·nwg.x,
// head = wg.z. Without BY_SOURCE a segment is destination i's in-edges, CSR positions
// ptr[i] .. ptr[i + 1] (ptr = row_ptr); it writes the entropy −Σ P ln P into out_a [heads, M]
// and the focus max P into out_b [heads, M]. With BY_SOURCE a segment is source j's
// out-edges, the CSR positions perm[ptr[j] .. ptr[j + 1]] (the transposed CSR, built on the
// host with the same counting sort), with their destinations in dst [E]; it writes the
// coverage Σ P into out_a [heads, N] (out_b unwritten). No float atomics: one workgroup owns
// each output. Lanes stride the segment; a tree over workgroup memory combines them.
// The prelude declares how Q, K and the edge features are read, and BY_SOURCE.
//!include common/params.wgsl
//!include common/graph.wgsl
//!include common/graph_logit.wgsl

@group(0) @binding(0) var<uniform> g: GraphParams;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> col_idx: array<u32>;
@group(0) @binding(4) var<storage, read> dst: array<u32>;
@group(0) @binding(5) var<storage, read> perm: array<u32>;
@group(0) @binding(6) var<storage, read> ptr: array<u32>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read> edge_attr: array<Feature>;
@group(0) @binding(9) var<storage, read> lse: array<f32>;
@group(0) @binding(10) var<storage, read_write> out_a: array<f32>;
@group(0) @binding(11) var<storage, read_write> out_b: array<f32>;

const WG: u32 = 64u;

var<workgroup> sh_a: array<f32, 64>;
var<workgroup> sh_b: array<f32, 64>;

// The weight of edge e (CSR position) from source j into destination i, head h: 0 where its
// bias removes it or the destination kept no edge.
fn weight(e: u32, j: u32, i: u32, h: u32) -> f32 {
    let l = lse[h * g.m + i];
    if l <= REMOVED_BELOW {
        return 0.0;
    }
    let kvh = h / (g.heads / g.kv_heads);
    let s = edge_logit((i * g.heads + h) * g.d_k, (j * g.kv_heads + kvh) * g.d_k, e, h);
    if s <= REMOVED_BELOW {
        return 0.0;
    }
    return min(exp(s - l), 1.0);
}

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let seg = wg.x + wg.y * nwg.x;
    if seg >= g.items {
        return;
    }
    let h = wg.z;
    // Without BY_SOURCE: a = Σ −P ln P, b = max P; with it: a = Σ P.
    var a = 0.0;
    var b = 0.0;
    for (var t = ptr[seg] + li; t < ptr[seg + 1u]; t += WG) {
        if BY_SOURCE {
            let e = perm[t];
            a += weight(e, seg, dst[e], h);
        } else {
            let p = weight(t, col_idx[t], seg, h);
            if p > 0.0 {
                a -= p * log(p);
            }
            b = max(b, p);
        }
    }
    sh_a[li] = a;
    sh_b[li] = b;
    for (var half = WG / 2u; half > 0u; half >>= 1u) {
        workgroupBarrier();
        if li < half {
            sh_a[li] += sh_a[li + half];
            sh_b[li] = max(sh_b[li], sh_b[li + half]);
        }
    }
    if li == 0u {
        out_a[h * g.items + seg] = sh_a[0];
        if !BY_SOURCE {
            out_b[h * g.items + seg] = sh_b[0];
        }
    }
}
