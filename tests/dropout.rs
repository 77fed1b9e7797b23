//! Dropout of the attention weights (src/dropout.rs) on every path: the WGSL Philox draws the
//! CPU twin's mask bit for bit, the keep rate is binomial, O = (P ∘ Z)·V/(1 − p) against the f64
//! reference with the twin's mask (masks combined, GQA, f32 and f16), p = 0 is the call without
//! dropout bit for bit, the LSE and the statistics are those of P before dropout, and seed and
//! offset pick the mask.

mod common;

use common::*;
use xattn::cpu::reference;
use xattn::dropout::keeps;
use xattn::params::AttnParams;
use xattn::plan::{base_params, DeviceCaps};
use xattn::{
    Alignment, Attention, AttnShape, DType, Engine, FusedConfig, HostOutput, Path, Plan, Pool,
    PoolOp, Stats, Tensor,
};

/// Runs `opts` on Q, K, V stored as `dtype` (rounded once on the host), O in f32, with every
/// output poisoned with NaN first.
fn run_as(
    engine: &Engine,
    s: &AttnShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    dtype: DType,
    opts: &Attention,
) -> xattn::Result<(Plan, HostOutput)> {
    let ctx = engine.context();
    let q = Tensor::upload_as(ctx, "q", q, &s.q_dims(), dtype)?;
    let k = Tensor::upload_as(ctx, "k", k, &s.k_dims(), dtype)?;
    let v = Tensor::upload_as(ctx, "v", v, &s.v_dims(), dtype)?;
    let opts = opts.clone().with_out_dtype(DType::F32);
    let call = engine.prepare(&q, &k, &v, &opts)?;
    let out = call.output();
    poison(&out.o)?;
    poison(&out.lse)?;
    if let Some(w) = &out.weights {
        poison(w)?;
    }
    for t in out.stats.named().into_iter().filter_map(|(_, t)| t) {
        poison(t)?;
    }
    call.run()?;
    let plan = call.plan().clone();
    let out = call.into_output();
    let host = HostOutput {
        o: out.o.to_host()?,
        lse: out.lse.to_host()?,
        weights: out.weights.as_ref().map(Tensor::to_host).transpose()?,
        stats: out.stats.to_host()?,
    };
    Ok((plan, host))
}

/// The params whose dropout fields the twin's `keeps` reads: those every kernel of the call
/// starts from.
fn drop_params(s: &AttnShape, opts: &Attention) -> AttnParams {
    let spec = opts.masking().spec(s).expect("valid masking");
    base_params(s, opts.scale_for(s.d_k), &spec)
}

/// The factor of a kept weight, 1/(1 − p), in f64 (1 without dropout).
fn keep_factor(opts: &Attention) -> f64 {
    opts.masking()
        .dropout
        .map_or(1.0, |d| 1.0 / (1.0 - f64::from(d.p)))
}

/// Checks a run against the f64 reference, which applies the twin's keep mask
/// (`reference::attention_masked` with the masking's dropout). The kernels' weights are those
/// of the f32 budget, each off by at most `tol.weights`; dropout multiplies the kept ones by
/// keep_scale, 1/(1 − p) rounded to f32 (ε relative), the product rounded again (ε): so a
/// returned weight is within (1/(1 − p))·(tol.weights + 2ε) (P ≤ 1), and O — a sum over a subset
/// of the keys, whose budget bounds every subset's — within (1/(1 − p))·(tol.o + 2ε·max|v|). The
/// LSE is that of P before dropout: the plain budget. Returned weights must be exactly 0 where
/// the reference's are (removed or dropped keys) and only there: the mask bits themselves.
fn check(
    what: &str,
    s: &AttnShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    opts: &Attention,
    got: &HostOutput,
) {
    let m = opts.masking();
    let scale = opts.scale_for(s.d_k);
    let want = reference::attention_masked(s, q, k, v, f64::from(scale), m);
    let tol = budget_masked(s, scale, (q, k, v), m);
    let kf = keep_factor(opts);
    let eps = f64::from(f32::EPSILON);
    let amax_v = v.iter().fold(0.0f64, |a, &x| a.max(f64::from(x.abs())));
    assert_close(
        &format!("{what} O"),
        &got.o,
        &want.o,
        kf * (tol.o + 2.0 * eps * amax_v),
    );
    let lse_max = want.lse.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    assert_close(
        &format!("{what} LSE"),
        &got.lse,
        &want.lse,
        tol.lse * (1.0 + lse_max),
    );
    if let Some(w) = &got.weights {
        for (e, (&g, &x)) in w.iter().zip(&want.weights).enumerate() {
            assert_eq!(
                g == 0.0,
                x == 0.0,
                "{what}: weight {e} is {g}, the reference's {x} (dropped or removed iff 0)"
            );
        }
        assert_close(
            &format!("{what} weights"),
            w,
            &want.weights,
            kf * (tol.weights + 2.0 * eps),
        );
    }
}

