// dQ of the backward: dQ_i = scale · Σ_j dS_ij·(dy/dx)_ij · K_j over the keys of one pass
// (common/grad.wgsl: P rebuilt from the LSE, dS = P·(dP − D)); never stores M×N.
//
// Each invocation owns one query row: its Q and dO rows and its dQ sum in registers. The
// workgroup's WG rows walk the pass's keys [key_begin, key_end) in tiles of BC rows of K and V
// staged in workgroup memory, read by every invocation at once (a broadcast), as flash does;
// lengths and the causal/local window bound the walk (workgroup_keys). The planner splits the
// keys into passes that keep each invocation under llvmpipe's loop cap (LoopCost in
// src/kernels/grad_q.rs); passes after the first (FLAG_ACCUMULATE) add to what earlier ones
// wrote. Rows that saw no key (LSE −∞) get dQ = 0.
//
// Specialized by the host (prelude): DK4, DV4 (head dims in vec4s, zero-padded), BC (keys per
// tile), ANY_MASKING, how Q, K, V are read (`load4_q`, …), and the straight-line helpers over
// the row's vec4s: `load_rows` (Q and dO rows into qr, dor), `score` (q·k of tile key c),
// `dp_of` (dO·v of tile key c), `add_k` (acc += g·k of tile key c) and `store_dq`. They are
// written out so that qr, dor and acc are indexed by constants only and can live in
// registers (a loop index would make them per-invocation memory), and because llvmpipe
// counts every loop iteration against its cap.
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
@group(0) @binding(10) var<storage, read_write> dq: array<f32>;

const WG: u32 = 64u;

var<workgroup> k_tile: array<vec4<f32>, BC * DK4>;
var<workgroup> v_tile: array<vec4<f32>, BC * DV4>;
var<private> qr: array<vec4<f32>, DK4>;
var<private> dor: array<vec4<f32>, DV4>;
var<private> acc: array<vec4<f32>, DK4>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let bh = p.bh_offset + wg.z;
    let hd = head_of(p, bh);
    let row = wg.x * WG + li;
    let i = p.row_offset + row;
    var row_lse = neg_inf();
    var row_d = 0.0;
    if row < p.rows {
        row_lse = lse[bh * p.m + i];
        row_d = delta[bh * p.m + i];
        let row_base = (hd.b * p.m + i) * p.q_heads + hd.h;
        load_rows(row_base * p.d_k, row_base * p.d_v);
    }
    let live = row_lse > REMOVED_BELOW;
    let ql = q_len(hd.b);
    let kl = kv_len(hd.b);
    let keys = workgroup_keys(wg.x * WG, WG, KeyRange(p.key_begin, p.key_end), BC, ql, kl);
    let k_row0 = (hd.b * p.n * p.kv_heads + hd.hk) * p.d_k;
    let v_row0 = (hd.b * p.n * p.kv_heads + hd.hk) * p.d_v;
    for (var t0 = keys.lo; t0 < keys.hi; t0 += BC) {
        let len = min(BC, keys.hi - t0);
        for (var e = li; e < BC * (DK4 + DV4); e += WG) {
            if e < BC * DK4 {
                let c = min(e / DK4, len - 1u);
                k_tile[e] = load4_k(k_row0 + (t0 + c) * p.kv_heads * p.d_k, (e % DK4) * 4u, p.d_k);
            } else {
                let f = e - BC * DK4;
                let c = min(f / DV4, len - 1u);
                v_tile[f] = load4_v(v_row0 + (t0 + c) * p.kv_heads * p.d_v, (f % DV4) * 4u, p.d_v);
            }
        }
        workgroupBarrier();
        if live {
            for (var c = 0u; c < len; c++) {
                let j = t0 + c;
                let x = score(c) * p.scale;
                let y = kept_logit(x, hd.b, hd.h, i, j);
                if y > REMOVED_BELOW {
                    let pr = exp(y - row_lse);
                    let ds = pr * (dropped_dp(dp_of(c), bh, i, j) - row_d);
                    add_k(c, ds * logit_slope(x, j) * p.scale);
                }
            }
        }
        workgroupBarrier();
    }
    if row < p.rows {
        store_dq(((hd.b * p.m + i) * p.q_heads + hd.h) * p.d_k);
    }
}
