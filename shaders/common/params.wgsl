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
    _pad0: u32,
    _pad1: u32,
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

// Finite stand-in for −∞ as a running max: −∞ − (−∞) would be NaN.
const NEG_BIG: f32 = -1.0e30;

// −∞ for LSE of rows that saw no key (built at run time: WGSL has no infinite literals).
fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}
