// The backward of edge-list attention by source (CPU twin: src/cpu/graph_grad_kv.rs;
// gradients: src/cpu/graph_grad_reference.rs): dV_j = Σ_e P_e·dO_i and dK_j = scale·Σ_e
// dS_e·q_i over source j's out-edges e (destination i), summed over the query heads h of K/V
// head kvh (GQA). One workgroup of WG = 64 invocations per (source j, K/V head): j = wg.x +
// wg.y·nwg.x, kvh = wg.z; no float atomics, one workgroup owns each row of dK and dV. It walks
// out-edges offset .. offset + max_len of the source's list: the whole list, or one chunk per
// pass where the list (times the heads of the group) is longer than llvmpipe's loop cap lets
// one invocation walk (GRAPH_ACCUMULATE: a later pass adds to the earlier passes' dK, dV).
//
// The out-edges come from the transposed CSR built on the host: out_edges [E, 2] holds, for
// positions src_ptr[j] .. src_ptr[j + 1], each edge's given index (where graph_grad_q wrote
// its P and dS, [E, heads]) and its destination. P and dS are read, not recomputed: 8 bytes
// per edge and head against a logit (d_k elements of Q, K and the features) and dP (d_v of V,
// the features and dO) to rebuild, so reading them moves far fewer bytes for any d > 1.
// Per tile of WG edges, invocation t loads edge t's destination, P and dS into workgroup
// memory; every invocation then sums the tile into its own dims d = li + WG·u, u < SLOTS.
// With heads averaged (GRAPH_MEAN_HEADS) dO is the mean's [M, 1, d_v], shared by every head,
// and dV takes 1/heads of it. The prelude declares how Q and dO are read, and SLOTS.
//!include common/params.wgsl
//!include common/graph.wgsl

@group(0) @binding(0) var<uniform> g: GraphParams;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> d_o: array<Grad>;
@group(0) @binding(3) var<storage, read> src_ptr: array<u32>;
@group(0) @binding(4) var<storage, read> out_edges: array<u32>;
@group(0) @binding(5) var<storage, read> p_edge: array<f32>;
@group(0) @binding(6) var<storage, read> ds_edge: array<f32>;
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;

const WG: u32 = 64u;

var<workgroup> sh_p: array<f32, 64>;
var<workgroup> sh_ds: array<f32, 64>;
var<workgroup> sh_i: array<u32, 64>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let j = wg.x + wg.y * nwg.x;
    if j >= g.items {
        return;
    }
    let kvh = wg.z;
    let group = g.heads / g.kv_heads;
    let mean = (g.flags & GRAPH_MEAN_HEADS) != 0u;
    let end = src_ptr[j + 1u];
    let e0 = min(src_ptr[j] + g.offset, end);
    let e1 = e0 + min(g.max_len, end - e0);
    let accumulate = (g.flags & GRAPH_ACCUMULATE) != 0u;
    var acc_k: array<f32, SLOTS>;
    var acc_v: array<f32, SLOTS>;
    for (var u = 0u; u < SLOTS; u++) {
        acc_k[u] = 0.0;
        acc_v[u] = 0.0;
    }
    for (var hh = 0u; hh < group; hh++) {
        let h = kvh * group + hh;
        for (var t0 = e0; t0 < e1; t0 += WG) {
            let len = min(WG, e1 - t0);
            var p = 0.0;
            var ds = 0.0;
            var i = 0u;
            if li < len {
                let slot = out_edges[2u * (t0 + li)];
                i = out_edges[2u * (t0 + li) + 1u];
                p = p_edge[slot * g.heads + h];
                ds = ds_edge[slot * g.heads + h];
            }
            sh_p[li] = p;
            sh_ds[li] = ds;
            sh_i[li] = i;
            workgroupBarrier();
            for (var t = 0u; t < len; t++) {
                let q_base = (sh_i[t] * g.heads + h) * g.d_k;
                let do_base = select((sh_i[t] * g.heads + h) * g.d_v, sh_i[t] * g.d_v, mean);
                for (var u = 0u; u < SLOTS; u++) {
                    let d = li + WG * u;
                    if d < g.d_k {
                        acc_k[u] = fma(sh_ds[t], load_q(q_base + d), acc_k[u]);
                    }
                    if d < g.d_v {
                        acc_v[u] = fma(sh_p[t], load_d_o(do_base + d), acc_v[u]);
                    }
                }
            }
            workgroupBarrier();
        }
    }
    let gs = select(1.0, 1.0 / f32(g.heads), mean);
    for (var u = 0u; u < SLOTS; u++) {
        let d = li + WG * u;
        if d < g.d_k {
            let at = (j * g.kv_heads + kvh) * g.d_k + d;
            dk[at] = select(0.0, dk[at], accumulate) + g.scale * acc_k[u];
        }
        if d < g.d_v {
            let at = (j * g.kv_heads + kvh) * g.d_v + d;
            dv[at] = select(0.0, dv[at], accumulate) + gs * acc_v[u];
        }
    }
}