/// The fused configurations a test runs: all the planner may pick on this device (Vulkan), or
/// the default only (GL, where each specialization compiles for seconds).
fn configs(engine: &Engine, s: &AttnShape) -> Vec<Option<FusedConfig>> {
    if on_gl(engine) {
        return vec![None];
    }
    std::iter::once(None)
        .chain(configs_for(engine, s).into_iter().map(Some))
        .collect()
}

/// Every (name, options) a path runs with: the three-pass path returns its weights, the
/// fused path runs each configuration, split-K is forced.
fn path_runs(engine: &Engine, s: &AttnShape, opts: &Attention) -> Vec<(String, Attention)> {
    let mut runs = vec![(
        "three-pass".to_string(),
        opts.clone().with_path(Path::ThreePass).with_weights(),
    )];
    for config in configs(engine, s) {
        for path in [Path::Fused, Path::SplitK] {
            let mut o = opts.clone().with_path(path);
            let mut name = path.name().to_string();
            if let Some(c) = config {
                o = o.with_fused_config(c);
                name = format!("{name} {c}");
            }
            runs.push((name, o));
        }
    }
    runs
}

/// The WGSL Philox (common/dropout.wgsl) against its CPU twin, bit for bit: every weight the
/// three-pass path returns is exactly 0 where `dropout::keeps` drops it and only there (no key
/// is masked, so every weight before dropout is positive), the rest within tolerance of the f64
/// reference's P/(1 − p). B·H > 1 with GQA, M and N off the tiles.
#[test]
fn the_wgsl_philox_draws_the_twins_mask_bit_for_bit() {
    let Some(engine) = engine() else { return };
    let s = shape(2, 70, 150, 4, 2, 16);
    let (q, k, v) = qkv(&s, 1.0, 1);
    let opts = Attention::default()
        .with_dropout(0.3, 0x1234_5678_9abc_def0, 0xfeed_0000_0000_0042)
        .with_path(Path::ThreePass)
        .with_weights();
    let (_, got) = run_as(engine, &s, (&q, &k, &v), DType::F32, &opts).unwrap();
    let w = got.weights.as_ref().expect("weights asked for");
    let p = drop_params(&s, &opts);
    let mut dropped = 0;
    for (e, &x) in w.iter().enumerate() {
        let (bh, i, j) = (e / (s.m * s.n), (e / s.n) % s.m, e % s.n);
        let kept = keeps(&p, bh as u32, i as u32, j as u32);
        assert_eq!(
            x != 0.0,
            kept,
            "weight {e} (bh {bh}, row {i}, key {j}) is {x}"
        );
        dropped += usize::from(!kept);
    }
    assert!(dropped > 0, "nothing dropped");
    check("three-pass p 0.3", &s, (&q, &k, &v), &opts, &got);
}

