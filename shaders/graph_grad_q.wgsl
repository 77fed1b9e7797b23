// The backward of edge-list attention by destination (CPU twin: src/cpu/graph_grad_q.rs;
// semantics: src/graph.rs, gradients: src/cpu/graph_grad_reference.rs). One workgroup of
// WG = 64 invocations per (destination i, head h): i = wg.x + wg.y·nwg.x, h = wg.z. It walks
// edges offset .. offset + max_len of i's in-edges (CSR positions row_ptr[i] ..
// row_ptr[i + 1]): the whole list, or one chunk of it per pass where a list is longer than
// llvmpipe's loop cap lets one invocation walk (GRAPH_ACCUMULATE: a later pass adds its dQ or
// D to the earlier passes'; no float atomics, passes are dispatches in order). In tiles of WG
// edges: invocation
// t rebuilds edge t's logit s exactly as graph_attention does (edge_logit), its weight
// P = exp(s − LSE[h, i]) (0 for a removed edge or a destination that kept none), dP = dO_i·u_e
// with u_e = v_j + f_e, and dS = P·(dP − D_i); it writes P and dS per edge and head, at the
// edge's given index edge_id[e] ([E, heads]; dS is d bias). Then every invocation adds the
// tile's edges into dQ for its own dims d = li + WG·u, u < SLOTS: dQ_i += scale·dS·(k_j + f_e),
// and, with edge features, writes d f_e[d] = scale·dS·q_i[d] + P·dO_i[d]. No float atomics:
// each edge belongs to one destination, so one workgroup writes each of its values.
//
// D_i = Σ_e P_e·dP_e = dO_i·O_i ([heads, M]): with heads side by side it comes from
// grad_rowdot (from the forward's O); with heads averaged (GRAPH_MEAN_HEADS) the per-head O is
// not kept, so this kernel's DELTA_PASS specialization sums P·dP over the list first (lanes
// stride the list, a tree over workgroup memory combines them) and writes only D; dO_i per
// head is then the mean's dO [M, 1, d_v] / heads.
// The prelude declares how Q, K, V, the edge features and dO are read, SLOTS and DELTA_PASS.
//!include common/params.wgsl
//!include common/graph.wgsl
//!include common/graph_logit.wgsl

@group(0) @binding(0) var<uniform> g: GraphParams;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> v: array<Elem>;
@group(0) @binding(4) var<storage, read> row_ptr: array<u32>;
@group(0) @binding(5) var<storage, read> col_idx: array<u32>;
@group(0) @binding(6) var<storage, read> edge_id: array<u32>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read> edge_attr: array<Feature>;
@group(0) @binding(9) var<storage, read> lse: array<f32>;
@group(0) @binding(10) var<storage, read> d_o: array<Grad>;
@group(0) @binding(11) var<storage, read_write> delta: array<f32>;
@group(0) @binding(12) var<storage, read_write> dq: array<f32>;
@group(0) @binding(13) var<storage, read_write> p_edge: array<f32>;
@group(0) @binding(14) var<storage, read_write> ds_edge: array<f32>;
@group(0) @binding(15) var<storage, read_write> d_edge_attr: array<f32>;

const WG: u32 = 64u;

var<workgroup> sh_p: array<f32, 64>;
var<workgroup> sh_ds: array<f32, 64>;
var<workgroup> sh_j: array<u32, 64>;

// P of a logit s under the destination's LSE l: 0 where the edge is removed or none was kept.
fn edge_weight(s: f32, l: f32) -> f32 {
    if l <= REMOVED_BELOW || s <= REMOVED_BELOW {
        return 0.0;
    }
    return min(exp(s - l), 1.0);
}

