// The first pass of the backward: D[bh, i] = Σ_d dO[b, i, h, d]·O[b, i, h, d] (FlashAttention-2's
// rowsum(dO ∘ O)), and dO as f32 for the passes after it. One invocation per (b, i, h) row,
// 64 to a workgroup, the grid folded into y and z (gid.x + (gid.y + gid.z·nwg.y)·nwg.x·64).
// O and dO are read as the prelude's `Elem` (O's type). Its loop runs over d_v.
//!include common/params.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> o: array<Elem>;
@group(0) @binding(2) var<storage, read> d_o: array<Elem>;
@group(0) @binding(3) var<storage, read_write> delta: array<f32>;
@group(0) @binding(4) var<storage, read_write> d_o32: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let r = (wg.x + (wg.y + wg.z * nwg.y) * nwg.x) * 64u + li;
    if r >= p.batch * p.m * p.q_heads {
        return;
    }
    // r = (b·M + i)·H + h: the row's place in O's layout.
    let h = r % p.q_heads;
    let bi = r / p.q_heads;
    let b = bi / p.m;
    let i = bi % p.m;
    var acc = 0.0;
    for (var d = 0u; d < p.d_v; d++) {
        let at = r * p.d_v + d;
        let g = load_d_o(at);
        acc = fma(g, load_o(at), acc);
        d_o32[at] = g;
    }
    delta[(b * p.q_heads + h) * p.m + i] = acc;
}
