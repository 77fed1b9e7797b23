//! `flash`: fused online-softmax attention, also each split of split-K; its specialization
//! and the WGSL it generates per specialization (constants and straight-line helpers, see
//! shaders/flash.wgsl).

use crate::cpu;
use crate::dtype::Storage;
use crate::kernels::common::{any_masking, variant_suffix};
use crate::kernels::Access::{Read, ReadWrite, Uniform};
use crate::kernels::{looped, Access, KernelSpec, LoopCost};
use crate::params::{flags, AttnParams};

/// The specialization of `flash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flash {
    /// Head dim of Q/K, rounded up to a multiple of 4.
    pub dk: u32,
    /// Head dim of V, rounded up to a multiple of 4.
    pub dv: u32,
    /// Keys per K/V tile in workgroup memory.
    pub bc: u32,
    /// Query rows per workgroup.
    pub br: u32,
    /// Query rows per invocation (1, 2 or 4; divides `br`): each K/V element read from the
    /// tile serves all of them. The workgroup has `br / r` invocations.
    pub r: u32,
    /// Whether the call has any masking (lengths, window, mask, bias, softcap, segments).
    /// Without, every tile is whole and the per-key loop is compiled out: its mere presence
    /// slowed unmasked runs by up to 16% on llvmpipe.
    pub masked: bool,
    /// How Q, K and V are read.
    pub storage: Storage,
    /// Whether each row's entropy and focus are written too (`row_stats`).
    pub stats: bool,
    /// Whether Q, K, V and O are bound in units of four elements (vec4 loads and stores;
    /// both head dims divisible by 4), or element by element.
    pub wide: bool,
    /// Invocations per row group (1, or the device's fixed subgroup size): the lanes of one
    /// subgroup share R rows and take their keys in turn, merged by subgroup reductions at
    /// the end. The workgroup has `br / r · lanes` invocations.
    pub lanes: u32,
    /// Lanes that load each K/V row of the tile together, one vec4 each, and pass the vec4s
    /// on by `subgroupBroadcast` (the device's fixed subgroup size), or 1: each invocation
    /// loads every vec4 it reads (see `FusedConfig::broadcast_loads`).
    pub broadcast: u32,
    /// Whether O accumulates the weights dropped out (common/dropout.wgsl), the sums and the
    /// LSE staying those before dropout; without, the dropout code is compiled out.
    pub dropout: bool,
}

impl KernelSpec for Flash {
    type Params = AttnParams;
    const NAME: &'static str = "flash";
    const FILE: &'static str = include_str!("../../shaders/flash.wgsl");
    const LONG_LOOP: &'static str = "keys per split";

