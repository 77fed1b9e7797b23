// Masks, lengths and logit controls, shared by qk_scores and flash (CPU twin: src/cpu/mask.rs;
// semantics: src/mask.rs). The including kernel declares `p`, `lens` (q_lens[batch] then
// kv_lens[batch]), `mask_bits` (rows of ⌈N/32⌉ words, bit j % 32 of word j / 32 = key j may be
// attended) and `bias`.

const FLAG_MASK: u32 = 1u;
const FLAG_BIAS: u32 = 2u;
const FLAG_SOFTCAP: u32 = 4u;
const FLAG_SEGMENTS: u32 = 8u;
const UNBOUNDED: u32 = 0xffffffffu;
// Flags that need a look at every key's logit.
const LOGIT_FLAGS: u32 = FLAG_BIAS | FLAG_SOFTCAP | FLAG_SEGMENTS;
// A bias at or below this removes its key (src/mask.rs BIAS_REMOVES), compared in natural
// units before any kernel rescales the logit.
const BIAS_REMOVES: f32 = -1.0e30;

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

// Row i's diagonal key: i (top-left) or i + kv_len − q_len (bottom-right), plus the block's
// shift (src/mask.rs Block: the lengths of a block are its own, unclipped); may be negative.
fn diagonal(i: u32, ql: u32, kl: u32) -> i32 {
    return i32(i) + select(0i, i32(kl) - i32(ql), p.bottom_right != 0u) + p.diag_shift;
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

// The keys a workgroup of query rows [row0, row0 + br) of the chunk (those below p.rows) may
// see in the split [key_begin, key_end), for lengths ql and kl: diagonals grow with the row,
// so the union of the rows' ranges by lengths and window runs from the first row's start to
// the last valid row's end; lo is rounded down to a boundary of bc-key tiles. Uniform over the
// workgroup, so it may bound a loop with barriers (CPU twin: cpu::flash::workgroup_keys).
fn workgroup_keys(row0: u32, br: u32, split: KeyRange, bc: u32, ql: u32, kl: u32) -> KeyRange {
    let first = p.row_offset + row0;
    var lo = split.lo;
    var hi = min(split.hi, kl);
    if first >= ql {
        hi = lo;
    } else {
        let last = min(p.row_offset + min(row0 + br, p.rows), ql) - 1u;
        lo = max(lo, window_lo(diagonal(first, ql, kl)));
        hi = min(hi, window_hi(diagonal(last, ql, kl), kl));
    }
    return KeyRange(split.lo + (lo - split.lo) / bc * bc, hi);
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

// The factor of the first of the n_segments segments that holds key j, 1 if none. Written
// out over the 4 slots (MAX_SEGMENTS), with no loop: llvmpipe counts a loop's exit test
// toward its per-invocation loop cap on every call, even where the call sits in a branch
// not taken, and this one is called per row and key.
// WGSL's grammar wants each comparison parenthesized beside `&` (Chromium's Tint holds to it;
// naga does not).
fn segment_factor(j: u32) -> f32 {
    let inside = (vec4<u32>(j) >= p.seg_start) & (vec4<u32>(j) < p.seg_end)
        & (vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.n_segments));
    var f = 1.0;
    f = select(f, p.seg_factor[3], inside[3]);
    f = select(f, p.seg_factor[2], inside[2]);
    f = select(f, p.seg_factor[1], inside[1]);
    return select(f, p.seg_factor[0], inside[0]);
}

// cap·tanh(y/cap) to f32 accuracy for every cap > 0. Near 0 it is y·(tanh t)/t by the odd
// series (an exp-based tanh cancels there: relative error 1e-4 at t = 1e-3, 0 from 1e-8);
// beyond |t| = 0.5 it is 1 − 2/(e^{2|t|} + 1), which no longer cancels; from |t| = 15 it is ±1
// in f32. |y| is compared with multiples of cap so that y/cap is never formed where it could
// overflow.
fn soft_cap(y: f32, cap: f32) -> f32 {
    let a = abs(y);
    if a < 0.5 * cap {
        let t2 = (y / cap) * (y / cap);
        let r = 1.0 + t2 * (-1.0 / 3.0 + t2 * (2.0 / 15.0 + t2 * (-17.0 / 315.0
            + t2 * (62.0 / 2835.0 + t2 * (-1382.0 / 155925.0 + t2 * (21844.0 / 6081075.0
            + t2 * (-929569.0 / 638512875.0)))))));
        return y * r;
    }
    var th = 1.0;
    if a < 15.0 * cap {
        th = 1.0 - 2.0 / (exp(2.0 * (a / cap)) + 1.0);
    }
    return sign(y) * cap * th;
}

// The logit x = scale·q·k of key j after segment factor, softcap and bias (natural units), or
// MASKED when its bias removes the key.
fn shape_logit(x: f32, b: u32, h: u32, i: u32, j: u32) -> f32 {
    var y = x;
    if (p.flags & FLAG_SEGMENTS) != 0u {
        y *= segment_factor(j);
    }
    if (p.flags & FLAG_SOFTCAP) != 0u {
        y = soft_cap(y, p.softcap);
    }
    if (p.flags & FLAG_BIAS) != 0u {
        let bv = bias[b * p.bias_b + h * p.bias_h + i * p.bias_row + j];
        if bv <= BIAS_REMOVES {
            return MASKED;
        }
        y += bv;
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
