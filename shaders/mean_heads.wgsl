// Attention weights averaged over heads (PyTorch `average_attn_weights`):
// mean[b, i, j] = (1/q_heads)·Σ_h P[b, h, i, j], P [batch, q_heads, M, N], mean [batch, M, N].
// One invocation per output element; the grid folds into x, y and z for large outputs.
//!include common/params.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read_write> mean: array<f32>;

const WG: u32 = 64u;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + (gid.y + gid.z * nwg.y) * nwg.x * WG;
    let mn = p.m * p.n;
    if idx >= p.batch * mn {
        return;
    }
    let b = idx / mn;
    let ij = idx % mn;
    var sum = 0.0;
    for (var h = 0u; h < p.q_heads; h++) {
        sum += w[(b * p.q_heads + h) * mn + ij];
    }
    mean[idx] = sum / f32(p.q_heads);
}
