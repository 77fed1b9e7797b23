// Fused attention on matrix units: cooperative matrices (`wgpu_cooperative_matrix`: tensor
// cores through Vulkan's VK_KHR_cooperative_matrix, Apple's simdgroup matrices). The contract
// of flash.wgsl (bindings, split-K slices and LSE rows, masks, lengths, windows and logit
// controls, GQA) without row statistics; CPU twin: src/cpu/flash_coop.rs.
//
// A workgroup is one subgroup of WG lanes (the device's fixed subgroup size) and owns BR = T
// query rows, T the side of the device's square matrix tiles. Its Q rows are staged once as
// CE (the matrix input type: f32, or f16 where the inputs are f16 already) in workgroup
// memory, zero-padded to DKP (d_k rounded up to T), so every matrix load stays inside the
// arrays. Per tile of BC keys (a multiple of T), staged and padded the same way:
//   1. S = Q·Kᵀ on matrix units, T×T blocks accumulated in f32, stored to s_sh;
//   2. lane r < BR takes row r: its logits (log2 units: scale·log2 e applied to S in f32;
//      masks and logit controls as in flash.wgsl), the running max, P = exp2(s − max) rounded
//      to CE (the P·V operand) and the sum of those rounded P (the tile's on its own, then
//      added to the block's), and the factor alpha by which the row's O shrinks when its max
//      grows;
//   3. every lane rescales the block's O (f32, workgroup memory) by its row's alpha;
//   4. O += P·V on matrix units, O loaded and stored as the accumulator;
//   5. where the tile's V holds ±∞ or NaN (staged as 0, so that the product never forms 0·∞):
//      each row's O takes the sum of those values over the keys it keeps, as p·∞ = ∞ for
//      every weight p > 0 in the reference (removed keys add nothing);
//   6. after each block of G tiles (common/sums.wgsl), the block's O and sums fold into
//      the row's (l_sum, m_sum, and O's in the output rows themselves: no workgroup memory)
//      and start again from zero.
// At the end O is divided by the sum in place and the LSE written, as in flash.wgsl.
//
// Cooperative operations need the whole subgroup in uniform control flow: they sit only in
// loops whose bounds are uniform over the workgroup (its key range, and constants), and the
// per-row work of steps 2, 5 and 6 is a plain branch between barriers.
//
// Specialized by the host (prelude): `enable wgpu_cooperative_matrix`, CE, MatA, MatB, MatC
// (the matrix types), T, DKP, DVP, BC, BR, WG, ANY_MASKING, `load_q`/`load_k`/`load_v` (element
// by element, widened to f32) and O (binding 7, f32).
//!include common/params.wgsl
//!include common/mask.wgsl
//!include common/sums.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> q: array<Elem>;
@group(0) @binding(2) var<storage, read> k: array<Elem>;
@group(0) @binding(3) var<storage, read> v: array<Elem>;
@group(0) @binding(4) var<storage, read> lens: array<u32>;
@group(0) @binding(5) var<storage, read> mask_bits: array<u32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read_write> lse: array<f32>;

const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;

var<workgroup> q_sh: array<CE, BR * DKP>;
var<workgroup> k_sh: array<CE, BC * DKP>;
var<workgroup> v_sh: array<CE, BC * DVP>;
// The tile's scores, then its logits: [row][key].
var<workgroup> s_sh: array<f32, BR * BC>;
// The tile's weights P as the matrix input: [row][key].
var<workgroup> p_sh: array<CE, BR * BC>;
// The block's unnormalized O: [row][DVP].
var<workgroup> o_sh: array<f32, BR * DVP>;
// Per row: alpha of the tile, the fold's factor, then 1 / sum at the end.
var<workgroup> row_factor: array<f32, BR>;
// t0 + 1 of the last tile whose V holds a value that is not finite.
var<workgroup> v_bad: atomic<u32>;

fn is_finite(x: f32) -> bool {
    return abs(x) <= 3.40282346638528859812e38;
}

// The owning lane's row: its keys [lo, hi) by lengths and window, its first mask word, its
// query index; the workgroup's batch and head.
var<private> row_lo: u32;
var<private> row_hi: u32;
var<private> row_mbase: u32;
var<private> row_grow: u32;
var<private> cur_b: u32;
var<private> cur_h: u32;

// The owning lane's logit (log2 units) for key j whose plain logit is s, or MASKED if the key
// is removed for its row.
fn row_logit(s: f32, j: u32) -> f32 {
    if !ANY_MASKING {
        return s;
    }
    if j < row_lo || j >= row_hi || ((p.flags & FLAG_MASK) != 0u && !mask_bit(row_mbase, j)) {
        return MASKED;
    }
    if (p.flags & LOGIT_FLAGS) == 0u {
        return s;
    }
    // Shaped in natural units, where the removal rules are stated.
    let y = shape_logit(s * LN2, cur_b, cur_h, row_grow, j);
    return select(MASKED, y * LOG2E, y > REMOVED_BELOW);
}

