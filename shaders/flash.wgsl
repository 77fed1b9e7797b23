// Fused attention with an online softmax: never stores the M×N scores.
// Each invocation owns R consecutive query rows (register blocking): their Q rows in registers
// (pre-scaled by scale·log2 e, so exp2 is the exponential), a running max `m` and sum `l` per
// row (one lane of an RV each), and the f32 accumulators of their O rows, in the levels of
// common/sums.wgsl (each tile's l on its own, the block's `acc`, the row's `o_sum`). The
// workgroup of WG = BR / R · LANES invocations walks its keys in tiles of BC rows of K and V
// staged in workgroup memory as vec4; every invocation reads the same tile element at once (a
// broadcast), and each element read serves all R rows. With broadcast loads (BROADCAST, below)
// nothing is staged: the lanes of a subgroup read each K/V row from storage together, one vec4
// each, and pass the vec4s on by subgroupBroadcast. O is rescaled once per tile when the max
// grows and divided once at the end.
//
// Keys that weigh 0 add nothing, also where V holds ±∞ or NaN (0·∞ would be NaN): V's rows
// past a tile's end are zero (staged, or loaded by broadcast), removed keys' weights are 0 and
// tiles with removed keys accumulate by `accumulate_pair_kept`, which leaves a row's O alone
// where its weight is 0; kept keys weigh at least MIN_WEIGHT (common/params.wgsl), so their ±∞
// and NaN reach O as in the reference.
//
// Masks (common/mask.wgsl): lengths and the causal/local window bound each workgroup's key
// loop, so tiles no row of the workgroup may see are neither loaded nor computed; an
// invocation skips tiles that its rows' ranges or bool-mask bits leave empty for all of them.
// Tiles that every row of the invocation sees whole, with no per-key logit control, take the
// plain loop; others check each key for each row (a row that sees no key of a tile gets only
// removed keys there: its max, sum and accumulator are unchanged).
//
// Split-K: workgroup_id.y picks a key range [split·split_len, …); each split writes its own
// normalized O into slice `split` of o and, with FLAG_SPLIT_STATS, its max logit and ln(sum)
// into two rows of lse; merge_partials combines them. With n_splits = 1 slice 0 is the final
// output and lse the final LSE.
//
// Row statistics (ROW_STATS, a specialization): each row also keeps t = Σ_j p_j·(m − s_j)
// (log2 units, p_j = exp2(s_j − m)), rebased like l when the max grows, and writes the
// entropy of its weights over the split's keys, −Σ P ln P = ln 2·(log2 l + t/l), and their
// focus, max P = 1/l, into `row_stats [n_splits, 2, rows]` (0 and 0 for a row with no key),
// binding 9, declared by the prelude.
//
// Dropout (DROPOUT, a specialization; semantics: src/dropout.rs): only O changes. The sums l
// and t, the max, the LSE and the row statistics take every weight before dropout; O
// accumulates `dropped(p, j)` (the dropped weights 0, through accumulate_pair_kept, so that a
// dropped key's ±∞ in V adds nothing) and is scaled by keep_scale with 1/l at the end. The
// element's index is the global one (bh, row_grow, key j of N), so every chunking and split
// draws the same mask; merge_partials, linear in the splits' O, needs nothing else.
//
// Specialized by the host (prelude): how Q, K and V are read (`load_q`, `load4_k`, …: element
// by element, or as vec4s where the head dims are multiples of 4) and O is written
// (`store4_o`, binding 7), DK4, DV4 (head dims in vec4s, zero-padded), BC (keys per
// tile), BR (rows per workgroup), R (rows per invocation), LANES (invocations sharing a row
// group's keys: 1, or the subgroup size), WG (= BR / R · LANES invocations), RV (f32,
// vec2 or vec4: one lane per row), ANY_MASKING (whether the call masks anything), and the
// straight-line helpers over DK4/DV4 vec4s and R rows: `score_block` (one key), `score_pair`
// (keys c and c + 1 into sc), `rescale`, `accumulate_pair` and `accumulate_pair_kept` (into
// acc), `fold_o` (acc into o_sum), `load_q_rows`, `store_o_rows` (from o_sum),
// `merge_lanes` (a no-op without lanes), DROPOUT and `dropped`, BROADCAST (whether K/V rows are loaded once per
// subgroup and broadcast: then score_block, score_pair and the accumulate helpers take every
// lane of the subgroup, and `subgroup_any`/`subgroup_all` are the subgroup's votes, else the
// lane's own value), the entry point `main`, and `sees_block`,
// `keeps_block`, `logit_block`, which apply the per-row functions below to each row. They are
// generated unrolled because the dims are known and because Mesa's llvmpipe ends an
// invocation's loops after 65535 iterations in all: the planner bounds the keys of one pass by
// this kernel's LoopCost (gpu/kernels.rs), which counts every loop left here.
//!include common/params.wgsl
//!include common/dropout.wgsl
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

