// The exact merge of a destination's chunks (CPU twin: src/cpu/graph_merge.rs): split
// graph_attention wrote each chunk's normalized O into o_parts [chunks, heads, d_v] and its
// max logit and ln(sum) into stats [chunks, heads, 2]; destination i's chunks are
// chunk_ptr[i] .. chunk_ptr[i + 1]. As merge_partials, segment by segment:
//   LSE = mx + ln Σ_c exp((max_c − mx) + ln sum_c),  O = Σ_c w_c·O_c / Σ_c w_c,
// a chunk with no kept edge (max ≤ REMOVED_BELOW) weighing 0, any other at least MIN_WEIGHT;
// a destination without kept edges (none, or isolated) outputs 0 and LSE = −∞.
// One invocation per output element (i, h, d) of O [M, heads, d_v], 64 to a workgroup, the
// grid folded into y and z; its loops run over the destination's chunks (max_len at most);
// the element with d = 0 writes LSE [heads, M].
//!include common/params.wgsl
//!include common/graph.wgsl

@group(0) @binding(0) var<uniform> g: GraphParams;
@group(0) @binding(1) var<storage, read> o_parts: array<f32>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> chunk_ptr: array<u32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let at = gid.x + (gid.y + gid.z * nwg.y) * nwg.x * 64u;
    if at >= g.m * g.heads * g.d_v {
        return;
    }
    let r = at / g.d_v;
    let d = at % g.d_v;
    let h = r % g.heads;
    let dst = r / g.heads;
    let c0 = chunk_ptr[dst];
    let c1 = chunk_ptr[dst + 1u];
    var mx = MASKED;
    for (var c = c0; c < c1; c++) {
        mx = max(mx, stats[2u * (c * g.heads + h)]);
    }
    var total = 0.0;
    var acc = 0.0;
    for (var c = c0; c < c1; c++) {
        let st = vec2<f32>(stats[2u * (c * g.heads + h)], stats[2u * (c * g.heads + h) + 1u]);
        if st.x > REMOVED_BELOW {
            let w = max(exp((st.x - mx) + st.y), MIN_WEIGHT);
            total += w;
            acc += w * o_parts[(c * g.heads + h) * g.d_v + d];
        }
    }
    var out = 0.0;
    var out_lse = neg_inf();
    if total > 0.0 {
        out = acc / total;
        out_lse = mx + log(total);
    }
    o[at] = out;
    if d == 0u {
        lse[h * g.m + dst] = out_lse;
    }
}
