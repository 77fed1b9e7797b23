//! Accuracy at the edges, on the GPU (every path, every fused configuration the device plans)
//! and through the CPU twins (every configuration, matrix units included):
//! - ±∞ in V: O is ±∞ where the f64 reference has ±∞ and NaN where it has NaN (+∞ and −∞
//!   with weight in one row), whichever key holds them (the first, the last of a tile, the
//!   last, all); a removed key (masked, past the keys) adds nothing, ±∞ or not;
//! - long sums: a decode row over 24,000 keys keeps O, LSE, entropy and focus within budgets
//!   derived from pairwise summation (ε·log2 N), not from one running sum (ε·N).

mod common;

use common::*;
use std::collections::HashMap;

use xattn::cpu::program::{floats, run, words, HostBuffers};
use xattn::cpu::reference;
use xattn::kernels::Kernel;
use xattn::mask::Masking;
use xattn::plan::{DeviceCaps, MatrixUnits, Plan, Request};
use xattn::{Alignment, Attention, AttnShape, Engine, FusedConfig, HostOutput, Path, Stats};

const EPS: f64 = f32::EPSILON as f64;

/// Every (path, configuration) to run on the GPU: three-pass once, fused and split-K in each
/// configuration. On GL, where each specialization compiles slowly, a rotating spread of
/// them (`case` picks which), as tests/flash_rows.rs does.
fn gpu_variants(engine: &Engine, s: &AttnShape, case: usize) -> Vec<(Path, Option<FusedConfig>)> {
    let mut out = vec![(Path::ThreePass, None)];
    let fused: Vec<(Path, Option<FusedConfig>)> = [Path::Fused, Path::SplitK]
        .into_iter()
        .flat_map(|path| {
            configs_for(engine, s)
                .into_iter()
                .map(move |c| (path, Some(c)))
        })
        .collect();
    let n = fused.len();
    out.extend(
        fused
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !on_gl(engine) || i % 4 == case % 4 || i % n == case % n)
            .map(|(_, v)| v),
    );
    out
}

fn with_variant(opts: &Attention, (path, config): (Path, Option<FusedConfig>)) -> Attention {
    let o = opts.clone().with_path(path);
    match config {
        Some(c) => o.with_fused_config(c),
        None => o,
    }
}

fn variant_name((path, config): (Path, Option<FusedConfig>)) -> String {
    match config {
        Some(c) => format!("{} {c}", path.name()),
        None => path.name().to_string(),
    }
}

/// Planner caps with matrix units of both input types (16×16 with f16 inputs, 8×8 with f32),
/// as tests/cpu_twins.rs uses them.
fn matrix_caps() -> DeviceCaps {
    DeviceCaps {
        matrix_units: Some(MatrixUnits {
            f32_tile: Some(8),
            f16_tile: Some(16),
        }),
        max_workgroup_bytes: 48 << 10,
        ..CAPS
    }
}

/// The plans of `req` for the CPU twins: the planner's own and, for the fused paths, one per
/// configuration of the flash kernel and one on matrix units (without row statistics, which
/// the matrix-unit kernel does not write).
fn twin_plans(req: &Request) -> Vec<(String, Plan)> {
    let mut out = vec![("auto".to_string(), Plan::new(req, &CAPS).unwrap())];
    if req.path == Some(Path::ThreePass) {
        return out;
    }
    for config in FusedConfig::ALL {
        let plan = Plan::new(&req.clone().with_fused_config(config), &CAPS).unwrap();
        out.push((config.to_string(), plan));
    }
    if !req.stats.any() {
        let forced = req.clone().with_fused_config(FusedConfig::MATRIX_UNITS);
        let plan = Plan::new(&forced, &matrix_caps()).unwrap();
        assert!(
            plan.program()
                .dispatches()
                .any(|d| matches!(d.kernel, Kernel::FlashCoop(_))),
            "{plan}"
        );
        out.push(("matrix units".to_string(), plan));
    }
    out
}

