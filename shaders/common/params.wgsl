// Mirrors `AttnParams` in src/params.rs; tests/shaders.rs checks size and offsets.
struct AttnParams {
    batch: u32,
    m: u32,
    n: u32,
    q_heads: u32,
    kv_heads: u32,
    d_k: u32,
    d_v: u32,
    scale: f32,
    bh_offset: u32,
    bh_count: u32,
    row_offset: u32,
    rows: u32,
    n_splits: u32,
    split_len: u32,
    flags: u32,
    softcap: f32,
    win_left: u32,
    win_right: u32,
    bottom_right: u32,
    n_segments: u32,
    mask_b: u32,
    mask_h: u32,
    mask_row: u32,
    bias_b: u32,
    bias_h: u32,
    bias_row: u32,
    key_begin: u32,
    key_end: u32,
    block_rows: u32,
    block_cols: u32,
    grid_rows: u32,
    grid_cols: u32,
    drop_below: u32,
    keep_scale: f32,
    seed: vec2<u32>,
    offset: vec2<u32>,
    diag_shift: i32,
    _pad: u32,
    seg_start: vec4<u32>,
    seg_end: vec4<u32>,
    seg_factor: vec4<f32>,
}

// Head coordinates of one batch·head problem; GQA maps query head h to kv head h / group.
struct Head {
    b: u32,
    h: u32,
    hk: u32,
}

fn head_of(p: AttnParams, bh: u32) -> Head {
    let h = bh % p.q_heads;
    return Head(bh / p.q_heads, h, h / (p.q_heads / p.kv_heads));
}

// flags bit (src/params.rs flags::SPLIT_STATS): split-K partial statistics come as two rows
// per split, max logit and ln(sum), not one LSE.
const FLAG_SPLIT_STATS: u32 = 16u;
// flags bit (src/params.rs flags::ACCUMULATE): weight_blocks combines its pass with what
// earlier passes wrote.
const FLAG_ACCUMULATE: u32 = 32u;
// flags bit (src/params.rs flags::DROPOUT): weights are dropped by common/dropout.wgsl.
const FLAG_DROPOUT: u32 = 64u;

// Logit of a removed key: finite (no reliance on IEEE infinities) and far below every kept
// logit, in natural and log2 units alike: the host bounds scale, segment factors, softcap and
// bias (src/mask.rs, LOGIT_FACTOR_MAX), so `x > REMOVED_BELOW` tells kept keys from removed
// ones on every path. MASKED also starts running maxima: exp(MASKED − max) is 0, never NaN.
const MASKED: f32 = -3.0e38;
const REMOVED_BELOW: f32 = -1.0e38;

// The weight of a kept key that would round to 0, and the least factor by which the fused
// kernels and merge_partials rescale sums (the smallest normal f32, 2^−126; CPU twin:
// cpu::mask::MIN_WEIGHT): a kept key's ±∞ or NaN in V then reaches O as in the f64 reference
// (p·∞ = ∞ for every p > 0) instead of 0·∞ = NaN, and finite results move by at most
// 2^−126·N·max|v|. Removed keys weigh exactly 0 and add nothing.
const MIN_WEIGHT: f32 = 1.1754943508222875e-38;

// −∞ for LSE of rows that saw no key, built at run time: WGSL has no infinite literals, and
// Chromium's compiler (Tint) rejects a constant expression that evaluates to one, such as
// `bitcast<f32>(0xff800000u)`. A variable's value is no constant expression.
fn neg_inf() -> f32 {
    var bits = 0xff800000u;
    return bitcast<f32>(bits);
}
