// Masks, lengths and logit controls, shared by qk_scores and flash (CPU twin: src/cpu/mask.rs;
// semantics: src/mask.rs). The including kernel declares `p`, `lens` (q_lens[batch] then
// kv_lens[batch]), `mask_bits` (rows of ⌈N/32⌉ words, bit j % 32 of word j / 32 = key j may be
// attended) and `bias`.

const FLAG_MASK: u32 = 1u;
const FLAG_BIAS: u32 = 2u;
const FLAG_SOFTCAP: u32 = 4u;
const FLAG_SEGMENTS: u32 = 8u;
const UNBOUNDED: u32 = 0xffffffffu;
// Logit of a removed key: finite (no reliance on IEEE infinities), below NEG_BIG, so that a
// test `s > NEG_BIG` tells kept keys from removed ones (a bias of −∞ lands there too).
const MASKED: f32 = -3.0e38;

// Keys [lo, hi) that query row i may see by the lengths and the window; lo ≥ hi when none.
struct KeyRange {
    lo: u32,
    hi: u32,
}

fn q_len(b: u32) -> u32 {
    return lens[b];
}

fn kv_len(b: u32) -> u32 {
    return lens[p.batch + b];
}

// Row i's diagonal key: i (top-left) or i + kv_len − q_len (bottom-right); may be negative.
fn diagonal(i: u32, ql: u32, kl: u32) -> i32 {
    return i32(i) + select(0i, i32(kl) - i32(ql), p.bottom_right != 0u);
}

// Bounds of the window around diagonal `dg`, clamped to [0, kl]. Window sizes are clamped to
// M + N by the host, so these i32 sums cannot overflow.
fn window_lo(dg: i32) -> u32 {
    if p.win_left == UNBOUNDED {
        return 0u;
    }
    return u32(max(dg - i32(p.win_left), 0i));
}

fn window_hi(dg: i32, kl: u32) -> u32 {
    if p.win_right == UNBOUNDED {
        return kl;
    }
    return u32(clamp(dg + i32(p.win_right) + 1i, 0i, i32(kl)));
}

fn key_range(i: u32, ql: u32, kl: u32) -> KeyRange {
    if i >= ql {
        return KeyRange(0u, 0u);
    }
    let dg = diagonal(i, ql, kl);
    return KeyRange(window_lo(dg), window_hi(dg, kl));
}

// First word of row i's mask bits (broadcast dims have stride 0).
fn mask_row_base(b: u32, h: u32, i: u32) -> u32 {
    return b * p.mask_b + h * p.mask_h + i * p.mask_row;
}

fn mask_bit(base: u32, j: u32) -> bool {
    return ((mask_bits[base + j / 32u] >> (j % 32u)) & 1u) != 0u;
}

// Whether the row at `base` may attend any key of [lo, hi) by its mask bits (lo < hi).
fn mask_any(base: u32, lo: u32, hi: u32) -> bool {
    for (var w = lo / 32u; w <= (hi - 1u) / 32u; w++) {
        let first = max(lo, w * 32u) - w * 32u;
        let last = min(hi, w * 32u + 32u) - w * 32u; // one past, ≤ 32
        let ones = select((1u << last) - 1u, 0xffffffffu, last == 32u);
        if (mask_bits[base + w] & ones & ~((1u << first) - 1u)) != 0u {
            return true;
        }
    }
    return false;
}

fn segment_factor(j: u32) -> f32 {
    for (var g = 0u; g < p.n_segments; g++) {
        if j >= p.seg_start[g] && j < p.seg_end[g] {
            return p.seg_factor[g];
        }
    }
    return 1.0;
}

// The logit x = scale·q·k of key j after segment factor, softcap and bias (natural units).
fn shape_logit(x: f32, b: u32, h: u32, i: u32, j: u32) -> f32 {
    var y = x;
    if (p.flags & FLAG_SEGMENTS) != 0u {
        y *= segment_factor(j);
    }
    if (p.flags & FLAG_SOFTCAP) != 0u {
        // tanh saturates to ±1 in f32 by |t| = 15; clamping avoids inf/inf inside tanh.
        y = p.softcap * tanh(clamp(y / p.softcap, -15.0, 15.0));
    }
    if (p.flags & FLAG_BIAS) != 0u {
        y += bias[b * p.bias_b + h * p.bias_h + i * p.bias_row + j];
    }
    return y;
}

// The logit key j contributes to row i, or MASKED if the key is removed for that row.
fn masked_logit(x: f32, b: u32, h: u32, i: u32, j: u32) -> f32 {
    let r = key_range(i, q_len(b), kv_len(b));
    if j < r.lo || j >= r.hi {
        return MASKED;
    }
    if (p.flags & FLAG_MASK) != 0u && !mask_bit(mask_row_base(b, h, i), j) {
        return MASKED;
    }
    return shape_logit(x, b, h, i, j);
}