/// V = the identity (d_v = N, one value per key) makes O[b, i, h, j] = P_ij·Z_ij/(1 − p): zero
/// exactly where key j is dropped. Every path and fused configuration, key splits, and the
/// three-pass and fused work split into chunks of 3 rows or heads (a grid of at most 3
/// workgroups per dimension; split-K's merge does not fit such a grid) draw the twin's mask:
/// the element's index is the global (b·H + h, row, key) of the whole problem.
#[test]
fn every_path_and_every_split_draws_the_twins_mask() {
    let Some(engine) = engine() else { return };
    let s = shape(2, 70, 150, 4, 2, 16);
    let s = AttnShape { d_v: s.n, ..s };
    let (q, k, _) = qkv(&s, 1.0, 2);
    let v: Vec<f32> = (0..s.batch * s.n * s.kv_heads * s.d_v)
        .map(|e| f32::from(u8::from((e / (s.kv_heads * s.d_v)) % s.n == e % s.d_v)))
        .collect();
    let opts = Attention::default().with_dropout(0.5, 99, 7);
    let p = drop_params(&s, &opts);
    let small = Engine::with_caps(
        engine.context(),
        DeviceCaps {
            max_workgroups: 3,
            ..*engine.caps()
        },
    );
    let chunked = [
        opts.clone().with_path(Path::ThreePass).with_weights(),
        opts.clone().with_path(Path::Fused),
    ];
    let runs = path_runs(engine, &s, &opts)
        .into_iter()
        .map(|(name, o)| (name, o, engine))
        .chain(chunked.into_iter().map(|o| {
            let name = format!("{} in chunks", o.path().expect("forced").name());
            (name, o, &small)
        }));
    for (what, o, e) in runs {
        {
            let (plan, got) = run_as(e, &s, (&q, &k, &v), DType::F32, &o)
                .unwrap_or_else(|err| panic!("{what}: {err}"));
            for (at, &x) in got.o.iter().enumerate() {
                let (b, i, h, j) = (
                    at / (s.m * s.q_heads * s.d_v),
                    (at / (s.q_heads * s.d_v)) % s.m,
                    (at / s.d_v) % s.q_heads,
                    at % s.d_v,
                );
                let bh = (b * s.q_heads + h) as u32;
                let kept = keeps(&p, bh, i as u32, j as u32);
                assert_eq!(
                    x != 0.0,
                    kept,
                    "{what}: O[{b}, {i}, {h}, {j}] is {x}, key {j} {}\n{plan}",
                    if kept { "kept" } else { "dropped" }
                );
            }
            check(&what, &s, (&q, &k, &v), &o, &got);
        }
    }
}

/// The share of weights dropped is binomial: within 5σ of p·n over 120,000 weights, for
/// p = 0.1 and 0.5 (on the device, whose bits the test above ties to the twin's).
#[test]
fn the_keep_rate_is_binomial() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 100, 300, 4, 4, 8);
    let (q, k, v) = qkv(&s, 1.0, 3);
    for (p, seed) in [(0.1f64, 5u64), (0.5, 6)] {
        let opts = Attention::default()
            .with_dropout(p as f32, seed, 0)
            .with_path(Path::ThreePass)
            .with_weights();
        let (_, got) = run_as(engine, &s, (&q, &k, &v), DType::F32, &opts).unwrap();
        let w = got.weights.expect("weights asked for");
        let n = w.len() as f64;
        let dropped = w.iter().filter(|&&x| x == 0.0).count() as f64;
        let sigma = (n * p * (1.0 - p)).sqrt();
        eprintln!(
            "p {p}: dropped {dropped} of {n} ({:.4}), {:.2}σ from p·n",
            dropped / n,
            (dropped - p * n) / sigma
        );
        assert!(
            (dropped - p * n).abs() <= 5.0 * sigma,
            "p {p}: dropped {dropped} of {n}, more than 5σ = {} from {}",
            5.0 * sigma,
            p * n
        );
    }
}

