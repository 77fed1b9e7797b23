// Fused attention with an online softmax: never stores the M×N scores.
// Each invocation owns one query row: Q in registers (pre-scaled by scale·log2 e, so exp2 is
// the exponential), a running max `m` and sum `l`, and the f32 accumulator of O. The
// workgroup walks its keys in tiles of BC rows of K and V staged in workgroup memory; every
// invocation reads the same tile element at once (a broadcast). O is rescaled once per tile
// when the max grows and divided once at the end.
//
// Split-K: workgroup_id.y picks a key range [split·split_len, …); each split writes its own
// normalized (O, LSE) into slice `split` of o/lse, and merge_partials combines them by LSE.
// With n_splits = 1 slice 0 is the final output.
//
// Specialized by the host (prelude): DK, DV (head dims rounded up to a multiple of 4; the
// padding is zero), BC (keys per tile), BR (rows = invocations per workgroup).
//!include common/params.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;

const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;

var<workgroup> k_tile: array<f32, BC * DK>;
var<workgroup> v_tile: array<f32, BC * DV>;

@compute @workgroup_size(BR, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let lbh = wg.z;
    let bh = p.bh_offset + lbh;
    let hd = head_of(p, bh);
    let split = wg.y;
    let row = wg.x * BR + li;
    let live = row < p.rows;
    let grow = p.row_offset + row;
    let key_begin = split * p.split_len;
    let key_end = min(p.n, key_begin + p.split_len);

    var qr: array<f32, DK>;
    if live {
        let qbase = ((hd.b * p.m + grow) * p.q_heads + hd.h) * p.d_k;
        let qs = p.scale * LOG2E;
        for (var d = 0u; d < p.d_k; d++) {
            qr[d] = q[qbase + d] * qs;
        }
    }
    var acc: array<f32, DV>;
    var sc: array<f32, BC>;
    var m = NEG_BIG;
    var l = 0.0;

    for (var t0 = key_begin; t0 < key_end; t0 += BC) {
        let len = min(BC, key_end - t0);
        for (var e = li; e < BC * DK; e += BR) {
            let c = e / DK;
            let d = e % DK;
            var x = 0.0;
            if c < len && d < p.d_k {
                x = k[((hd.b * p.n + t0 + c) * p.kv_heads + hd.hk) * p.d_k + d];
            }
            k_tile[e] = x;
        }
        for (var e = li; e < BC * DV; e += BR) {
            let c = e / DV;
            let d = e % DV;
            var x = 0.0;
            if c < len && d < p.d_v {
                x = v[((hd.b * p.n + t0 + c) * p.kv_heads + hd.hk) * p.d_v + d];
            }
            v_tile[e] = x;
        }
        workgroupBarrier();
        if live {
            var tmax = m;
            for (var c = 0u; c < len; c++) {
                var dot = 0.0;
                for (var d = 0u; d < DK; d++) {
                    dot = fma(qr[d], k_tile[c * DK + d], dot);
                }
                sc[c] = dot;
                tmax = max(tmax, dot);
            }
            let alpha = exp2(m - tmax);
            l *= alpha;
            for (var d = 0u; d < DV; d++) {
                acc[d] *= alpha;
            }
            for (var c = 0u; c < len; c++) {
                let pc = exp2(sc[c] - tmax);
                l += pc;
                for (var d = 0u; d < DV; d++) {
                    acc[d] = fma(pc, v_tile[c * DV + d], acc[d]);
                }
            }
            m = tmax;
        }
        workgroupBarrier();
    }

    if live {
        // l = 0 only when the split saw no key: output 0 and LSE = −∞, never 0/0.
        var inv = 0.0;
        var row_lse = neg_inf();
        if l > 0.0 {
            inv = 1.0 / l;
            row_lse = (m + log2(l)) * LN2;
        }
        let obase = (((split * p.batch + hd.b) * p.m + grow) * p.q_heads + hd.h) * p.d_v;
        for (var d = 0u; d < p.d_v; d++) {
            o[obase + d] = acc[d] * inv;
        }
        lse[(split * p.batch * p.q_heads + bh) * p.m + grow] = row_lse;
    }
}