@compute @workgroup_size(WG, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let bh = p.bh_offset + wg.z;
    let hd = head_of(p, bh);
    cur_b = hd.b;
    cur_h = hd.h;
    let split = wg.y;
    let row0 = wg.x * BR;
    let key_begin = split * p.split_len;
    let key_end = min(p.n, key_begin + p.split_len);

    // The workgroup's keys (uniform, so they may bound the loop with the cooperative
    // operations).
    let ql = q_len(hd.b);
    let kl = kv_len(hd.b);
    let keys = workgroup_keys(row0, BR, KeyRange(key_begin, key_end), BC, ql, kl);
    let lo = keys.lo;
    let hi = keys.hi;

    // Lane li < BR owns row row0 + li; rows past p.rows are owned by nobody (all keys removed).
    let owner = li < BR && row0 + li < p.rows;
    row_grow = p.row_offset + row0 + li;
    row_lo = 0u;
    row_hi = 0u;
    if owner {
        let rk = key_range(row_grow, ql, kl);
        row_lo = rk.lo;
        row_hi = rk.hi;
        row_mbase = mask_row_base(hd.b, hd.h, row_grow);
    }

    let q_row0 = ((hd.b * p.m + p.row_offset + row0) * p.q_heads + hd.h) * p.d_k;
    let o_row0 = (((split * p.batch + hd.b) * p.m + p.row_offset + row0) * p.q_heads + hd.h) * p.d_v;
    let o_stride = p.q_heads * p.d_v;
    let q_stride = p.q_heads * p.d_k;
    for (var e = li; e < BR * DKP; e += WG) {
        let r = e / DKP;
        let d = e % DKP;
        var x = 0.0;
        if row0 + r < p.rows && d < p.d_k {
            x = load_q(q_row0 + r * q_stride + d);
        }
        q_sh[e] = CE(x);
    }
    for (var e = li; e < BR * DVP; e += WG) {
        o_sh[e] = 0.0;
    }
    if li == 0u {
        atomicStore(&v_bad, 0u);
    }
    workgroupBarrier();
    let qs = p.scale * LOG2E;
    // The owning lane's block max and sum, and its row's folded ones.
    var m = MASKED;
    var l = 0.0;
    var m_sum = MASKED;
    var l_sum = 0.0;
    // Blocks of fold_tiles tiles (common/sums.wgsl), each folded after its last tile.
    let block_keys = BC * fold_tiles(hi - lo);
    for (var b0 = lo; b0 < hi; b0 += block_keys) {
        let b1 = min(hi, b0 + block_keys);
        for (var t0 = b0; t0 < b1; t0 += BC) {
            let len = min(BC, hi - t0);
            // Keys past len and dims past d are zero: their scores are 0 (removed below) and
            // their V rows add nothing. So are V's values that are not finite (step 5).
            for (var e = li; e < BC * DKP; e += WG) {
                let c = e / DKP;
                let d = e % DKP;
                var x = 0.0;
                if c < len && d < p.d_k {
                    x = load_k(((hd.b * p.n + t0 + c) * p.kv_heads + hd.hk) * p.d_k + d);
                }
                k_sh[e] = CE(x);
            }
            for (var e = li; e < BC * DVP; e += WG) {
                let c = e / DVP;
                let d = e % DVP;
                var x = 0.0;
                if c < len && d < p.d_v {
                    x = load_v(((hd.b * p.n + t0 + c) * p.kv_heads + hd.hk) * p.d_v + d);
                    if !is_finite(x) {
                        atomicMax(&v_bad, t0 + 1u);
                        x = 0.0;
                    }
                }
                v_sh[e] = CE(x);
            }
            workgroupBarrier();

            // 1. S = Q·Kᵀ: Q row-major [BR][DKP], Kᵀ read column-major from K's rows.
            for (var cb = 0u; cb < BC; cb += T) {
                var s = MatC();
                for (var d = 0u; d < DKP; d += T) {
                    let k_at = cb * DKP + d;
                    let qa = coopLoadT<MatA>(&q_sh[d], DKP);
                    let kb = coopLoad<MatB>(&k_sh[k_at], DKP);
                    s = coopMultiplyAdd(qa, kb, s);
                }
                coopStoreT(s, &s_sh[cb], BC);
            }
            workgroupBarrier();

            // 2. One lane per row: logits, max, rounded weights, sum, alpha.
            if li < BR {
                let at = li * BC;
                var tmax = m;
                for (var c = 0u; c < BC; c++) {
                    var x = MASKED;
                    if owner && c < len {
                        x = row_logit(s_sh[at + c] * qs, t0 + c);
                    }
                    s_sh[at + c] = x;
                    tmax = max(tmax, x);
                }
                let alpha = max(exp2(m - tmax), MIN_WEIGHT);
                l *= alpha;
                var l_tile = 0.0;
                for (var c = 0u; c < BC; c++) {
                    let x = s_sh[at + c];
                    let w = CE(select(0.0, max(exp2(x - tmax), MIN_WEIGHT), x > REMOVED_BELOW));
                    p_sh[at + c] = w;
                    l_tile += f32(w);
                }
                l += l_tile;
                row_factor[li] = alpha;
                m = tmax;
            }
            workgroupBarrier();

            // 3. O rows shrink by their alpha.
            for (var e = li; e < BR * DVP; e += WG) {
                o_sh[e] *= row_factor[e / DVP];
            }
            workgroupBarrier();

            // 4. O += P·V: P row-major [BR][BC], V row-major [BC][DVP].
            for (var vb = 0u; vb < DVP; vb += T) {
                var acc = coopLoadT<MatC>(&o_sh[vb], DVP);
                for (var cb = 0u; cb < BC; cb += T) {
                    let v_at = cb * DVP + vb;
                    let pa = coopLoadT<MatA>(&p_sh[cb], BC);
                    let vm = coopLoadT<MatB>(&v_sh[v_at], DVP);
                    acc = coopMultiplyAdd(pa, vm, acc);
                }
                coopStoreT(acc, &o_sh[vb], DVP);
            }
            workgroupBarrier();

            // 5. The kept keys' values that are not finite, in key order (no barrier inside:
            // the next one waits for it).
            if atomicLoad(&v_bad) == t0 + 1u {
                for (var e = li; e < BR * DVP; e += WG) {
                    let r = e / DVP;
                    let d = e % DVP;
                    if row0 + r < p.rows && d < p.d_v {
                        var x = 0.0;
                        for (var c = 0u; c < len; c++) {
                            if s_sh[r * BC + c] > REMOVED_BELOW {
                                let j = t0 + c;
                                let at = ((hd.b * p.n + j) * p.kv_heads + hd.hk) * p.d_v + d;
                                let y = load_v(at);
                                if !is_finite(y) {
                                    x += y;
                                }
                            }
                        }
                        o_sh[e] += x;
                    }
                }
            }
        }

        // 6. The block folds into the row's sums, O's in the output rows (the first block
        // writes them). Each lane folds the elements it rescales in step 3 and divides at the
        // end; the next tile's barriers order the rest.
        if li < BR {
            let w = max(exp2(m_sum - m), MIN_WEIGHT);
            l_sum = fma(w, l_sum, l);
            l = 0.0;
            m_sum = m;
            row_factor[li] = w;
        }
        workgroupBarrier();
        for (var e = li; e < BR * DVP; e += WG) {
            let r = e / DVP;
            let d = e % DVP;
            if row0 + r < p.rows && d < p.d_v {
                let at = o_row0 + r * o_stride + d;
                if b0 > lo {
                    o[at] = fma(row_factor[r], o[at], o_sh[e]);
                } else {
                    o[at] = o_sh[e];
                }
            }
            o_sh[e] = 0.0;
        }
    }

    // The last fold's factors are read until here. l_sum = 0 only when the row saw no key in
    // this split: output 0 and LSE = −∞, never 0/0.
    workgroupBarrier();
    if li < BR {
        row_factor[li] = select(0.0, 1.0 / l_sum, l_sum > 0.0);
    }
    workgroupBarrier();
    // Without tiles (no keys for the workgroup) nothing was folded: O is 0.
    for (var e = li; e < BR * DVP; e += WG) {
        let r = e / DVP;
        let d = e % DVP;
        if row0 + r < p.rows && d < p.d_v {
            let at = o_row0 + r * o_stride + d;
            if lo < hi {
                o[at] *= row_factor[r];
            } else {
                o[at] = 0.0;
            }
        }
    }
    if owner {
        var row_max = neg_inf();
        var log_sum = 0.0;
        if l_sum > 0.0 {
            row_max = m_sum * LN2;
            log_sum = log(l_sum);
        }
        let rows = p.batch * p.q_heads * p.m;
        let at = bh * p.m + row_grow;
        if (p.flags & FLAG_SPLIT_STATS) != 0u {
            lse[2u * split * rows + at] = row_max;
            lse[(2u * split + 1u) * rows + at] = log_sum;
        } else {
            lse[split * rows + at] = row_max + log_sum;
        }
    }
}
