// dBias of the backward, reduced to the bias's own dims [B|1, H|1, M|1, N]: each element sums
// dS_ij (the logit's gradient; the bias is added last) over the batch entries, heads and rows
// it is broadcast to (common/grad.wgsl). One invocation per bias element, 64 to a workgroup,
// the grid folded into y and z (gid.x + (gid.y + gid.z·nwg.y)·nwg.x·64). The summed
// (batch, head, row) triples are numbered t = (tb·SH + th)·SM + ti over the broadcast dims
// (SB = B where the bias has batch dim 1, else 1; likewise SH and SM); one dispatch sums
// t in [key_begin, key_end) and the planner splits that range into passes under llvmpipe's
// loop cap (LoopCost in src/kernels/grad_bias.rs); passes after the first (FLAG_ACCUMULATE)
// add to what earlier ones wrote. Q·K and dO·V are recomputed from storage for each term.
//
// Specialized by the host (prelude): ANY_MASKING (always true: a bias is masking) and how
// Q, K, V are read (`load4_q`, …).
//!include common/params.wgsl
//!include common/mask.wgsl
//!include common/dropout.wgsl
//!include common/grad.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> v: array<Elem>;
@group(0) @binding(4) var<storage, read> lens: array<u32>;
@group(0) @binding(5) var<storage, read> mask_bits: array<u32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read> lse: array<f32>;
@group(0) @binding(8) var<storage, read> d_o: array<f32>;
@group(0) @binding(9) var<storage, read> delta: array<f32>;
@group(0) @binding(10) var<storage, read_write> dbias: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    // The bias's dims: a zero stride is a broadcast dim of size 1.
    let bm = select(1u, p.m, p.bias_row != 0u);
    let bhd = select(1u, p.q_heads, p.bias_h != 0u);
    let bb = select(1u, p.batch, p.bias_b != 0u);
    let e = (wg.x + (wg.y + wg.z * nwg.y) * nwg.x) * 64u + li;
    if e >= bb * bhd * bm * p.n {
        return;
    }
    let j = e % p.n;
    let ei = (e / p.n) % bm;
    let eh = (e / (p.n * bm)) % bhd;
    let eb = e / (p.n * bm * bhd);
    // Sizes of the summed dims.
    let sm = select(p.m, 1u, p.bias_row != 0u);
    let sh = select(p.q_heads, 1u, p.bias_h != 0u);
    let group = p.q_heads / p.kv_heads;
    var acc = 0.0;
    for (var t = p.key_begin; t < p.key_end; t++) {
        let b = select(t / (sh * sm), eb, p.bias_b != 0u);
        let h = select((t / sm) % sh, eh, p.bias_h != 0u);
        let i = select(t % sm, ei, p.bias_row != 0u);
        let bh = b * p.q_heads + h;
        let hk = h / group;
        let row_lse = lse[bh * p.m + i];
        let qbase = ((b * p.m + i) * p.q_heads + h) * p.d_k;
        let kbase = ((b * p.n + j) * p.kv_heads + hk) * p.d_k;
        var s = 0.0;
        for (var d = 0u; d < p.d_k; d += 4u) {
            s += dot(load4_q(qbase, d, p.d_k), load4_k(kbase, d, p.d_k));
        }
        let y = kept_logit(s * p.scale, b, h, i, j);
        if y > REMOVED_BELOW && row_lse > REMOVED_BELOW {
            let obase = ((b * p.m + i) * p.q_heads + h) * p.d_v;
            let vbase = ((b * p.n + j) * p.kv_heads + hk) * p.d_v;
            var dp = 0.0;
            for (var d = 0u; d < p.d_v; d++) {
                dp = fma(d_o[obase + d], load_v(vbase + d), dp);
            }
            acc += exp(y - row_lse) * (dropped_dp(dp, bh, i, j) - delta[bh * p.m + i]);
        }
    }
    if (p.flags & FLAG_ACCUMULATE) != 0u {
        acc += dbias[e];
    }
    dbias[e] = acc;
}
