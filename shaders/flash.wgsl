// Fused attention with an online softmax: never stores the M×N scores.
// Each invocation owns one query row: Q in registers (pre-scaled by scale·log2 e, so exp2 is
// the exponential), a running max `m` and sum `l`, and the f32 accumulator of O. The
// workgroup walks its keys in tiles of BC rows of K and V staged in workgroup memory as vec4;
// every invocation reads the same tile element at once (a broadcast). O is rescaled once per
// tile when the max grows and divided once at the end.
//
// Masks (common/mask.wgsl): lengths and the causal/local window bound each workgroup's key
// loop, so tiles no row of the workgroup may see are neither loaded nor computed; a row skips
// tiles its own range or bool-mask bits leave empty. Tiles that every row sees whole, with no
// per-key logit control, take the plain loop; others check each key.
//
// Split-K: workgroup_id.y picks a key range [split·split_len, …); each split writes its own
// normalized O into slice `split` of o and, with FLAG_SPLIT_STATS, its max logit and ln(sum)
// into two rows of lse; merge_partials combines them. With n_splits = 1 slice 0 is the final
// output and lse the final LSE.
//
// Specialized by the host (prelude): DK4, DV4 (head dims in vec4s, zero-padded), BC (keys per
// tile), BR (rows = invocations per workgroup), ANY_MASKING (whether the call masks anything),
// and the straight-line helpers `score`, `rescale` and `accumulate` over DK4/DV4 vec4s. They
// are generated unrolled because the head dim is known and because Mesa's llvmpipe ends an
// invocation's loops after 65535 iterations in all: the planner bounds the keys of one pass by
// this kernel's LoopCost (gpu/kernels.rs), which counts every loop left here.
//!include common/params.wgsl
//!include common/mask.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> v: array<Elem>;
@group(0) @binding(4) var<storage, read> lens: array<u32>;
@group(0) @binding(5) var<storage, read> mask_bits: array<u32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> o: array<f32>;
@group(0) @binding(8) var<storage, read_write> lse: array<f32>;

const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
// Flags that need a look at every key's logit.
const LOGIT_FLAGS: u32 = FLAG_BIAS | FLAG_SOFTCAP | FLAG_SEGMENTS;

var<workgroup> k_tile: array<vec4<f32>, BC * DK4>;
var<workgroup> v_tile: array<vec4<f32>, BC * DV4>;
var<private> qr: array<vec4<f32>, DK4>;
var<private> acc: array<vec4<f32>, DV4>;

// Four consecutive elements of a row of `len` valid elements at `base`, zero past the end;
// written out, not looped (llvmpipe's loop cap counts every iteration: gpu::kernels::LoopCost).
// An element past the end reads the row's last one (in bounds) and is replaced by 0.
// One function per buffer: WGSL functions cannot take a pointer to a storage array.
fn load4_k(base: u32, d: u32, len: u32) -> vec4<f32> {
    let last = base + len - 1u;
    let x = vec4<f32>(load_k(min(base + d, last)), load_k(min(base + d + 1u, last)),
        load_k(min(base + d + 2u, last)), load_k(min(base + d + 3u, last)));
    return select(vec4<f32>(0.0), x, vec4<u32>(d) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(len));
}