    fn bindings(&self) -> &'static [Access] {
        if self.stats {
            // … → o, lse, row_stats
            &[
                Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite,
            ]
        } else {
            // q, k, v, lens, mask, bias → o, lse
            &[
                Uniform, Read, Read, Read, Read, Read, Read, ReadWrite, ReadWrite,
            ]
        }
    }

    fn label(&self) -> String {
        let Flash {
            dk,
            dv,
            bc,
            br,
            r,
            masked,
            storage,
            stats,
            wide,
            lanes,
            broadcast,
            dropout,
        } = *self;
        let stats = if stats { "_stats" } else { "" };
        let dropout = if dropout { "_dropout" } else { "" };
        let wide = if wide { "" } else { "_scalar" };
        let mut lanes = if lanes > 1 {
            format!("_lanes{lanes}")
        } else {
            String::new()
        };
        if broadcast > 1 {
            lanes.push_str(&format!("_bcast{broadcast}"));
        }
        let variant = variant_suffix(storage, masked);
        format!(
            "xattn.flash_dk{dk}_dv{dv}_bc{bc}_br{br}_r{r}{lanes}{wide}{variant}{stats}{dropout}"
        )
    }

    fn workgroup_bytes(&self) -> u64 {
        u64::from(self.bc * (self.dk + self.dv)) * 4
    }

    /// Per tile of bc keys: the tile loop, the block loop and the tile loop's exit (once per
    /// block of tiles, counted for every tile), K and V staging (by br / r · lanes
    /// invocations), the mask-word scan of each of the r rows, the score loop over the lane's
    /// pairs of keys (per key, or per pair) and the
    /// accumulate loop (per pair). Fixed: the block loop's exit, the row set-up loop and the
    /// row loop writing the LSE (Q and O rows are loaded and stored straight-line; dropout's
    /// Philox too).
    fn loop_cost(&self, p: &AttnParams) -> (LoopCost, u64) {
        let [dk, dv, bc, br, r, lanes] =
            [self.dk, self.dv, self.bc, self.br, self.r, self.lanes].map(u64::from);
        let invocations = br / r * lanes;
        let pairs = bc.div_ceil(2 * lanes);
        // Each row's mask-word scan; in the masked variant without a bool mask the scan's
        // loop still runs its exit test (llvmpipe runs a branch's body, taken or not).
        let mask_words = if p.flags & flags::MASK != 0 {
            r * looped(bc.div_ceil(32) + 1)
        } else if self.masked {
            r * looped(0)
        } else {
            0
        };
        let cost = LoopCost {
            fixed: looped(0) + looped(r) + looped(r),
            per_step: 3
                + looped((bc * dk / 4).div_ceil(invocations))
                + looped((bc * dv / 4).div_ceil(invocations))
                + mask_words
                + looped(2 * pairs)
                + looped(pairs),
            step: bc,
        };
        (cost, u64::from(p.split_len.min(p.n)))
    }

    fn storages(&self) -> Vec<Storage> {
        vec![self.storage]
    }

    fn capabilities(&self) -> naga::valid::Capabilities {
        if self.lanes > 1 || self.broadcast > 1 {
            naga::valid::Capabilities::SUBGROUP
        } else {
            naga::valid::Capabilities::empty()
        }
    }

    fn prelude(&self) -> String {
        let mut out = self.storage.wgsl("Elem", &["q", "k", "v"], self.wide);
        out.push_str(&store4_o(self.wide));
        out.push_str(&flash_prelude(
            self.dk / 4,
            self.dv / 4,
            self.bc,
            (self.br, self.r, self.lanes),
            self.broadcast,
        ));
        out.push_str(&any_masking(self.masked));
        out.push_str(&format!("const ROW_STATS: bool = {};\n", self.stats));
        out.push_str(&dropped(self.r, self.dropout));
        out.push_str(if self.stats {
            "@group(0) @binding(9) var<storage, read_write> row_stats: array<f32>;\n\
             fn write_row_stats(i: u32, j: u32, entropy: f32, focus: f32) {\n    \
             row_stats[i] = entropy;\n    row_stats[j] = focus;\n}\n"
        } else {
            "fn write_row_stats(i: u32, j: u32, entropy: f32, focus: f32) {}\n"
        });
        out
    }

    fn twin(&self, p: &AttnParams, buffers: &mut [Vec<u32>]) {
        let tiles = (self.bc, self.br, self.r, self.lanes);
        cpu::flash::run(p, (tiles, self.storage, self.dropout), buffers)
    }
}

/// `DROPOUT` and `dropped(w, j)`: the R rows' weights `w` for key j with the dropped ones
/// zeroed (common/dropout.wgsl, the element of batch·head `cur_bh`, query `row_grow[i]`), or
/// `w` itself without dropout (then never called).
fn dropped(r: u32, dropout: bool) -> String {
    let body = if !dropout {
        "w".to_string()
    } else if r == 1 {
        "select(0.0, w, dropout_keeps(cur_bh, row_grow[0], j))".to_string()
    } else {
        let lanes: Vec<String> = (0..r)
            .map(|i| format!("select(0.0, w[{i}], dropout_keeps(cur_bh, row_grow[{i}], j))"))
            .collect();
        format!("RV({})", lanes.join(",\n        "))
    };
    format!(
        "const DROPOUT: bool = {dropout};\n\
         fn dropped(w: RV, j: u32) -> RV {{\n    return {body};\n}}\n"
    )
}