// dO_i·(v_j + f_e) over d_v in vec4 steps, dO scaled by `gs` (1/heads when averaged).
fn edge_dp(do_base: u32, v_base: u32, f_base: u32, gs: f32) -> f32 {
    var x = 0.0;
    for (var d = 0u; d < g.d_v; d += 4u) {
        var u = load4_v(v_base, d, g.d_v);
        if (g.flags & GRAPH_EDGE_FEATURES) != 0u {
            u += load4_edge_attr(f_base, d, g.d_v);
        }
        x += dot(load4_d_o(do_base, d, g.d_v), u);
    }
    return x * gs;
}

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let i = wg.x + wg.y * nwg.x;
    if i >= g.items {
        return;
    }
    let h = wg.z;
    let kvh = h / (g.heads / g.kv_heads);
    let end = row_ptr[i + 1u];
    let e0 = min(row_ptr[i] + g.offset, end);
    let e1 = e0 + min(g.max_len, end - e0);
    let accumulate = (g.flags & GRAPH_ACCUMULATE) != 0u;
    let l = lse[h * g.m + i];
    let q_base = (i * g.heads + h) * g.d_k;
    let mean = (g.flags & GRAPH_MEAN_HEADS) != 0u;
    let do_base = select((i * g.heads + h) * g.d_v, i * g.d_v, mean);
    let gs = select(1.0, 1.0 / f32(g.heads), mean);
    let features = (g.flags & GRAPH_EDGE_FEATURES) != 0u;
    // This invocation's dims of q_i and dO_i, and its dQ sums.
    var qd: array<f32, SLOTS>;
    var gd: array<f32, SLOTS>;
    var acc: array<f32, SLOTS>;
    for (var u = 0u; u < SLOTS; u++) {
        let d = li + WG * u;
        qd[u] = 0.0;
        gd[u] = 0.0;
        acc[u] = 0.0;
        if d < g.d_k {
            qd[u] = load_q(q_base + d);
        }
        if d < g.d_v {
            gd[u] = load_d_o(do_base + d) * gs;
        }
    }
    if DELTA_PASS {
        var part = 0.0;
        for (var e = e0 + li; e < e1; e += WG) {
            let j = col_idx[e];
            let p = edge_weight(edge_logit(q_base, (j * g.kv_heads + kvh) * g.d_k, e, h), l);
            if p > 0.0 {
                part += p * edge_dp(do_base, (j * g.kv_heads + kvh) * g.d_v, (e * g.heads + h) * g.d_v, gs);
            }
        }
        sh_p[li] = part;
        for (var half = WG / 2u; half > 0u; half >>= 1u) {
            workgroupBarrier();
            if li < half {
                sh_p[li] += sh_p[li + half];
            }
        }
        if li == 0u {
            let at = h * g.m + i;
            delta[at] = select(0.0, delta[at], accumulate) + sh_p[0];
        }
        return;
    }
    let big_d = delta[h * g.m + i];
    for (var t0 = e0; t0 < e1; t0 += WG) {
        let len = min(WG, e1 - t0);
        var p = 0.0;
        var ds = 0.0;
        var j = 0u;
        if li < len {
            let e = t0 + li;
            j = col_idx[e];
            p = edge_weight(edge_logit(q_base, (j * g.kv_heads + kvh) * g.d_k, e, h), l);
            if p > 0.0 {
                let dp = edge_dp(do_base, (j * g.kv_heads + kvh) * g.d_v, (e * g.heads + h) * g.d_v, gs);
                ds = p * (dp - big_d);
            }
            let at = edge_id[e] * g.heads + h;
            p_edge[at] = p;
            ds_edge[at] = ds;
        }
        sh_p[li] = p;
        sh_ds[li] = ds;
        sh_j[li] = j;
        workgroupBarrier();
        for (var t = 0u; t < len; t++) {
            let e = t0 + t;
            let k_base = (sh_j[t] * g.kv_heads + kvh) * g.d_k;
            let f_base = (e * g.heads + h) * g.d_k;
            let df_base = (edge_id[e] * g.heads + h) * g.d_k;
            for (var u = 0u; u < SLOTS; u++) {
                let d = li + WG * u;
                if d < g.d_k {
                    var key = load_k(k_base + d);
                    if features {
                        key += load_edge_attr(f_base + d);
                        d_edge_attr[df_base + d] = g.scale * sh_ds[t] * qd[u] + sh_p[t] * gd[u];
                    }
                    acc[u] = fma(sh_ds[t], key, acc[u]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var u = 0u; u < SLOTS; u++) {
        let d = li + WG * u;
        if d < g.d_k {
            dq[q_base + d] = select(0.0, dq[q_base + d], accumulate) + g.scale * acc[u];
        }
    }
}