/// Masks combined with dropout on every path (each fused configuration, split-K forced), f32
/// and f16 inputs (the reference on the same rounded values; computed in f32, O in f32: the f32
/// budget), against the f64 reference with the twin's mask.
#[test]
fn every_path_matches_the_reference_with_masks_and_dropout() {
    let Some(engine) = engine() else { return };
    let wanted = [
        "causal bottom-right M>N",
        "lengths with causal bottom-right",
        "mask full",
        "bias [B,1,1,N] with −∞",
        "GQA ×4 causal top-left",
        "MQA bottom-right + kv_lens + mask + bias + softcap + segment",
    ];
    let mut cases: Vec<(String, AttnShape, Attention)> = mask_cases()
        .into_iter()
        .filter(|(name, _, _)| wanted.contains(&name.as_str()))
        .collect();
    assert_eq!(cases.len(), wanted.len(), "mask cases renamed");
    cases.push((
        "unmasked GQA".into(),
        shape(2, 33, 200, 4, 2, 40),
        Attention::default(),
    ));
    for (i, (name, s, opts)) in cases.into_iter().enumerate() {
        let p = [0.1, 0.5, 0.3][i % 3];
        let opts = opts.with_dropout(p, 1000 + i as u64, i as u64);
        for dtype in [DType::F32, DType::F16] {
            // f16 on a rotating half of the cases (every path still runs both).
            if dtype == DType::F16 && i % 2 == 1 {
                continue;
            }
            let (q, k, v) = qkv(&s, 1.0, 40 + i as u64);
            let round = |x: &[f32]| x.iter().map(|&y| dtype.round(y)).collect::<Vec<f32>>();
            let (q, k, v) = (round(&q), round(&k), round(&v));
            for (path, o) in path_runs(engine, &s, &opts) {
                let what = format!("{name} p {p} {dtype} {path}");
                let (_, got) = run_as(engine, &s, (&q, &k, &v), dtype, &o)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                check(&what, &s, (&q, &k, &v), &o, &got);
            }
        }
    }
}

/// `with_dropout(0, …)` is the call without dropout, bit for bit, on every path: the same plan
/// (the same kernels) and the same O, LSE and weights.
#[test]
fn p_zero_is_the_call_without_dropout_bit_for_bit() {
    let Some(engine) = engine() else { return };
    let s = shape(2, 45, 130, 4, 2, 24);
    let (q, k, v) = qkv(&s, 1.0, 8);
    for masked in [false, true] {
        let mut base = Attention::default();
        if masked {
            base = base.with_causal(Alignment::BottomRight);
        }
        for (name, o) in path_runs(engine, &s, &base) {
            let what = format!("{name} masked {masked}");
            let (plan, plain) = run_as(engine, &s, (&q, &k, &v), DType::F32, &o).unwrap();
            let zero = o.clone().with_dropout(0.0, 1234, 5678);
            let (plan0, got) = run_as(engine, &s, (&q, &k, &v), DType::F32, &zero).unwrap();
            assert_eq!(plan0.to_string(), plan.to_string(), "{what}: plans differ");
            let bits = |x: &[f32]| x.iter().map(|y| y.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&got.o), bits(&plain.o), "{what}: O");
            assert_eq!(bits(&got.lse), bits(&plain.lse), "{what}: LSE");
            assert_eq!(
                got.weights.as_deref().map(bits),
                plain.weights.as_deref().map(bits),
                "{what}: weights"
            );
        }
    }
}

/// The LSE and the statistics (entropy, focus, coverage, pooled weights) describe P before
/// dropout: bit for bit those of the call without dropout, on every path (the fused kernel
/// writes entropy and focus itself; the others rebuild P from Q, K and the LSE).
#[test]
fn lse_and_statistics_are_those_before_dropout() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 40, 170, 2, 2, 16);
    let (q, k, v) = qkv(&s, 1.0, 9);
    let pool = Pool {
        max_side: 4,
        op: PoolOp::Mean,
    };
    for masked in [false, true] {
        let mut base = Attention::default()
            .with_stats(Stats::ALL)
            .with_pooled_weights(pool);
        if masked {
            base = base.with_causal(Alignment::TopLeft);
        }
        for path in Path::ALL {
            let o = base.clone().with_path(path);
            let what = format!("{} masked {masked}", path.name());
            let (_, plain) = run_as(engine, &s, (&q, &k, &v), DType::F32, &o).unwrap();
            let (_, got) = run_as(
                engine,
                &s,
                (&q, &k, &v),
                DType::F32,
                &o.clone().with_dropout(0.4, 77, 3),
            )
            .unwrap();
            let bits = |x: &[f32]| x.iter().map(|y| y.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&got.lse), bits(&plain.lse), "{what}: LSE");
            for ((name, g), (_, p)) in got.stats.named().into_iter().zip(plain.stats.named()) {
                let (g, p) = (g.expect("asked for"), p.expect("asked for"));
                assert_eq!(bits(g), bits(p), "{what}: {name}");
            }
            assert_ne!(bits(&got.o), bits(&plain.o), "{what}: O without dropout");
        }
    }
}