/// Flash's O binding (7) and `store4_o(base, d, x, len)`, which writes elements d..d + 4 of
/// x to the O row of `len` at `base`, those below `len`: one vec4 store where `wide`.
fn store4_o(wide: bool) -> String {
    let (elem, body) = if wide {
        ("vec4<f32>", "o[(base + d) >> 2u] = x;".to_string())
    } else {
        let stores: String = (0..4)
            .map(|u| {
                format!("\n    if d + {u}u < len {{\n        o[base + d + {u}u] = x[{u}];\n    }}")
            })
            .collect();
        ("f32", stores)
    };
    format!(
        "@group(0) @binding(7) var<storage, read_write> o: array<{elem}>;\n\
         fn store4_o(base: u32, d: u32, x: vec4<f32>, len: u32) {{\n    {body}\n}}\n"
    )
}

/// Constants and unrolled helpers of one flash specialization (see shaders/flash.wgsl): the
/// R rows' statistics travel as one `RV` (f32, vec2 or vec4: one lane per row), their Q rows
/// and O accumulators as `qr`/`acc`/`o_sum` slices of DK4/DV4 vec4s per row; every K/V vec4
/// read from the tile is used by all R rows before the next is read.
fn flash_prelude(
    dk4: u32,
    dv4: u32,
    bc: u32,
    (br, r, lanes): (u32, u32, u32),
    broadcast: u32,
) -> String {
    assert!(
        matches!(r, 1 | 2 | 4)
            && br % r == 0
            && lanes.is_power_of_two()
            && broadcast.is_power_of_two()
            && (lanes == 1 || broadcast == 1),
        "flash rows per invocation, lanes and broadcast"
    );
    let rows = 0..r;
    // Lane `i` of an RV named `v`.
    let lane = |v: &str, i: u32| {
        if r == 1 {
            v.to_string()
        } else {
            format!("{v}[{i}]")
        }
    };
    let rv = |parts: Vec<String>| {
        if r == 1 {
            parts.join("")
        } else {
            format!("RV({})", parts.join(", "))
        }
    };
    // The R rows' scores against the K row whose vec4s are named `{k}0, {k}1, …`: each a sum
    // of vec4 dot products in the order 0, 1, … (score_block and score_pair agree exactly).
    let sums = |k: &str| -> String {
        rv(rows
            .clone()
            .map(|row| {
                (0..dk4)
                    .map(|i| format!("dot(qr[{}], {k}{i})", row * dk4 + i))
                    .collect::<Vec<_>>()
                    .join("\n        + ")
            })
            .collect())
    };
    let mut score = String::new();
    let mut score_pair = String::new();
    if broadcast > 1 {
        // Lane `sg_lane` loads vec4 j·B + sg_lane of the key (pair) from K itself, B =
        // broadcast, and vec4 i comes from lane i % B of load i / B.
        score = broadcast_loads("k", &[("k", 0)], dk4, broadcast, false);
        score_pair = broadcast_loads("k", &[("k", 0), ("x", dk4)], dk4, broadcast, false);
    } else {
        score.push_str("    let base = c * DK4;\n");
        for i in 0..dk4 {
            score.push_str(&format!("    let k{i} = k_tile[base + {i}u];\n"));
            score_pair.push_str(&format!(
                "    let k{i} = k_tile[a + {i}u];\n    let x{i} = k_tile[a + DK4 + {i}u];\n"
            ));
        }
    }
    let mut scales = String::new();
    let mut folds = String::new();
    let mut add_pair = if broadcast > 1 {
        broadcast_loads("v", &[("v", 0), ("w", dv4)], dv4, broadcast, true)
    } else {
        String::new()
    };
    for i in 0..dv4 {
        if broadcast == 1 {
            add_pair.push_str(&format!(
                "    let v{i} = v_tile[a + {i}u];\n    let w{i} = v_tile[a + DV4 + {i}u];\n"
            ));
        }
    }
    // Only removed keys weigh 0: the kept variant leaves a row's O alone for them.
    let mut add_kept = add_pair.clone();
    add_kept.push_str("    let kc = pc > RV(0.0);\n    let kd = pd > RV(0.0);\n");
    for i in 0..dv4 {
        for row in rows.clone() {
            let a = row * dv4 + i;
            scales.push_str(&format!("    acc[{a}] *= {};\n", lane("alpha", row)));
            folds.push_str(&format!(
                "    o_sum[{a}] = fma(vec4<f32>({}), o_sum[{a}], acc[{a}]);\n    \
                 acc[{a}] = vec4<f32>(0.0);\n",
                lane("w", row)
            ));
            // Key c first, then key c + 1.
            let (pc, pd) = (lane("pc", row), lane("pd", row));
            add_pair.push_str(&format!(
                "    acc[{a}] = fma(vec4<f32>({pd}), w{i}, fma(vec4<f32>({pc}), v{i}, acc[{a}]));\n"
            ));
            add_kept.push_str(&format!(
                "    let x{a} = select(acc[{a}], fma(vec4<f32>({pc}), v{i}, acc[{a}]), {});\n    \
                 acc[{a}] = select(x{a}, fma(vec4<f32>({pd}), w{i}, x{a}), {});\n",
                lane("kc", row),
                lane("kd", row)
            ));
        }
    }
    let any = |f: &dyn Fn(u32) -> String| rows.clone().map(f).collect::<Vec<_>>().join(" | ");
    // The live rows' Q rows (pre-scaled) and O rows, row `i` at `base + i·stride`.
    let (mut q_rows, mut o_rows) = (String::new(), String::new());
    for row in rows.clone() {
        let at = format!("base + {row}u * stride");
        q_rows.push_str(&format!("    if {row}u < live {{\n        let b = {at};\n"));
        o_rows.push_str(&format!("    if {row}u < live {{\n        let b = {at};\n"));
        for i in 0..dk4 {
            q_rows.push_str(&format!(
                "        qr[{}] = load4_q(b, {}u, p.d_k) * qs;\n",
                row * dk4 + i,
                4 * i
            ));
        }
        for i in 0..dv4 {
            o_rows.push_str(&format!(
                "        store4_o(b, {}u, o_sum[{}] * {}, p.d_v);\n",
                4 * i,
                row * dv4 + i,
                lane("inv", row)
            ));
        }
        q_rows.push_str("    }\n");
        o_rows.push_str("    }\n");
    }
    // The entry point, and the merge of a row group's lanes: each lane's sum, O and Σ p·(m − s)
    // rebased from its own max to the group's (as flash.wgsl rebases per tile).
    let (entry, merge) = if lanes == 1 && broadcast > 1 {
        (
            "fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,\n    \
             @builtin(subgroup_invocation_id) sl: u32) {\n    \
             sg_lane = sl;\n    attend(wg, li, li, 0u);\n}\n",
            String::new(),
        )
    } else if lanes == 1 {
        (
            "fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {\n    \
             attend(wg, li, li, 0u);\n}\n",
            String::new(),
        )
    } else {
        let sums: String = (0..r * dv4)
            .map(|a| {
                format!(
                    "    o_sum[{a}] = subgroupAdd(o_sum[{a}] * {});\n",
                    lane("w", a / dv4)
                )
            })
            .collect();
        (
            "fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,\n    \
             @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) sl: u32) {\n    \
             attend(wg, li, sg, sl);\n}\n",
            format!(
                "    let mx = subgroupMax(*m);\n    let w = max(exp2(*m - mx), RV(MIN_WEIGHT));\n    \
                 if ROW_STATS {{\n        \
                 *t = subgroupAdd(w * (*t + select(RV(0.0), (mx - *m) * *l, *l > RV(0.0))));\n    }}\n    \
                 *l = subgroupAdd(w * *l);\n{sums}    *m = mx;\n"
            ),
        )
    };
    let rv_type = if r == 1 {
        "f32".to_string()
    } else {
        format!("vec{r}<f32>")
    };
    format!(
        "const DK4: u32 = {dk4}u;\nconst DV4: u32 = {dv4}u;\nconst BC: u32 = {bc}u;\n\
         const BR: u32 = {br}u;\nconst R: u32 = {r}u;\nconst LANES: u32 = {lanes}u;\n\
         const WG: u32 = {wg}u;\nconst BROADCAST: bool = {bcast};\nvar<private> sg_lane: u32;\n\
         alias RV = {rv_type};\n\
         fn lane(v: RV, i: u32) -> f32 {{\n    return {lane_i};\n}}\n\
         fn score_block(c: u32) -> RV {{\n{score}    return {score_k};\n}}\n\
         fn score_pair(c: u32) {{\n    let a = c * DK4;\n{score_pair}    \
         sc[c] = {score_k};\n    sc[c + 1u] = {score_x};\n}}\n\
         fn rescale(alpha: RV) {{\n{scales}}}\n\
         fn accumulate_pair(pc: RV, pd: RV, c: u32) {{\n    let a = c * DV4;\n{add_pair}}}\n\
         fn accumulate_pair_kept(pc: RV, pd: RV, c: u32) {{\n    let a = c * DV4;\n{add_kept}}}\n\
         fn fold_o(w: RV) {{\n{folds}}}\n\
         fn sees_block(t0: u32, t1: u32) -> bool {{\n    return {sees};\n}}\n\
         fn keeps_block(j: u32) -> bool {{\n    return {keeps};\n}}\n\
         fn logit_block(s: RV, j: u32) -> RV {{\n    return {logits};\n}}\n\
         fn load_q_rows(base: u32, stride: u32, live: u32, qs: f32) {{\n{q_rows}}}\n\
         fn store_o_rows(base: u32, stride: u32, live: u32, inv: RV) {{\n{o_rows}}}\n\
         fn merge_lanes(m: ptr<function, RV>, l: ptr<function, RV>, t: ptr<function, RV>) {{\n{merge}}}\n\
         fn subgroup_any(x: bool) -> bool {{\n    return {any_vote};\n}}\n\
         fn subgroup_all(x: bool) -> bool {{\n    return {all_vote};\n}}\n\
         @compute @workgroup_size(WG, 1, 1)\n{entry}",
        wg = br / r * lanes,
        bcast = broadcast > 1,
        any_vote = if broadcast > 1 { "subgroupAny(x)" } else { "x" },
        all_vote = if broadcast > 1 { "subgroupAll(x)" } else { "x" },
        lane_i = if r == 1 { "v" } else { "v[i]" },
        score_k = sums("k"),
        score_x = sums("x"),
        sees = any(&|i| format!("row_sees({i}u, t0, t1)")),
        keeps = any(&|i| format!("key_kept({i}u, j)")),
        logits = rv(rows
            .clone()
            .map(|i| format!("key_logit({i}u, {}, j)", lane("s", i)))
            .collect()),
    )
}