/// Runs `plan` with the CPU executor (every kernel by its twin): O, LSE, entropy and focus
/// (the statistics empty where not asked for).
fn run_twins(plan: &Plan, (q, k, v): (&[f32], &[f32], &[f32]), masking: &Masking) -> HostOutput {
    let io = plan.io();
    let s = plan.shape();
    let mut inputs: HostBuffers = HashMap::from([
        (io.lens, masking.lens_words(&s)),
        (io.mask, masking.mask_words().unwrap_or(vec![0])),
        (io.bias, words(&masking.bias_values().unwrap_or(vec![0.0]))),
    ]);
    inputs.extend([(io.q, words(q)), (io.k, words(k)), (io.v, words(v))]);
    let mut out = run(plan.program(), &inputs).unwrap();
    let mut take = |id| floats(&out.remove(&id).unwrap());
    HostOutput {
        o: take(io.o),
        lse: take(io.lse),
        weights: None,
        stats: xattn::stats::StatsOutput {
            entropy: io.stats.entropy.map(&mut take),
            focus: io.stats.focus.map(&mut take),
            coverage: None,
            pooled: None,
        },
    }
}

/// Asserts that every element of `got` is what the reference's is: NaN where it is NaN, the
/// same infinity where it is infinite, within `tol` where it is finite. Reports the worst
/// finite error.
fn assert_matches(what: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            f64::from(g) == w
        } else {
            let err = (f64::from(g) - w).abs();
            worst = worst.max(err);
            err <= tol
        };
        assert!(
            ok,
            "{what}: element {i} is {g}, reference {w} (tolerance {tol:e})"
        );
    }
    worst
}

// ---------------------------------------------------------------------------------------
// ±∞ in V

/// Shapes for the infinity cases: a decode-like row over 301 keys (32-key tiles at d 64, an
/// odd last tile), 70 rows over 77 keys with GQA (64-key tiles, an odd last tile, row blocks
/// past M), and head dims read element by element (3, 5) over one odd tile of 33 keys.
fn infinity_shapes() -> Vec<AttnShape> {
    vec![
        shape(1, 1, 301, 2, 2, 64),
        AttnShape {
            batch: 1,
            m: 70,
            n: 77,
            q_heads: 2,
            kv_heads: 1,
            d_k: 8,
            d_v: 8,
        },
        AttnShape {
            batch: 2,
            m: 5,
            n: 33,
            q_heads: 3,
            kv_heads: 3,
            d_k: 3,
            d_v: 5,
        },
    ]
}

/// Values to set in V, as (key, dim, value) for every batch and KV head.
type Values = Vec<(usize, usize, f32)>;

/// Where the infinities go: the first key, the last key of a 32- and of a 64-key tile, the
/// last key (each sign, alone and with the other sign in another dim), every key, and +∞ and
/// −∞ in one dim (NaN).
fn infinity_cases(n: usize) -> Vec<(String, Values)> {
    let (inf, ninf) = (f32::INFINITY, f32::NEG_INFINITY);
    let mut cases = vec![
        ("+∞ at the first key".to_string(), vec![(0, 0, inf)]),
        ("+∞ at the last key".to_string(), vec![(n - 1, 0, inf)]),
        ("−∞ at the last key".to_string(), vec![(n - 1, 0, ninf)]),
        (
            "+∞ and −∞ in two dims of the last key".to_string(),
            vec![(n - 1, 0, inf), (n - 1, 1, ninf)],
        ),
        (
            "+∞ and −∞ in one dim (NaN)".to_string(),
            vec![(0, 1, inf), (n - 1, 1, ninf)],
        ),
        (
            "+∞ and −∞ in two dims of every key".to_string(),
            (0..n).flat_map(|j| [(j, 0, inf), (j, 1, ninf)]).collect(),
        ),
    ];
    for last in [31, 63] {
        if last < n - 1 {
            cases.push((
                format!("−∞ at the last key of tile [0, {})", last + 1),
                vec![(last, 0, ninf)],
            ));
        }
    }
    cases
}

/// `v` with `values` set at (key, dim) for every batch and KV head.
fn with_values(s: &AttnShape, v: &[f32], values: &[(usize, usize, f32)]) -> Vec<f32> {
    let mut v = v.to_vec();
    for b in 0..s.batch {
        for hk in 0..s.kv_heads {
            for &(j, d, x) in values {
                v[((b * s.n + j) * s.kv_heads + hk) * s.d_v + d] = x;
            }
        }
    }
    v
}

