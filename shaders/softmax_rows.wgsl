// Row softmax of the scratch S in place (S becomes the weights P), max-subtracted, and the
// log-sum-exp of each row into LSE [batch, q_heads, M]. Scores ≤ REMOVED_BELOW are removed
// keys (qk_scores writes MASKED): weight 0; a row with none left gets weights 0 and LSE −∞.
// One workgroup per row: invocations stride over the keys, then reduce in workgroup memory.
// Its loops bound the keys per row on a device with a loop cap (gpu::kernels::LoopCost: about
// 2.8M keys under llvmpipe's); 256 invocations would reach further but cost diffusion-shaped
// calls (many rows of 77 keys) 30% on llvmpipe in their barriers.
// DROPOUT (a specialization, from the prelude): the weights written are dropped out
// (common/dropout.wgsl; semantics: src/dropout.rs) after the LSE is taken from them: the
// kept ones scaled by keep_scale, the dropped ones 0, so weighted_sum's O is (P ∘ Z)·V/(1 − p)
// and the weights returned are P ∘ Z/(1 − p). The element's index is the global one (bh_offset
// + local bh, row_offset + row, key j of N), so every chunking draws the same mask.
//!include common/params.wgsl
//!include common/dropout.wgsl

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read_write> s: array<f32>;
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;

const WG: u32 = 128u;

var<workgroup> red: array<f32, WG>;

fn reduce_max(t: u32, x: f32) -> f32 {
    red[t] = x;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w /= 2u) {
        if t < w {
            red[t] = max(red[t], red[t + w]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(t: u32, x: f32) -> f32 {
    red[t] = x;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w /= 2u) {
        if t < w {
            red[t] = red[t] + red[t + w];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// exp(x − mx) for a kept key, 0 for a removed one.
fn kept_exp(x: f32, mx: f32) -> f32 {
    return select(0.0, exp(x - mx), x > REMOVED_BELOW);
}

// A kept key's weight, at least MIN_WEIGHT (so that its ±∞ in V reaches O as in the
// reference); 0 for a removed key.
fn kept_weight(x: f32, mx: f32, inv: f32) -> f32 {
    return select(0.0, max(exp(x - mx) * inv, MIN_WEIGHT), x > REMOVED_BELOW);
}

@compute @workgroup_size(WG, 1, 1)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let row = wg.x;
    let lbh = wg.y;
    let base = (lbh * p.rows + row) * p.n;

    var mx = MASKED;
    for (var j = t; j < p.n; j += WG) {
        mx = max(mx, s[base + j]);
    }
    mx = reduce_max(t, mx);

    var sum = 0.0;
    for (var j = t; j < p.n; j += WG) {
        sum += kept_exp(s[base + j], mx);
    }
    sum = reduce_sum(t, sum);

    // sum = 0 only when every key was removed: weights 0 and LSE −∞, never 0/0.
    var inv = 0.0;
    var row_lse = neg_inf();
    if sum > 0.0 {
        inv = 1.0 / sum;
        row_lse = mx + log(sum);
    }
    let bh = p.bh_offset + lbh;
    let grow = p.row_offset + row;
    for (var j = t; j < p.n; j += WG) {
        var w = kept_weight(s[base + j], mx, inv);
        if DROPOUT {
            w = select(0.0, w * p.keep_scale, dropout_keeps(bh, grow, j));
        }
        s[base + j] = w;
    }
    if t == 0u {
        lse[bh * p.m + grow] = row_lse;
    }
}