/// Straight-line loads of the rows of keys `c`, `c + 1`, … of the tile (`names.len()` keys,
/// `n` vec4s each) from `array` (`k` or `v`) by a subgroup of `b` lanes: lane `sg_lane` loads
/// vec4 `j·b + sg_lane` of them (clamped to the last), then `{name}{i}` is vec4 `i` of its key,
/// taken by `subgroupBroadcast` from the lane that loaded it. A key past the tile's end reads
/// its last key, as zero where `zero_past_end` (only loads that reach past key `c` test it).
/// Every lane of the subgroup must run it.
fn broadcast_loads(
    array: &str,
    names: &[(&str, u32)],
    n: u32,
    b: u32,
    zero_past_end: bool,
) -> String {
    let total = names
        .iter()
        .map(|(_, offset)| offset + n)
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for j in 0..total.div_ceil(b) {
        let load = format!(
            "load4_{array}({array}_row(tile_t0 + min({array}c{j}, tile_len - 1u)), \
             4u * (e{j} % {n}u), p.d_{array})"
        );
        // Key c is in the tile; the load's last vec4 tells whether it reaches another.
        let last = (j * b + b - 1).min(total - 1);
        let load = if zero_past_end && last >= n {
            format!("select(vec4<f32>(0.0), {load}, {array}c{j} < tile_len)")
        } else {
            load
        };
        out.push_str(&format!(
            "    let e{j} = min({}u + sg_lane, {}u);\n    \
             let {array}c{j} = c + e{j} / {n}u;\n    \
             let {array}w{j} = {load};\n",
            j * b,
            total - 1,
        ));
    }
    for (name, offset) in names {
        for i in 0..n {
            let e = offset + i;
            out.push_str(&format!(
                "    let {name}{i} = subgroupBroadcast({array}w{}, {}u);\n",
                e / b,
                e % b
            ));
        }
    }
    out
}