/// V with every element +∞.
fn all_infinite(v: &[f32]) -> Vec<f32> {
    vec![f32::INFINITY; v.len()]
}

/// One case of ±∞ in V: its name, V, the reference, the tolerances of finite O and LSE.
struct InfCase {
    name: String,
    v: Vec<f32>,
    want: reference::Reference,
    tol_o: f64,
    tol_lse: f64,
}

/// The cases of [`infinity_cases`] and "+∞ in every element" on `s`'s seeded inputs: Q, K
/// and the cases.
fn infinity_inputs(
    s: &AttnShape,
    seed: u64,
    opts: &Attention,
) -> (Vec<f32>, Vec<f32>, Vec<InfCase>) {
    let (q, k, v) = qkv(s, 1.0, seed);
    let scale = opts.scale_for(s.d_k);
    let m = opts.masking();
    // Finite elements are held to the f32 budget of the finite values.
    let tol = budget_masked(s, scale, (&q, &k, &v), m);
    let mut cases: Vec<(String, Vec<f32>)> = infinity_cases(s.n)
        .into_iter()
        .map(|(name, values)| (name, with_values(s, &v, &values)))
        .collect();
    cases.push(("+∞ in every element".to_string(), all_infinite(&v)));
    let out = cases
        .into_iter()
        .map(|(name, v)| {
            let want = reference::attention_masked(s, &q, &k, &v, f64::from(scale), m);
            assert!(
                want.o.iter().any(|x| !x.is_finite()),
                "{name}: the reference has no infinity"
            );
            let lse_max = want.lse.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            InfCase {
                name,
                v,
                want,
                tol_o: tol.o,
                tol_lse: tol.lse * (1.0 + lse_max),
            }
        })
        .collect();
    (q, k, out)
}

#[test]
fn infinite_values_give_the_references_infinities_on_every_path() {
    let Some(engine) = engine() else { return };
    for (si, s) in infinity_shapes().into_iter().enumerate() {
        let opts = Attention::default();
        let (q, k, cases) = infinity_inputs(&s, 2100 + si as u64, &opts);
        for (ci, case) in cases.iter().enumerate() {
            for variant in gpu_variants(engine, &s, ci) {
                let o = with_variant(&opts, variant);
                let what = format!("{} {} {s}", variant_name(variant), case.name);
                let (plan, got) = run_poisoned(engine, &s, (&q, &k, &case.v), &o)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(plan.path(), variant.0, "{what}");
                assert_matches(&format!("{what} O"), &got.o, &case.want.o, case.tol_o);
                assert_matches(
                    &format!("{what} LSE"),
                    &got.lse,
                    &case.want.lse,
                    case.tol_lse,
                );
            }
        }
    }
}

/// `v` with `values` written in, the f64 reference on it, and the budget of the same inputs
/// with those values 0 (an infinity's own error is checked exactly by `assert_matches`).
fn with_infinities(
    s: &AttnShape,
    opts: &Attention,
    (q, k, v): (&[f32], &[f32], &[f32]),
    values: &[(usize, usize, f32)],
) -> (Vec<f32>, reference::Reference, Budget) {
    let v = with_values(s, v, values);
    let scale = opts.scale_for(s.d_k);
    let m = opts.masking();
    let want = reference::attention_masked(s, q, k, &v, f64::from(scale), m);
    let zeros: Vec<_> = values.iter().map(|&(j, d, _)| (j, d, 0.0)).collect();
    let tol = budget_masked(s, scale, (q, k, &with_values(s, &v, &zeros)), m);
    (v, want, tol)
}