/// The same seed and offset draw the same mask (identical results); another offset or another
/// seed draws another.
#[test]
fn seed_and_offset_pick_the_mask() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 20, 90, 2, 2, 8);
    let (q, k, v) = qkv(&s, 1.0, 10);
    let zeros = |seed: u64, offset: u64| -> (Vec<bool>, Vec<u32>) {
        let opts = Attention::default()
            .with_dropout(0.5, seed, offset)
            .with_path(Path::ThreePass)
            .with_weights();
        let (_, got) = run_as(engine, &s, (&q, &k, &v), DType::F32, &opts).unwrap();
        let w = got.weights.expect("weights asked for");
        (
            w.iter().map(|&x| x == 0.0).collect(),
            got.o.iter().map(|x| x.to_bits()).collect(),
        )
    };
    let (mask, o) = zeros(3, 1 << 40);
    assert_eq!(zeros(3, 1 << 40), (mask.clone(), o), "same seed and offset");
    for (seed, offset) in [(3, (1 << 40) + 1), (3, 1 << 41), (4, 1 << 40)] {
        let (other, _) = zeros(seed, offset);
        let same = mask.iter().zip(&other).filter(|(a, b)| a == b).count();
        // Independent masks at p = 0.5 agree on half the weights (1800 ± 5σ = 150).
        assert!(
            same < mask.len() * 3 / 5,
            "seed {seed} offset {offset}: {same} of {} equal to seed 3 offset 2^40",
            mask.len()
        );
    }
}

/// Planner caps with matrix units (16×16 with f16 inputs, 8×8 with f32).
fn matrix_caps() -> DeviceCaps {
    DeviceCaps {
        matrix_units: Some(xattn::plan::MatrixUnits {
            f32_tile: Some(8),
            f16_tile: Some(16),
        }),
        max_workgroup_bytes: 48 << 10,
        ..CAPS
    }
}

/// The matrix-unit kernel does not apply dropout: forced under dropout it is a typed error,
/// never a silent wrong answer; the default configuration plans the flash kernel's dropout
/// variant (needs no GPU).
#[test]
fn matrix_units_refuse_dropout() {
    let s = shape(1, 16, 64, 2, 2, 64);
    let opts = Attention::default().with_dropout(0.2, 1, 2);
    let req = opts.request_typed(s, DType::F16).unwrap();
    for path in [Path::Fused, Path::SplitK] {
        let req = xattn::plan::Request {
            path: Some(path),
            ..req.clone()
        };
        let forced = req.clone().with_fused_config(FusedConfig::MATRIX_UNITS);
        match Plan::new(&forced, &matrix_caps()) {
            Err(xattn::Error::Unsupported(why)) => assert!(why.contains("dropout"), "{why}"),
            other => panic!("{}: matrix units under dropout: {other:?}", path.name()),
        }
        let plan = Plan::new(&req, &matrix_caps()).unwrap();
        let labels: Vec<String> = plan
            .program()
            .dispatches()
            .map(|d| d.kernel.label())
            .filter(|l| l.starts_with("xattn.flash"))
            .collect();
        assert!(
            !labels.is_empty() && labels.iter().all(|l| l.ends_with("_dropout")),
            "{labels:?}\n{plan}"
        );
    }
}