var<workgroup> k_tile: array<vec4<f32>, BC * DK4>;
var<workgroup> v_tile: array<vec4<f32>, BC * DV4>;
var<private> qr: array<vec4<f32>, R * DK4>;
// The O rows of the block (relative to its max m) and of the row's folded sums (relative to
// m_sum).
var<private> acc: array<vec4<f32>, R * DV4>;
var<private> o_sum: array<vec4<f32>, R * DV4>;
// Per row of the invocation: its keys [lo, hi) by lengths and window (empty for rows past
// p.rows), its first mask word and its query index; the batch and head of the workgroup.
var<private> row_lo: array<u32, R>;
var<private> row_hi: array<u32, R>;
var<private> row_mbase: array<u32, R>;
var<private> row_grow: array<u32, R>;
var<private> cur_b: u32;
var<private> cur_h: u32;
var<private> cur_bh: u32;
// The tile's logits, one RV per key.
var<private> sc: array<RV, BC>;
// Where key j's K and V rows start (`k_row`, `v_row`), and the tile's first key and length:
// broadcast loads read K and V there.
var<private> k_row0: u32;
var<private> v_row0: u32;
var<private> tile_t0: u32;
var<private> tile_len: u32;

fn k_row(j: u32) -> u32 {
    return k_row0 + j * p.kv_heads * p.d_k;
}

fn v_row(j: u32) -> u32 {
    return v_row0 + j * p.kv_heads * p.d_v;
}

// Whether row `r` may see any key of the tile [t0, t1).
fn row_sees(r: u32, t0: u32, t1: u32) -> bool {
    let lo = max(t0, row_lo[r]);
    let hi = min(t1, row_hi[r]);
    if lo >= hi {
        return false;
    }
    if ANY_MASKING && (p.flags & FLAG_MASK) != 0u {
        return mask_any(row_mbase[r], lo, hi);
    }
    return true;
}

// Whether row `r` keeps key j by its range and mask bits.
fn key_kept(r: u32, j: u32) -> bool {
    return j >= row_lo[r] && j < row_hi[r]
        && ((p.flags & FLAG_MASK) == 0u || mask_bit(row_mbase[r], j));
}

// The weights of logits s against the max tmax: 0 for removed keys, at least MIN_WEIGHT else.
fn weight(s: RV, tmax: RV) -> RV {
    return select(RV(0.0), max(exp2(s - tmax), RV(MIN_WEIGHT)), s > RV(REMOVED_BELOW));
}

// Row r's logit (log2 units) for key j whose plain score is s, or MASKED if it is removed.
fn key_logit(r: u32, s: f32, j: u32) -> f32 {
    if !key_kept(r, j) {
        return MASKED;
    }
    if (p.flags & LOGIT_FLAGS) == 0u {
        return s;
    }
    // Shaped in natural units, where the removal rules are stated.
    let y = shape_logit(s * LN2, cur_b, cur_h, row_grow[r], j);
    return select(MASKED, y * LOG2E, y > REMOVED_BELOW);
}