/// Masks that remove keys holding ±∞ for some rows and not others: those rows stay finite.
fn masked_infinity_cases() -> Vec<(String, AttnShape, Attention, Values)> {
    let (inf, ninf) = (f32::INFINITY, f32::NEG_INFINITY);
    let tall = AttnShape {
        batch: 1,
        m: 70,
        n: 77,
        q_heads: 2,
        kv_heads: 1,
        d_k: 8,
        d_v: 8,
    };
    let values = vec![(76, 0, inf), (40, 1, ninf), (3, 2, inf), (63, 3, ninf)];
    vec![
        (
            // Row i sees keys ≤ i + 7: key 76 only the last row, key 40 rows ≥ 33.
            "causal bottom-right".to_string(),
            tall,
            Attention::default().with_causal(Alignment::BottomRight),
            values.clone(),
        ),
        (
            "mask [1,1,M,N]".to_string(),
            tall,
            Attention::default().with_mask([1, 1, 70, 77], random_bools(70 * 77, 0.5, 2201)),
            values.clone(),
        ),
        (
            // Key 76 lies past kv_len = 41, key 40 is the last kept one: the tile that ends
            // the keys is odd, its last pair reads the row past it.
            "kv_lens 41".to_string(),
            tall,
            Attention::default().with_kv_lens(vec![41]),
            values,
        ),
        (
            "window top-left, decode-like".to_string(),
            shape(1, 3, 301, 2, 2, 64),
            Attention::default().with_window(Alignment::TopLeft, 0, 100),
            vec![(300, 0, inf), (101, 1, ninf), (31, 2, inf)],
        ),
    ]
}

/// Every path: three-pass's `weighted_sum` adds nothing for a weight of exactly 0 (a removed
/// key) where the call has masking.
#[test]
fn removed_keys_with_infinite_values_add_nothing() {
    let Some(engine) = engine() else { return };
    for (i, (name, s, opts, values)) in masked_infinity_cases().into_iter().enumerate() {
        let (q, k, v) = qkv(&s, 1.0, 2300 + i as u64);
        let (v, want, tol) = with_infinities(&s, &opts, (&q, &k, &v), &values);
        assert!(want.o.iter().any(|x| x.is_infinite()), "{name}");
        for variant in gpu_variants(engine, &s, i) {
            let o = with_variant(&opts, variant);
            let what = format!("{} {name} {s}", variant_name(variant));
            let (_, got) = run_poisoned(engine, &s, (&q, &k, &v), &o)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_matches(&format!("{what} O"), &got.o, &want.o, tol.o);
        }
    }
}

/// Decode rows over 77 keys whose logits are 0 but for key 5's, 120 below (a weight of
/// e^−120 ≈ 8e−53 in the reference, 0 in f32), whose V holds +∞ in dim 0 and −∞ in dim 1:
/// (shape, scale, Q, K, V). Every path that keeps the key's weight above 0 gives ±∞ there.
fn tiny_weight_case() -> (AttnShape, f32, Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = shape(1, 1, 77, 2, 2, 4);
    let q: Vec<f32> = [1.0, 0.0, 0.0, 0.0].repeat(2);
    let mut k = vec![0.0; 77 * 2 * 4];
    for h in 0..2 {
        k[(5 * 2 + h) * 4] = -120.0;
    }
    let (_, _, v) = qkv(&s, 1.0, 2450);
    let v = with_values(&s, &v, &[(5, 0, f32::INFINITY), (5, 1, f32::NEG_INFINITY)]);
    (s, 1.0, q, k, v)
}

/// Every path: three-pass's `softmax_rows` keeps a kept key's weight at least MIN_WEIGHT.
#[test]
fn a_kept_key_whose_weight_underflows_keeps_its_infinity() {
    let Some(engine) = engine() else { return };
    let (s, scale, q, k, v) = tiny_weight_case();
    let want = reference::attention(&s, &q, &k, &v, f64::from(scale));
    assert!(want.o[0].is_infinite() && want.o[1].is_infinite());
    let opts = Attention::default().with_scale(scale);
    for variant in gpu_variants(engine, &s, 0).into_iter() {
        let what = format!("{} tiny weight {s}", variant_name(variant));
        let (_, got) = run_poisoned(engine, &s, (&q, &k, &v), &with_variant(&opts, variant))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_matches(&format!("{what} O"), &got.o, &want.o, 1e-6);
    }
    for path in [Path::Fused, Path::SplitK] {
        let req = opts.clone().with_path(path).request(s).unwrap();
        for (config, plan) in twin_plans(&req) {
            let what = format!("twin {} {config} tiny weight {s}", path.name());
            let got = run_twins(&plan, (&q, &k, &v), opts.masking());
            assert_matches(&format!("{what} O"), &got.o, &want.o, 1e-6);
        }
    }
}

