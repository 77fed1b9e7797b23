// Exact merge of n_splits partial results over disjoint key ranges, by their LSE:
//   LSE = log Σ_s exp(LSE_s),  O = Σ_s exp(LSE_s − LSE) · O_s.
// Inputs are stacked slices: o_parts [n_splits, batch, M, q_heads, d_v] and
// lse_parts [n_splits, batch, q_heads, M]. A slice with LSE = −∞ (no keys) weighs 0; if every
// slice is empty the row outputs 0 and LSE = −∞. One invocation per output row.
//!include common/params.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> o_parts: array<f32>;
@group(0) @binding(2) var<storage, read> lse_parts: array<f32>;
@group(0) @binding(3) var<storage, read_write> o: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;

const WG: u32 = 64u;

// Slices whose LSE is below this saw no keys (their LSE is −∞).
const EMPTY: f32 = -1.0e29;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    let rows = p.batch * p.m * p.q_heads;
    if idx >= rows {
        return;
    }
    let h = idx % p.q_heads;
    let i = (idx / p.q_heads) % p.m;
    let b = idx / (p.q_heads * p.m);
    let lrow = (b * p.q_heads + h) * p.m + i;
    let lse_stride = p.batch * p.q_heads * p.m;
    let o_stride = rows * p.d_v;

    var mx = NEG_BIG;
    for (var s = 0u; s < p.n_splits; s++) {
        mx = max(mx, lse_parts[s * lse_stride + lrow]);
    }
    var total = 0.0;
    for (var s = 0u; s < p.n_splits; s++) {
        let ls = lse_parts[s * lse_stride + lrow];
        if ls > EMPTY {
            total += exp(ls - mx);
        }
    }
    var inv = 0.0;
    var out_lse = neg_inf();
    if total > 0.0 {
        inv = 1.0 / total;
        out_lse = mx + log(total);
    }
    for (var d = 0u; d < p.d_v; d++) {
        var acc = 0.0;
        for (var s = 0u; s < p.n_splits; s++) {
            let ls = lse_parts[s * lse_stride + lrow];
            if ls > EMPTY {
                acc += exp(ls - mx) * inv * o_parts[s * o_stride + idx * p.d_v + d];
            }
        }
        o[idx * p.d_v + d] = acc;
    }
    lse[lrow] = out_lse;
}