fn load4_v(base: u32, d: u32, len: u32) -> vec4<f32> {
    let last = base + len - 1u;
    let x = vec4<f32>(load_v(min(base + d, last)), load_v(min(base + d + 1u, last)),
        load_v(min(base + d + 2u, last)), load_v(min(base + d + 3u, last)));
    return select(vec4<f32>(0.0), x, vec4<u32>(d) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(len));
}

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

    // Lengths are read from a read-only buffer at a workgroup-uniform index, so the key range
    // below is uniform and may bound the tile loop with its barriers. Diagonals grow with the
    // row, so the union of the rows' ranges runs from the first row's start to the last valid
    // row's end; it starts on a tile boundary.
    let ql = q_len(hd.b);
    let kl = kv_len(hd.b);
    let first = p.row_offset + wg.x * BR;
    var lo = key_begin;
    var hi = min(key_end, kl);
    if first >= ql {
        hi = lo;
    } else {
        let last = min(p.row_offset + min(wg.x * BR + BR, p.rows), ql) - 1u;
        lo = max(lo, window_lo(diagonal(first, ql, kl)));
        hi = min(hi, window_hi(diagonal(last, ql, kl), kl));
    }
    lo = key_begin + (lo - key_begin) / BC * BC;
    let rk = key_range(grow, ql, kl);
    let mbase = mask_row_base(hd.b, hd.h, grow);

    if live {
        let qbase = ((hd.b * p.m + grow) * p.q_heads + hd.h) * p.d_k;
        let qs = p.scale * LOG2E;
        for (var d = 0u; d < p.d_k; d++) {
            qr[d / 4u][d % 4u] = load_q(qbase + d) * qs;
        }
    }
    var sc: array<f32, BC>;
    var m = MASKED;
    var l = 0.0;

    for (var t0 = lo; t0 < hi; t0 += BC) {
        let len = min(BC, hi - t0);
        for (var e = li; e < BC * DK4; e += BR) {
            let c = min(e / DK4, len - 1u);
            let kbase = ((hd.b * p.n + t0 + c) * p.kv_heads + hd.hk) * p.d_k;
            k_tile[e] = load4_k(kbase, (e % DK4) * 4u, p.d_k);
        }
        for (var e = li; e < BC * DV4; e += BR) {
            let c = min(e / DV4, len - 1u);
            let vbase = ((hd.b * p.n + t0 + c) * p.kv_heads + hd.hk) * p.d_v;
            v_tile[e] = load4_v(vbase, (e % DV4) * 4u, p.d_v);
        }
        workgroupBarrier();
        let t1 = t0 + len;
        // Rows skip tiles their range or mask bits leave empty (a padding mask shared by the
        // rows skips whole tiles for all of them).
        var row_sees = live && rk.lo < t1 && rk.hi > t0;
        if ANY_MASKING && row_sees && (p.flags & FLAG_MASK) != 0u {
            row_sees = mask_any(mbase, max(t0, rk.lo), min(t1, rk.hi));
        }
        if row_sees {
            var tmax = m;
            // ANY_MASKING (a specialization) is false when the call masks nothing: every tile
            // is whole then, and the compiler drops the per-key loop.
            let whole = !ANY_MASKING
                || ((p.flags & (FLAG_MASK | LOGIT_FLAGS)) == 0u && rk.lo <= t0 && rk.hi >= t1);
            if whole {
                for (var c = 0u; c < len; c++) {
                    let s = score(c * DK4);
                    sc[c] = s;
                    tmax = max(tmax, s);
                }
            } else {
                for (var c = 0u; c < len; c++) {
                    let j = t0 + c;
                    var s = MASKED;
                    if j >= rk.lo && j < rk.hi
                        && ((p.flags & FLAG_MASK) == 0u || mask_bit(mbase, j)) {
                        s = score(c * DK4);
                        if (p.flags & LOGIT_FLAGS) != 0u {
                            // Shaped in natural units, where the removal rules are stated.
                            let y = shape_logit(s * LN2, hd.b, hd.h, grow, j);
                            s = select(MASKED, y * LOG2E, y > REMOVED_BELOW);
                        }
                    }
                    sc[c] = s;
                    tmax = max(tmax, s);
                }
            }
            let alpha = exp2(m - tmax);
            l *= alpha;
            rescale(alpha);
            for (var c = 0u; c < len; c++) {
                // Removed keys (MASKED) add 0. Branchless on purpose: lanes of one row
                // block rarely agree on a bool mask, and a divergent branch around the
                // accumulator writes cost llvmpipe 2.6× on a 50% random mask; on GPUs the
                // skipped lanes would idle anyway.
                let pc = select(0.0, exp2(sc[c] - tmax), sc[c] > REMOVED_BELOW);
                l += pc;
                accumulate(pc, c * DV4);
            }
            m = tmax;
        }
        workgroupBarrier();
    }

    if live {
        // l = 0 only when the row saw no key in this split: output 0 and LSE = −∞, never 0/0.
        var inv = 0.0;
        var row_max = neg_inf();
        var log_sum = 0.0;
        if l > 0.0 {
            inv = 1.0 / l;
            row_max = m * LN2;
            log_sum = log(l);
        }
        let obase = (((split * p.batch + hd.b) * p.m + grow) * p.q_heads + hd.h) * p.d_v;
        for (var d = 0u; d < p.d_v; d++) {
            o[obase + d] = acc[d / 4u][d % 4u] * inv;
        }
        let rows = p.batch * p.q_heads * p.m;
        let at = bh * p.m + grow;
        if (p.flags & FLAG_SPLIT_STATS) != 0u {
            lse[2u * split * rows + at] = row_max;
            lse[(2u * split + 1u) * rows + at] = log_sum;
        } else {
            lse[split * rows + at] = row_max + log_sum;
        }
    }
}