#[test]
fn twins_give_the_references_infinities() {
    for (si, s) in infinity_shapes().into_iter().enumerate() {
        let opts = Attention::default();
        let (q, k, cases) = infinity_inputs(&s, 2100 + si as u64, &opts);
        for case in &cases {
            for path in Path::ALL {
                let req = opts.clone().with_path(path).request(s).unwrap();
                for (config, plan) in twin_plans(&req) {
                    let what = format!("twin {} {config} {} {s}", path.name(), case.name);
                    let got = run_twins(&plan, (&q, &k, &case.v), opts.masking());
                    assert_matches(&format!("{what} O"), &got.o, &case.want.o, case.tol_o);
                    assert_matches(
                        &format!("{what} LSE"),
                        &got.lse,
                        &case.want.lse,
                        case.tol_lse,
                    );
                }
            }
        }
    }
    for (name, s, opts, values) in masked_infinity_cases() {
        let (q, k, v) = qkv(&s, 1.0, 2400);
        let (v, want, tol) = with_infinities(&s, &opts, (&q, &k, &v), &values);
        for path in [Path::Fused, Path::SplitK] {
            let req = opts.clone().with_path(path).request(s).unwrap();
            for (config, plan) in twin_plans(&req) {
                let what = format!("twin {} {config} {name} {s}", path.name());
                let got = run_twins(&plan, (&q, &k, &v), opts.masking());
                assert_matches(&format!("{what} O"), &got.o, &want.o, tol.o);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Long sums

/// Decode: one query row, 8 heads, d 64, over `n` keys.
fn decode(n: usize) -> AttnShape {
    decode_heads(n, 8)
}

/// Decode with `heads` heads (each head's row is a sum of its own over the `n` keys).
fn decode_heads(n: usize, heads: usize) -> AttnShape {
    shape(1, 1, n, heads, heads, 64)
}

/// The scale whose product with log2 e in f32 is exactly 1/8, the factor the fused kernels
/// apply to Q: with Q and K in sixteenths (|q·k| < 2^12), every logit is exact in f32 on every
/// path, so that what remains of the error is the exponentials' and the sums'.
fn exact_scale() -> f32 {
    let mut s = (0.125f64 / std::f64::consts::LOG2_E) as f32;
    for _ in 0..8 {
        let x = s * std::f32::consts::LOG2_E;
        if x == 0.125 {
            return s;
        }
        s = if x > 0.125 {
            f32::from_bits(s.to_bits() - 1)
        } else {
            f32::from_bits(s.to_bits() + 1)
        };
    }
    panic!("no f32 scale with scale·log2 e = 1/8");
}

/// Integers in [-a, a] over 16, seeded.
fn sixteenths(len: usize, a: i32, seed: u64) -> Vec<f32> {
    random(len, 1.0, seed)
        .into_iter()
        .map(|x| ((x * (a as f32 + 0.5)).round()).clamp(-a as f32, a as f32) / 16.0)
        .collect()
}

/// Long-sum inputs on `s` (Q, K in sixteenths, so exact logits; V uniform): `peaky`, decode's
/// logits up to about ±20 with V in [-1, 1]; else flat logits (|s| < 2) with V in [0, 1], where
/// every key weighs about the same and O is a long sum of positive terms.
fn long_inputs(s: &AttnShape, peaky: bool, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = |d: [usize; 4]| d.iter().product::<usize>();
    let a = if peaky { 72 } else { 16 };
    let q = sixteenths(n(s.q_dims()), a, seed);
    let k = sixteenths(n(s.k_dims()), a, seed + 1);
    let v = random(n(s.v_dims()), 1.0, seed + 2);
    let v = if peaky {
        v
    } else {
        v.into_iter().map(|x| 0.5 + 0.5 * x).collect()
    };
    (q, k, v)
}

/// What the reference says of each row of a long decode: its LSE, entropy, focus and
/// x̄ = Σ_j P_j·(max − s_j)·log2 e, the mean distance (log2 units) of a weight's exponent
/// from the max under the weights.
struct RowFacts {
    entropy: Vec<f64>,
    focus: Vec<f64>,
    spread: Vec<f64>,
}

fn row_facts(s: &AttnShape, scale: f32, q: &[f32], k: &[f32]) -> RowFacts {
    let (mut entropy, mut focus, mut spread) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.m {
                let hk = h / (s.q_heads / s.kv_heads);
                let qrow = &q[((b * s.m + i) * s.q_heads + h) * s.d_k..][..s.d_k];
                let logits: Vec<f64> = (0..s.n)
                    .map(|j| {
                        let krow = &k[((b * s.n + j) * s.kv_heads + hk) * s.d_k..][..s.d_k];
                        let dot: f64 = qrow
                            .iter()
                            .zip(krow)
                            .map(|(&x, &y)| f64::from(x) * f64::from(y))
                            .sum();
                        dot * f64::from(scale)
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = logits.iter().map(|x| (x - max).exp()).sum();
                let p = |x: f64| (x - max).exp() / sum;
                entropy.push(logits.iter().map(|&x| -p(x) * (p(x)).ln()).sum());
                focus.push(1.0 / sum);
                spread.push(
                    logits
                        .iter()
                        .map(|&x| p(x) * (max - x) * std::f64::consts::LOG2_E)
                        .sum(),
                );
            }
        }
    }
    RowFacts {
        entropy,
        focus,
        spread,
    }
}

/// Error budgets of a long row from pairwise summation. With exact logits, each weight
/// exp2(s − max) is off by at most (3 + 2·|s − max|) ulp (WGSL's bound for exp2), on average
/// under the weights ε·(3 + 2·x̄); a sum of N weights summed pairwise is off by at most
/// ε·⌈log2 N⌉ relative, and O = Σ p·v / Σ p, a ratio of two such sums, by twice that relative
/// to max|v|; the final division, logarithm and rescaling add a few ε of the result. A single
/// running sum would be off by up to ε·N; its typical error, ε·√N, is what these exclude at
/// long N. Returns (O, LSE, entropy, focus) per row, O's absolute.
struct LongBudget {
    o: Vec<f64>,
    lse: Vec<f64>,
    entropy: Vec<f64>,
    focus: Vec<f64>,
}

fn long_budget(s: &AttnShape, facts: &RowFacts, lse: &[f64], v: &[f32]) -> LongBudget {
    let log_n = (s.n as f64).log2().ceil();
    let amax_v = v.iter().fold(0.0f64, |a, &x| a.max(f64::from(x.abs())));
    let per_row = |f: &dyn Fn(usize, f64) -> f64| -> Vec<f64> {
        facts
            .spread
            .iter()
            .enumerate()
            .map(|(r, &x)| f(r, EPS * (log_n + 3.0 + 2.0 * x)))
            .collect()
    };
    LongBudget {
        o: per_row(&|_, sum| (2.0 * sum + 4.0 * EPS) * amax_v),
        lse: per_row(&|r, sum| sum + 4.0 * EPS * (1.0 + lse[r].abs())),
        // H = ln 2·(log2 l + t/l), t = Σ p·(max − s) = x̄·l (log2 units): off by l's relative
        // error, and by ln 2·x̄ times those of t and l.
        entropy: per_row(&|r, sum| {
            sum * (1.0 + 2.0 * facts.spread[r]) + 4.0 * EPS * (1.0 + facts.entropy[r])
        }),
        focus: per_row(&|r, sum| (sum + 4.0 * EPS) * facts.focus[r]),
    }
}

/// Asserts row by row: |got − want| ≤ tol[row] (`per_row` elements per row); returns the
/// largest error over tolerance.
fn assert_rows(what: &str, got: &[f32], want: &[f64], tol: &[f64], per_row: usize) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let t = tol[i / per_row];
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= t,
            "{what}: element {i} is {g}, reference {w} (error {err:e} = {:.1} ε > tolerance \
             {t:e} = {:.1} ε)",
            err / EPS,
            t / EPS
        );
        worst = worst.max(err / t);
    }
    worst
}

/// Rows of the decode shape: O's elements are ordered [batch, M, heads, d_v], the row
/// statistics [batch, heads, M]; with M = 1 both are by head.
fn check_long(
    what: &str,
    s: &AttnShape,
    got: &HostOutput,
    want: &reference::Reference,
    b: &LongBudget,
    facts: &RowFacts,
) {
    assert_eq!(s.m, 1, "rows by head");
    assert_rows(&format!("{what} O"), &got.o, &want.o, &b.o, s.d_v);
    assert_rows(&format!("{what} LSE"), &got.lse, &want.lse, &b.lse, 1);
    if let Some(e) = &got.stats.entropy {
        assert_rows(&format!("{what} entropy"), e, &facts.entropy, &b.entropy, 1);
    }
    if let Some(f) = &got.stats.focus {
        assert_rows(&format!("{what} focus"), f, &facts.focus, &b.focus, 1);
    }
}

const LONG: usize = 24_000;

#[test]
fn long_decode_sums_stay_within_pairwise_budgets() {
    let Some(engine) = engine() else { return };
    let s = decode(LONG);
    let scale = exact_scale();
    for (i, peaky) in [true, false].into_iter().enumerate() {
        let (q, k, v) = long_inputs(&s, peaky, 2500 + 10 * i as u64);
        let want = reference::attention(&s, &q, &k, &v, f64::from(scale));
        let facts = row_facts(&s, scale, &q, &k);
        let budget = long_budget(&s, &facts, &want.lse, &v);
        let kind = if peaky { "peaky" } else { "flat" };
        let opts = Attention::default().with_scale(scale).with_stats(Stats {
            entropy: true,
            focus: true,
            coverage: false,
        });
        for variant in gpu_variants(engine, &s, i)
            .into_iter()
            .filter(|v| v.0 != Path::ThreePass)
        {
            let o = with_variant(&opts, variant);
            let what = format!("{} {kind} {s}", variant_name(variant));
            let (_, got) = run_poisoned(engine, &s, (&q, &k, &v), &o)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            check_long(&what, &s, &got, &want, &budget, &facts);
        }
    }
}

/// The twins run unoptimized on the CPU (debug tests): two heads, so four rows of LONG keys,
/// peaky and flat — the sums per row are the GPU test's, in a quarter of its rows.
#[test]
fn twins_keep_long_decode_sums_within_pairwise_budgets() {
    let s = decode_heads(LONG, 2);
    let scale = exact_scale();
    for (i, peaky) in [true, false].into_iter().enumerate() {
        let (q, k, v) = long_inputs(&s, peaky, 2500 + 10 * i as u64);
        let want = reference::attention(&s, &q, &k, &v, f64::from(scale));
        let facts = row_facts(&s, scale, &q, &k);
        let budget = long_budget(&s, &facts, &want.lse, &v);
        let kind = if peaky { "peaky" } else { "flat" };
        for path in [Path::Fused, Path::SplitK] {
            for stats in [false, true] {
                let mut opts = Attention::default().with_scale(scale).with_path(path);
                if stats {
                    opts = opts.with_stats(Stats {
                        entropy: true,
                        focus: true,
                        coverage: false,
                    });
                }
                let req = opts.request(s).unwrap();
                for (config, plan) in twin_plans(&req) {
                    let what = format!("twin {} {config} {kind} {s}", path.name());
                    let got = run_twins(&plan, (&q, &k, &v), opts.masking());
                    check_long(&what, &s, &got, &want, &budget, &facts);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The error table of issue 21

/// numpy's pairwise sum (blocks of 8 partial sums up to 128 terms, halves above).
fn pairwise(x: &[f32]) -> f32 {
    let n = x.len();
    if n < 8 {
        return x.iter().fold(0.0, |a, &y| a + y);
    }
    if n <= 128 {
        let mut r: [f32; 8] = x[..8].try_into().expect("8 terms");
        let whole = n - n % 8;
        for i in (8..whole).step_by(8) {
            for (j, r) in r.iter_mut().enumerate() {
                *r += x[i + j];
            }
        }
        let mut sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &y in &x[whole..] {
            sum += y;
        }
        return sum;
    }
    let mut half = n / 2;
    half -= half % 8;
    pairwise(&x[..half]) + pairwise(&x[half..])
}

/// A plain f32 softmax attention as numpy or torch computes it on the CPU, with pairwise
/// sums: logits in f32, p = exp(s − max), l = Σ p, P = p / l, O = Σ P·v, LSE = max + ln l,
/// focus = max P, entropy = −Σ P ln P. Returns (O, LSE, entropy, focus).
fn pairwise_f32(
    s: &AttnShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!((s.batch, s.m), (1, 1), "decode rows");
    let (mut o, mut lse, mut entropy, mut focus) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for h in 0..s.q_heads {
        let hk = h / (s.q_heads / s.kv_heads);
        let qrow = &q[h * s.d_k..][..s.d_k];
        let logits: Vec<f32> = (0..s.n)
            .map(|j| {
                let krow = &k[(j * s.kv_heads + hk) * s.d_k..][..s.d_k];
                qrow.iter()
                    .zip(krow)
                    .fold(0.0f32, |a, (&x, &y)| x.mul_add(y, a))
                    * scale
            })
            .collect();
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
        let l = pairwise(&e);
        let p: Vec<f32> = e.iter().map(|x| x / l).collect();
        lse.push(max + l.ln());
        focus.push(p.iter().cloned().fold(0.0, f32::max));
        let plogp: Vec<f32> = p
            .iter()
            .map(|&x| if x > 0.0 { -x * x.ln() } else { 0.0 })
            .collect();
        entropy.push(pairwise(&plogp));
        for d in 0..s.d_v {
            let terms: Vec<f32> = (0..s.n)
                .map(|j| p[j] * v[(j * s.kv_heads + hk) * s.d_v + d])
                .collect();
            o.push(pairwise(&terms));
        }
    }
    (o, lse, entropy, focus)
}

fn max_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .fold(0.0f64, |a, (&g, &w)| a.max((f64::from(g) - w).abs()))
}

/// The errors against f64 of decode over 1,500, 6,000 and 24,000 keys (8 heads, d 64, Q and K
/// uniform in [-4, 4], so logits up to about ±21, V in [-1, 1], scale 1/8) on each path in the
/// planner's configuration, and of the pairwise f32 computation: O, LSE, entropy, focus (max
/// absolute error over the heads). Run with `--ignored --nocapture`.
#[test]
#[ignore = "prints the error table of issue 21"]
fn error_table() {
    let Some(engine) = engine() else { return };
    println!("| N | path | O | LSE | entropy | focus |");
    println!("|---|---|---|---|---|---|");
    for n in [1500, 6000, 24_000] {
        let s = decode(n);
        let (q, k, v) = qkv(&s, 4.0, 2600);
        let v: Vec<f32> = v.iter().map(|x| x / 4.0).collect();
        let scale = 0.125;
        let want = reference::attention(&s, &q, &k, &v, f64::from(scale));
        let facts = row_facts(&s, scale, &q, &k);
        let max_logit = (0..s.q_heads)
            .map(|h| {
                let qrow = &q[h * 64..][..64];
                (0..n)
                    .map(|j| {
                        let krow = &k[(j * 8 + h) * 64..][..64];
                        qrow.iter()
                            .zip(krow)
                            .map(|(&a, &b)| f64::from(a * b))
                            .sum::<f64>()
                            .abs()
                            * 0.125
                    })
                    .fold(0.0f64, f64::max)
            })
            .fold(0.0f64, f64::max);
        let (bo, blse, bent, bfoc) = pairwise_f32(&s, (&q, &k, &v), scale);
        let base = [
            max_err(&bo, &want.o),
            max_err(&blse, &want.lse),
            max_err(&bent, &facts.entropy),
            max_err(&bfoc, &facts.focus),
        ];
        let row = |name: &str, e: [f64; 4]| {
            let cells: Vec<String> = (0..4)
                .map(|i| format!("{:.2e} ({:.1}×)", e[i], e[i] / base[i]))
                .collect();
            println!("| {n} | {name} | {} |", cells.join(" | "));
        };
        row(&format!("f32 pairwise (max |logit| {max_logit:.1})"), base);
        for path in Path::ALL {
            let opts = Attention::default()
                .with_scale(scale)
                .with_path(path)
                .with_stats(Stats {
                    entropy: true,
                    focus: true,
                    coverage: false,
                });
            let (plan, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap();
            let config = plan
                .fused()
                .map(|c| format!(" {}", c.config))
                .unwrap_or_default();
            row(
                &format!("{}{config}", path.name()),
                [
                    max_err(&got.o, &want.o),
                    max_err(&got.lse, &want.lse),
                    max_err(got.stats.entropy.as_ref().unwrap(), &facts.entropy),
                    max_err(got.stats.focus.as_ref().unwrap(), &facts.focus),
                ],
            );
        }
    }
}
