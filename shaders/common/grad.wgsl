// What the backward kernels share (grad_q, grad_kv, grad_bias; CPU twin: src/cpu/grad.rs).
// The including kernel declares `p`, the mask buffers (common/mask.wgsl), `lse [B·H, M]`,
// `d_o` (dO in f32, [B, M, H, d_v]), `delta` (D = rowsum(dO ∘ O), [B·H, M]) and, by prelude,
// ANY_MASKING.
//
// FlashAttention-2's backward with P rebuilt from the LSE: for a kept key,
// P = exp(y − LSE) with y the shaped logit (common/mask.wgsl), dP = dO·V (times Z/(1 − p)
// under dropout, Z the keep mask of common/dropout.wgsl), dS = P·(dP − D), and the gradient of
// the logit y with respect to the scaled dot product x = scale·q·k is dS·(dy/dx).

// dy/dx for key j at scaled dot product x: the segment's factor f, times the softcap's
// derivative 1 − tanh²(f·x/cap) = 1 − (capped/cap)²; the bias adds a constant.
fn logit_slope(x: f32, j: u32) -> f32 {
    if !ANY_MASKING {
        return 1.0;
    }
    var f = 1.0;
    if (p.flags & FLAG_SEGMENTS) != 0u {
        f = segment_factor(j);
    }
    if (p.flags & FLAG_SOFTCAP) != 0u {
        let c = soft_cap(x * f, p.softcap) / p.softcap;
        f *= 1.0 - c * c;
    }
    return f;
}

// The logit y of key j for row i of (b, h) from its scaled dot product x, or MASKED.
fn kept_logit(x: f32, b: u32, h: u32, i: u32, j: u32) -> f32 {
    if ANY_MASKING {
        return masked_logit(x, b, h, i, j);
    }
    return x;
}

// dP as the gradient of the softmax sees it: dO·V, times Z/(1 − p) under dropout.
fn dropped_dp(dp: f32, bh: u32, i: u32, j: u32) -> f32 {
    if ANY_MASKING && (p.flags & FLAG_DROPOUT) != 0u {
        return select(0.0, dp * p.keep_scale, dropout_keeps(bh, i, j));
    }
    return dp;
}

// The weight that multiplied V in the forward: P, times Z/(1 − p) under dropout.
fn dropped_p(pr: f32, bh: u32, i: u32, j: u32) -> f32 {
    if ANY_MASKING && (p.flags & FLAG_DROPOUT) != 0u {
        return select(0.0, pr * p.keep_scale, dropout_keeps(bh, i, j));
    }
    return pr;
}

// Four elements of dO (f32) from `base + d`, zero past `len`.
fn load4_d_o(base: u32, d: u32, len: u32) -> vec4<f32> {
    let last = base + len - 1u;
    let x = vec4<f32>(d_o[min(base + d, last)], d_o[min(base + d + 1u, last)],
        d_o[min(base + d + 2u, last)], d_o[min(base + d + 3u, last)]);
    return select(vec4<f32>(0.0), x, vec4<u32>(d) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(len));
}
