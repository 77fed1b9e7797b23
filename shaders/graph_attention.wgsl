// Attention over a graph's edge list (CPU twin: src/cpu/graph_attention.rs; semantics:
// src/graph.rs). Destination node i attends to its in-neighbours only: the edges
// row_ptr[i] .. row_ptr[i + 1] of the CSR by destination, whose sources col_idx[e] are rows of
// K and V. Logit of edge e for head h: scale·q[i, h]·(k[col_idx[e], h / group] + f[e, h])
// (+ bias[e, h]; a bias ≤ GRAPH_BIAS_REMOVES removes the edge), and its value row
// v[col_idx[e], h / group] + f[e, h], where f = edge_attr [E, heads, d] is bound (else 0).
// Nothing M×N exists: work and memory grow with E·d.
//
// One workgroup of WG = 64 invocations per (work item, head): item = wg.x + wg.y·nwg.x, head =
// wg.z. A work item is a destination's whole neighbour list (SPLIT = false), or one chunk of at
// most max_len edges of it (SPLIT = true: `chunks [items, 2]` holds each chunk's destination
// and first edge), so that a hub's list runs in many workgroups and stays under llvmpipe's
// loop cap; graph_merge then combines a destination's chunks exactly.
//
// The list is walked in tiles of WG edges with an online softmax: invocation t scores edge
// t of the tile (its d_k loop) into workgroup memory, every invocation takes the tile's max
// from there (the same value everywhere, so the state m, l is uniform), weighs its own edge,
// and then every invocation accumulates the tile's weighted V rows for its own value dims
// li + WG·u, u < SLOTS (written out by the prelude: `acc`, zero_acc, rescale_acc,
// accumulate_edge, store_acc). Kept edges weigh at least MIN_WEIGHT, removed ones 0 (skipped).
//
// Output: without SPLIT, O [M, heads, d_v] (0 for a destination with no kept edge) and
// LSE [heads, M] (−∞ there); with SPLIT, each chunk's normalized O into o [items, heads, d_v]
// and its max logit and ln(sum) into lse [items, heads, 2] (−∞ and 0 for no kept edge).
// The prelude declares how Q, K, V and the edge features are read (`load4_q`, `load4_k`,
// `load_v`, `load4_edge_attr`, `load_edge_attr`), SLOTS and SPLIT.
//!include common/params.wgsl
//!include common/graph.wgsl
//!include common/graph_logit.wgsl

@group(0) @binding(0) var<uniform> g: GraphParams;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> v: array<Elem>;
@group(0) @binding(4) var<storage, read> row_ptr: array<u32>;
@group(0) @binding(5) var<storage, read> col_idx: array<u32>;
@group(0) @binding(6) var<storage, read> chunks: array<u32>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read> edge_attr: array<Feature>;
@group(0) @binding(9) var<storage, read_write> o: array<f32>;
@group(0) @binding(10) var<storage, read_write> lse: array<f32>;

const WG: u32 = 64u;

var<workgroup> sh_s: array<f32, 64>;
var<workgroup> sh_w: array<f32, 64>;
var<workgroup> sh_j: array<u32, 64>;

// Element d of the value row at `row` plus, where bound, of the edge features at `frow`.
fn value_at(row: u32, frow: u32, d: u32) -> f32 {
    var x = load_v(row + d);
    if (g.flags & GRAPH_EDGE_FEATURES) != 0u {
        x += load_edge_attr(frow + d);
    }
    return x;
}

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let item = wg.x + wg.y * nwg.x;
    if item >= g.items {
        return;
    }
    let h = wg.z;
    let kvh = h / (g.heads / g.kv_heads);
    var dst = item;
    var e0 = 0u;
    var e1 = 0u;
    if SPLIT {
        dst = chunks[2u * item];
        e0 = chunks[2u * item + 1u];
        e1 = min(e0 + g.max_len, row_ptr[dst + 1u]);
    } else {
        e0 = row_ptr[dst];
        e1 = row_ptr[dst + 1u];
    }
    let q_base = (dst * g.heads + h) * g.d_k;
    var m = MASKED;
    var l = 0.0;
    zero_acc();
    for (var t0 = e0; t0 < e1; t0 += WG) {
        let len = min(WG, e1 - t0);
        var s = MASKED;
        var j = 0u;
        if li < len {
            let e = t0 + li;
            j = col_idx[e];
            s = edge_logit(q_base, (j * g.kv_heads + kvh) * g.d_k, e, h);
        }
        sh_s[li] = s;
        sh_j[li] = j;
        workgroupBarrier();
        var tmax = m;
        for (var t = 0u; t < len; t++) {
            tmax = max(tmax, sh_s[t]);
        }
        sh_w[li] = select(0.0, max(exp(s - tmax), MIN_WEIGHT), s > REMOVED_BELOW);
        workgroupBarrier();
        let alpha = max(exp(m - tmax), MIN_WEIGHT);
        l *= alpha;
        rescale_acc(alpha);
        for (var t = 0u; t < len; t++) {
            let w = sh_w[t];
            if w > 0.0 {
                l += w;
                let frow = ((t0 + t) * g.heads + h) * g.d_v;
                accumulate_edge(w, (sh_j[t] * g.kv_heads + kvh) * g.d_v, frow, li);
            }
        }
        m = tmax;
        workgroupBarrier();
    }
    // l = 0 only when no edge was kept: O = 0 and LSE = −∞, never 0/0.
    var inv = 0.0;
    var row_max = neg_inf();
    var log_sum = 0.0;
    if l > 0.0 {
        inv = 1.0 / l;
        row_max = m;
        log_sum = log(l);
    }
    store_acc((item * g.heads + h) * g.d_v, li, inv);
    if li == 0u {
        if SPLIT {
            lse[2u * (item * g.heads + h)] = row_max;
            lse[2u * (item * g.heads + h) + 1u] = log_sum;
        } else {
            lse[h * g.m + dst] = row_max + log_sum;
        }
    }
}