// The entry point `main` (prelude) calls this with the invocation's row group (R rows) and
// its key lane: LANES invocations of one subgroup share a row group and take its keys in
// turn, pair by pair (pairs lane, lane + LANES, … of each tile), each with its own online
// softmax, merged at the end by `merge_lanes` (subgroup reductions). Without subgroups
// LANES = 1: one invocation per row group, lane 0.
fn attend(wg: vec3<u32>, li: u32, group: u32, key_lane: u32) {
    let lbh = wg.z;
    let bh = p.bh_offset + lbh;
    let hd = head_of(p, bh);
    cur_b = hd.b;
    cur_h = hd.h;
    cur_bh = bh;
    let split = wg.y;
    // The invocation's rows: row0 + r for r < R, those < p.rows live.
    let row0 = wg.x * BR + group * R;
    let live = row0 < p.rows;
    let key_begin = split * p.split_len;
    let key_end = min(p.n, key_begin + p.split_len);

    // Lengths are read from a read-only buffer at a workgroup-uniform index, so the key range
    // is uniform and may bound the tile loop with its barriers.
    let ql = q_len(hd.b);
    let kl = kv_len(hd.b);
    let keys = workgroup_keys(wg.x * BR, BR, KeyRange(key_begin, key_end), BC, ql, kl);
    let lo = keys.lo;
    let hi = keys.hi;

    // Per row: its key range and mask base, and its Q row. Tiles inside [whole_lo, whole_hi)
    // are whole for every live row of the invocation.
    let qs = p.scale * LOG2E;
    var whole_lo = 0u;
    var whole_hi = UNBOUNDED;
    for (var r = 0u; r < R; r++) {
        let grow = p.row_offset + row0 + r;
        row_grow[r] = grow;
        if row0 + r < p.rows {
            let rk = key_range(grow, ql, kl);
            row_lo[r] = rk.lo;
            row_hi[r] = rk.hi;
            row_mbase[r] = mask_row_base(hd.b, hd.h, grow);
            whole_lo = max(whole_lo, rk.lo);
            whole_hi = min(whole_hi, rk.hi);
        }
    }
    // Q and O rows by straight-line helpers (prelude): qr and acc are indexed by constants
    // only, so they can live in registers (a loop index would make them per-lane memory).
    let live_rows = min(R, p.rows - min(row0, p.rows));
    k_row0 = (hd.b * p.n * p.kv_heads + hd.hk) * p.d_k;
    v_row0 = (hd.b * p.n * p.kv_heads + hd.hk) * p.d_v;
    let q_row0 = ((hd.b * p.m + p.row_offset + row0) * p.q_heads + hd.h) * p.d_k;
    load_q_rows(q_row0, p.q_heads * p.d_k, live_rows, qs);
    // The block's max, sums and (in acc) O; the row's folded ones, relative to m_sum.
    var m = RV(MASKED);
    var l = RV(0.0);
    var t = RV(0.0);
    var m_sum = RV(MASKED);
    var l_sum = RV(0.0);
    var t_sum = RV(0.0);
    // Blocks of fold_tiles tiles (common/sums.wgsl), each folded into the row's sums after its
    // last tile: a loop of their own, as llvmpipe runs an if's body on every pass, taken or not.
    let block_keys = BC * fold_tiles(hi - lo);
    for (var b0 = lo; b0 < hi; b0 += block_keys) {
        let b1 = min(hi, b0 + block_keys);
        for (var t0 = b0; t0 < b1; t0 += BC) {
            let len = min(BC, hi - t0);
            tile_t0 = t0;
            tile_len = len;
            // Tile rows past len (an odd tile's last pair reads one, with weight 0): K repeats
            // key len − 1 (its score is left out), V is zero (0·V adds nothing, also where V
            // is ±∞). With broadcast loads the subgroup reads K and V itself: nothing is
            // staged, and no barrier waits for it.
            if !BROADCAST {
                for (var e = li; e < BC * DK4; e += WG) {
                    let c = min(e / DK4, len - 1u);
                    let kbase = ((hd.b * p.n + t0 + c) * p.kv_heads + hd.hk) * p.d_k;
                    k_tile[e] = load4_k(kbase, (e % DK4) * 4u, p.d_k);
                }
                for (var e = li; e < BC * DV4; e += WG) {
                    let c = e / DV4;
                    let j = t0 + min(c, len - 1u);
                    let vbase = ((hd.b * p.n + j) * p.kv_heads + hd.hk) * p.d_v;
                    let x = load4_v(vbase, (e % DV4) * 4u, p.d_v);
                    v_tile[e] = select(vec4<f32>(0.0), x, c < len);
                }
                workgroupBarrier();
            }
            let t1 = t0 + len;
            // The invocation skips tiles that none of its rows may see (a padding mask shared
            // by the rows skips whole tiles for all of them). With broadcast loads (BROADCAST)
            // the lanes of a subgroup load K and V rows together, so they take or skip each
            // tile together, and the plain loop only where it is plain for all of them; a lane
            // whose rows see none of a tile, or that has no live row, then adds only removed
            // keys.
            if subgroup_any(live && sees_block(t0, t1)) {
                var tmax = m;
                // ANY_MASKING (a specialization) is false when the call masks nothing: every
                // tile is whole then, and the compiler drops the per-key loop.
                let plain = (p.flags & (FLAG_MASK | LOGIT_FLAGS)) == 0u;
                let inside = whole_lo <= t0 && whole_hi >= t1;
                let whole = subgroup_all(!ANY_MASKING || (plain && inside));
                if whole {
                    // Two keys at a time: each Q vec4 read serves both (the pair's scores are
                    // the ones score_block gives). An odd tile's last pair also scores the row
                    // past its last key (a copy of it) and leaves it out, rather than finishing
                    // with one key: llvmpipe runs such a tail on every tile, taken or not (10%
                    // of decode's instructions).
                    for (var c = 2u * key_lane; c < len; c += 2u * LANES) {
                        score_pair(c);
                        tmax = max(tmax, max(sc[c], select(sc[c + 1u], RV(MASKED), c + 1u == len)));
                    }
                } else {
                    // The lane's keys: both of each of its pairs.
                    let far = 2u * LANES - 1u;
                    for (var c = 2u * key_lane; c < len; c += select(far, 1u, c % 2u == 0u)) {
                        let j = t0 + c;
                        var s = RV(MASKED);
                        if BROADCAST {
                            // Every lane loads its share of the key: scored before the branch.
                            let raw = score_block(c);
                            if keeps_block(j) {
                                s = logit_block(raw, j);
                            }
                        } else if keeps_block(j) {
                            s = logit_block(score_block(c), j);
                        }
                        sc[c] = s;
                        tmax = max(tmax, s);
                    }
                }
                let alpha = max(exp2(m - tmax), RV(MIN_WEIGHT));
                if ROW_STATS {
                    // Rebased from m to tmax: Σ p·(m − s) → alpha·(t + (tmax − m)·l).
                    t = alpha * (t + select(RV(0.0), (tmax - m) * l, l > RV(0.0)));
                }
                l *= alpha;
                rescale(alpha);
                // Removed keys (MASKED) weigh 0. Branchless on purpose: lanes of one row block
                // rarely agree on a bool mask, and a divergent branch around the accumulator
                // writes cost llvmpipe 2.6× on a 50% random mask; on GPUs the skipped lanes
                // would idle anyway. Two keys at a time, each accumulator updated by key c, then
                // key c + 1; past an odd tile's end key c + 1 weighs 0 (its V row is zero).
                // Whole tiles have no removed keys; others leave each row's O alone where its
                // weight is 0, so that a removed key's ±∞ adds nothing (kept_only is a constant
                // false where the call masks nothing: the kept variant is compiled out). Each
                // tile's l and t are summed on their own (common/sums.wgsl).
                let kept_only = ANY_MASKING && !whole;
                var l_tile = RV(0.0);
                var t_tile = RV(0.0);
                for (var c = 2u * key_lane; c < len; c += 2u * LANES) {
                    let pc = weight(sc[c], tmax);
                    let pd = select(weight(sc[c + 1u], tmax), RV(0.0), c + 1u == len);
                    l_tile += pc;
                    l_tile += pd;
                    if ROW_STATS {
                        t_tile += pc * (tmax - sc[c]);
                        t_tile += pd * (tmax - sc[c + 1u]);
                    }
                    if DROPOUT {
                        // O takes the weights after dropout (the dropped ones 0).
                        let j = t0 + c;
                        accumulate_pair_kept(dropped(pc, j), dropped(pd, j + 1u), c);
                    } else if kept_only {
                        accumulate_pair_kept(pc, pd, c);
                    } else {
                        accumulate_pair(pc, pd, c);
                    }
                }
                l += l_tile;
                t += t_tile;
                m = tmax;
            }
            if !BROADCAST {
                workgroupBarrier();
            }
        }
        let w = max(exp2(m_sum - m), RV(MIN_WEIGHT));
        if ROW_STATS {
            t_sum = fma(w, t_sum + select(RV(0.0), (m - m_sum) * l_sum, l_sum > RV(0.0)), t);
            t = RV(0.0);
        }
        l_sum = fma(w, l_sum, l);
        l = RV(0.0);
        fold_o(w);
        m_sum = m;
    }

    // Every lane of the subgroup takes part, live or not; lane 0 then holds the rows' state.
    merge_lanes(&m_sum, &l_sum, &t_sum);
    let o_row0 = (((split * p.batch + hd.b) * p.m + p.row_offset + row0) * p.q_heads + hd.h) * p.d_v;
    var inv_rows = select(RV(0.0), RV(1.0) / l_sum, l_sum > RV(0.0));
    if DROPOUT {
        inv_rows *= p.keep_scale;
    }
    store_o_rows(o_row0, p.q_heads * p.d_v, select(0u, live_rows, key_lane == 0u), inv_rows);
    let rows = p.batch * p.q_heads * p.m;
    for (var r = 0u; r < R; r++) {
        if key_lane == 0u && row0 + r < p.rows {
            let grow = row_grow[r];
            let lr = lane(l_sum, r);
            // l = 0 only when the row saw no key in this split: output 0 and LSE = −∞, never
            // 0/0.
            var inv = 0.0;
            var row_max = neg_inf();
            var log_sum = 0.0;
            if lr > 0.0 {
                inv = 1.0 / lr;
                row_max = lane(m_sum, r) * LN2;
                log_sum = log(lr);
            }
            let at = bh * p.m + grow;
            if (p.flags & FLAG_SPLIT_STATS) != 0u {
                lse[2u * split * rows + at] = row_max;
                lse[(2u * split + 1u) * rows + at] = log_sum;
            } else {
                lse[split * rows + at] = row_max + log_sum;
            }
            if ROW_STATS {
                var entropy = 0.0;
                if lr > 0.0 {
                    entropy = LN2 * (log2(lr) + lane(t_sum, r) / lr);
                }
                write_row_stats((2u * split) * rows + at, (2u * split + 1u) * rows + at, entropy, inv);
            }
        }
    }
}
