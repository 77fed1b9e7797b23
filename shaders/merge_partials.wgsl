// Exact merge of n_splits partial results over disjoint key ranges, by their log-sum-exp:
//   LSE = log Σ_s exp(LSE_s),  O = Σ_s exp(LSE_s − LSE) · O_s.
// Inputs are stacked slices: o_parts [n_splits, batch, M, q_heads, d_v] and the statistics,
// either one LSE row per slice, [n_splits, batch, q_heads, M] (shards), or, with
// FLAG_SPLIT_STATS (split-K), two: the max logit and ln(sum), [n_splits, 2, batch, q_heads, M],
// weighed as exp((max_s − max) + ln sum_s) so that ln sum_s is not lost next to huge logits.
// A slice whose max (or LSE) is ≤ REMOVED_BELOW (−∞: no keys) weighs 0, any other at least
// MIN_WEIGHT (so that a slice's ±∞ in O stays ±∞, never 0·∞); if every slice is empty the
// row outputs 0 and LSE = −∞.
// One invocation per output element (row, d): its loops run over the splits only, so their
// length does not grow with d_v (llvmpipe's loop cap, gpu::kernels::LoopCost); the element
// with d = 0 writes the row's LSE.
//
// Row statistics (ROW_STATS, a specialization, split-K only): each split's entropy H_s and
// focus F_s of its own weights (flash's row_stats) merge with the split weights
// w_s = exp(LSE_s − LSE) as H = Σ_s w_s·(H_s − ln w_s) and F = max_s w_s·F_s, into
// `row_out [2, rows]` (entropy, then focus; 0 and 0 for a row with no key). The prelude
// declares their bindings (5: row_parts [n_splits, 2, rows], 6: row_out) after the others.
//!include common/params.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> o_parts: array<f32>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read_write> o: array<f32>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;

const WG: u32 = 64u;

// Slice s's (max, ln sum) of statistics row `r`.
fn slice_stats(s: u32, r: u32, rows: u32) -> vec2<f32> {
    if (p.flags & FLAG_SPLIT_STATS) != 0u {
        return vec2<f32>(stats[2u * s * rows + r], stats[(2u * s + 1u) * rows + r]);
    }
    return vec2<f32>(stats[s * rows + r], 0.0);
}

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let at = gid.x + (gid.y + gid.z * nwg.y) * nwg.x * WG;
    let rows = p.batch * p.m * p.q_heads;
    if at >= rows * p.d_v {
        return;
    }
    let idx = at / p.d_v;
    let d = at % p.d_v;
    let h = idx % p.q_heads;
    let i = (idx / p.q_heads) % p.m;
    let b = idx / (p.q_heads * p.m);
    let lrow = (b * p.q_heads + h) * p.m + i;
    let o_stride = rows * p.d_v;

    var mx = MASKED;
    for (var s = 0u; s < p.n_splits; s++) {
        mx = max(mx, slice_stats(s, lrow, rows).x);
    }
    var total = 0.0;
    var acc = 0.0;
    for (var s = 0u; s < p.n_splits; s++) {
        let st = slice_stats(s, lrow, rows);
        if st.x > REMOVED_BELOW {
            let w = max(exp((st.x - mx) + st.y), MIN_WEIGHT);
            total += w;
            acc += w * o_parts[s * o_stride + at];
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
        lse[lrow] = out_lse;
        if ROW_STATS {
            var entropy = 0.0;
            var focus = 0.0;
            if total > 0.0 {
                let ln_total = log(total);
                for (var s = 0u; s < p.n_splits; s++) {
                    let st = slice_stats(s, lrow, rows);
                    if st.x > REMOVED_BELOW {
                        let ln_w = (st.x - mx) + st.y - ln_total;
                        let w = exp(ln_w);
                        entropy += w * (row_part(2u * s * rows + lrow) - ln_w);
                        focus = max(focus, w * row_part((2u * s + 1u) * rows + lrow));
                    }
                }
            }
            write_row_out(lrow, rows + lrow, entropy, focus);
        }
    }
}
