// dK and dV of the backward: dV_j = Σ_i P̃_ij·dO_i and dK_j = scale · Σ_i dS_ij·(dy/dx)_ij·Q_i
// over the query rows of one pass and every query head that reads K/V head hk (GQA/MQA: the
// sum over the group happens here, in order, with no atomics); P̃ is P times Z/(1 − p) under
// dropout (common/grad.wgsl); never stores M×N.
//
// Each invocation owns one key: its K and V rows and its dK and dV sums in registers. The
// workgroup's WG keys walk, for each query head of the group, the pass's rows in tiles of BR
// rows of Q and dO (with their LSE and D) staged in workgroup memory, read by every invocation
// at once (a broadcast), the transpose of grad_q's walk. The causal/local window bounds the
// rows that may see the workgroup's keys (`workgroup_rows`). One dispatch covers the heads
// [key_begin, key_end) of the group (numbered within it) and the rows [row_offset,
// row_offset + rows); the planner splits heads and rows into passes that keep each
// invocation under llvmpipe's loop cap (LoopCost in src/kernels/grad_kv.rs), and passes after
// the first (FLAG_ACCUMULATE) add to what earlier ones wrote. workgroup_id.z is the
// (batch, kv head) pair bh_offset + z.
//
// Specialized by the host (prelude): DK4, DV4 (head dims in vec4s, zero-padded), BR (rows per
// tile), ANY_MASKING, how Q, K, V are read (`load4_q`, …), and the straight-line helpers over
// the key's vec4s (as grad_q's): `load_kv`, `score` (q·k of tile row c), `dp_of` (dO·v),
// `add_dv` (dv_acc += w·dO of row c), `add_dk` (dk_acc += g·q of row c), `store_dk`,
// `store_dv`.
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
@group(0) @binding(10) var<storage, read_write> dk: array<f32>;
@group(0) @binding(11) var<storage, read_write> dv: array<f32>;

const WG: u32 = 64u;

var<workgroup> q_tile: array<vec4<f32>, BR * DK4>;
var<workgroup> do_tile: array<vec4<f32>, BR * DV4>;
var<workgroup> lse_tile: array<f32, BR>;
var<workgroup> d_tile: array<f32, BR>;
var<private> kr: array<vec4<f32>, DK4>;
var<private> vr: array<vec4<f32>, DV4>;
var<private> dk_acc: array<vec4<f32>, DK4>;
var<private> dv_acc: array<vec4<f32>, DV4>;

// The rows of [lo, hi) that may see some key of [k0, k1) by the lengths and the window
// (row i sees keys diag(i) − left ..= diag(i) + right); uniform over the workgroup.
fn workgroup_rows(lo: u32, hi: u32, k0: u32, k1: u32, ql: u32, kl: u32) -> KeyRange {
    var a = i32(lo);
    var z = i32(min(hi, ql));
    if k0 >= min(k1, kl) {
        return KeyRange(lo, lo);
    }
    let off = select(0i, i32(kl) - i32(ql), p.bottom_right != 0u) + p.diag_shift;
    if p.win_right != UNBOUNDED {
        a = max(a, i32(k0) - i32(p.win_right) - off);
    }
    if p.win_left != UNBOUNDED {
        z = min(z, i32(min(k1, kl)) - 1i + i32(p.win_left) - off + 1i);
    }
    if z <= a {
        return KeyRange(lo, lo);
    }
    return KeyRange(u32(a), u32(z));
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let bk = p.bh_offset + wg.z;
    let b = bk / p.kv_heads;
    let hk = bk % p.kv_heads;
    let group = p.q_heads / p.kv_heads;
    let k0 = wg.x * WG;
    let j = k0 + li;
    let live = j < p.n;
    let kbase = ((b * p.n + min(j, p.n - 1u)) * p.kv_heads + hk) * p.d_k;
    let vbase = ((b * p.n + min(j, p.n - 1u)) * p.kv_heads + hk) * p.d_v;
    load_kv(kbase, vbase);
    let ql = q_len(b);
    let kl = kv_len(b);
    let rows = workgroup_rows(p.row_offset, p.row_offset + p.rows, k0, min(k0 + WG, p.n), ql, kl);
    for (var g = p.key_begin; g < p.key_end; g++) {
        let h = hk * group + g;
        let bh = b * p.q_heads + h;
        for (var r0 = rows.lo; r0 < rows.hi; r0 += BR) {
            let len = min(BR, rows.hi - r0);
            for (var e = li; e < BR * (DK4 + DV4); e += WG) {
                if e < BR * DK4 {
                    let c = min(e / DK4, len - 1u);
                    let qbase = ((b * p.m + r0 + c) * p.q_heads + h) * p.d_k;
                    q_tile[e] = load4_q(qbase, (e % DK4) * 4u, p.d_k);
                } else {
                    let f = e - BR * DK4;
                    let c = min(f / DV4, len - 1u);
                    let obase = ((b * p.m + r0 + c) * p.q_heads + h) * p.d_v;
                    do_tile[f] = load4_d_o(obase, (f % DV4) * 4u, p.d_v);
                }
            }
            if li < BR {
                let c = min(li, len - 1u);
                lse_tile[li] = lse[bh * p.m + r0 + c];
                d_tile[li] = delta[bh * p.m + r0 + c];
            }
            workgroupBarrier();
            if live {
                for (var c = 0u; c < len; c++) {
                    let i = r0 + c;
                    let row_lse = lse_tile[c];
                    let x = score(c) * p.scale;
                    let y = kept_logit(x, b, h, i, j);
                    if y > REMOVED_BELOW && row_lse > REMOVED_BELOW {
                        let pr = exp(y - row_lse);
                        add_dv(c, dropped_p(pr, bh, i, j));
                        let ds = pr * (dropped_dp(dp_of(c), bh, i, j) - d_tile[c]);
                        add_dk(c, ds * logit_slope(x, j) * p.scale);
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if live {
        store_dk(((b * p.n + j) * p.kv_heads + hk) * p.d_k);
        store_dv(((b * p.n + j) * p.kv_heads + hk) * p.d_v);
    }
}
