// Dropout of attention weights (semantics: src/dropout.rs; CPU twin: dropout::keeps). The
// weight of (batch·head bh, row i, key j) is dropped when word 0 of Philox4x32-10 with key
// p.seed and counter (index, p.offset), index = (bh·M + i)·N + j as a 64-bit integer, is
// below p.drop_below; a kept weight is multiplied by p.keep_scale = 1/(1 − p). A pure
// function of those numbers: the backward regenerates the forward's mask instead of storing it.
// The ten rounds are written out (no loop): llvmpipe counts every loop iteration against its
// cap (kernels::LoopCost).

const PHILOX_M0: u32 = 0xd2511f53u;
const PHILOX_M1: u32 = 0xcd9e8d57u;
const PHILOX_W0: u32 = 0x9e3779b9u;
const PHILOX_W1: u32 = 0xbb67ae85u;

// The 64-bit product a·b as (high word, low word), from 16-bit halves (WGSL has no mulhi).
fn mul_wide(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let lh = a0 * b1;
    let hl = a1 * b0;
    let mid = ((a0 * b0) >> 16u) + (lh & 0xffffu) + (hl & 0xffffu);
    return vec2<u32>(a1 * b1 + (lh >> 16u) + (hl >> 16u) + (mid >> 16u), a * b);
}

fn philox_round(c: vec4<u32>, k: vec2<u32>) -> vec4<u32> {
    let p0 = mul_wide(PHILOX_M0, c.x);
    let p1 = mul_wide(PHILOX_M1, c.z);
    return vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
}

// Philox4x32-10 (Salmon et al. 2011, as Random123, cuRAND and PyTorch define it).
fn philox(ctr: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    let w = vec2<u32>(PHILOX_W0, PHILOX_W1);
    var c = philox_round(ctr, key);
    c = philox_round(c, key + w);
    c = philox_round(c, key + 2u * w);
    c = philox_round(c, key + 3u * w);
    c = philox_round(c, key + 4u * w);
    c = philox_round(c, key + 5u * w);
    c = philox_round(c, key + 6u * w);
    c = philox_round(c, key + 7u * w);
    c = philox_round(c, key + 8u * w);
    return philox_round(c, key + 9u * w);
}

// Whether the weight of (bh, row i, key j) survives dropout (true without FLAG_DROPOUT).
fn dropout_keeps(bh: u32, i: u32, j: u32) -> bool {
    if (p.flags & FLAG_DROPOUT) == 0u {
        return true;
    }
    // (bh·M + i)·N + j in 64 bits: row = bh·M + i fits 32 bits (the host checks B·H·M).
    let row = bh * p.m + i;
    let prod = mul_wide(row, p.n);
    let lo = prod.y + j;
    let hi = prod.x + select(0u, 1u, lo < j);
    return philox(vec4<u32>(lo, hi, p.offset.x, p.offset.y), p.seed).x >= p.drop_below;
}
