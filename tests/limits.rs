//! Never a silent wrong answer at the edges: a device's cap on shader loop iterations (Mesa's
//! llvmpipe), sources of millions of keys, head dims in the tens of thousands, and logit
//! factors near f32's range. Each case is right on every path or refused with a typed error.
//!
//! The GPU tests plan with llvmpipe's loop cap on every adapter, so the splits it forces are
//! exercised wherever the suite runs; on llvmpipe itself they also prove the cap is respected.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use xattn::cpu::reference;
use xattn::plan::{DeviceCaps, Plan, Request, FUSED_ROW_FLOATS, LLVMPIPE_LOOP_CAP};
use xattn::{
    Alignment, Attention, AttnShape, Engine, Error, FusedConfig, HostOutput, Path, Tensor,
};

/// The test engine planning with llvmpipe's loop cap, whatever the adapter.
fn capped(engine: &Engine) -> Engine {
    let caps = DeviceCaps {
        loop_cap: Some(LLVMPIPE_LOOP_CAP),
        ..*engine.caps()
    };
    Engine::with_caps(engine.context(), caps)
}

/// Compares with the f64 reference under the project's error model (`budget_masked`, LSE
/// relative per row). The model's bound grows with the largest logit; past 1e4 it says
/// nothing, but logits that large make P one-hot or uniform, alike in f32 and f64, so such
/// calls are held to the bound of ordinary logits instead.
fn check(
    what: &str,
    s: &AttnShape,
    opts: &Attention,
    qkv: (&[f32], &[f32], &[f32]),
    got: &HostOutput,
) {
    let scale = opts.scale_for(s.d_k);
    let m = opts.masking();
    let want = reference::attention_masked(s, qkv.0, qkv.1, qkv.2, f64::from(scale), m);
    let mut tol = budget_masked(s, scale, qkv, m);
    let huge_factor = m.segments.iter().map(|g| g.factor).fold(1.0f32, f32::max) * scale.abs();
    let huge_bias = m
        .bias
        .as_ref()
        .is_some_and(|b| b.data.iter().any(|x| x.is_finite() && x.abs() > 1e4));
    if huge_factor > 1e4 || huge_bias {
        tol = budget(s, 1.0 / (s.d_k as f32).sqrt(), qkv.0, qkv.1, qkv.2);
    }
    assert_close(&format!("{what} O"), &got.o, &want.o, tol.o);
    for (i, (&g, &w)) in got.lse.iter().zip(&want.lse).enumerate() {
        let err = elem_err(g, w);
        assert!(
            err <= tol.lse * (1.0 + w.abs()),
            "{what} LSE {i}: got {g}, want {w}"
        );
    }
    if let Some(w) = &got.weights {
        assert_close(&format!("{what} weights"), w, &want.weights, tol.weights);
    }
}

/// The longest loop the first `kernel` dispatch of `plan` may run under `cap`.
fn max_len(plan: &Plan, kernel: &str, cap: u64) -> usize {
    plan.program()
        .dispatches()
        .find(|d| d.kernel.name() == kernel)
        .map(|d| d.kernel.loop_cost(&d.params).0.max_len(cap) as usize)
        .unwrap_or_else(|| panic!("no {kernel} dispatch in\n{plan}"))
}

/// Every dispatch's loops within the cap, by the kernels' own cost model.
fn assert_within_cap(plan: &Plan, cap: u64) {
    for d in plan.program().dispatches() {
        let (cost, len) = d.kernel.loop_cost(&d.params);
        assert!(
            cost.trips(len) < cap,
            "{} runs {} loop iterations over {len}\n{plan}",
            d.kernel.label(),
            cost.trips(len)
        );
    }
}

fn request(s: AttnShape, opts: &Attention) -> Request {
    opts.request(s).expect("valid options")
}

/// Planner only: every plan over long sources, big head dims and every masking kind keeps
/// each dispatch under the cap, and what no split can bound is a typed `Limit` error.
#[test]
fn plans_keep_every_dispatch_under_the_loop_cap() {
    let masked = Attention::default()
        .with_causal(Alignment::BottomRight)
        .with_mask([1, 1, 1, 1], vec![true])
        .with_softcap(30.0)
        .with_key_segment(0, 5, 2.0)
        .with_key_segment(5, 9, 0.5);
    for n in [1, 77, 45_567, 70_000, 1_000_000, 2_500_000] {
        for d in [1, 64, 256, 1024] {
            for (opts, name) in [(Attention::default(), "plain"), (masked.clone(), "masked")] {
                let mut s = shape(1, 3, n, 2, 1, d);
                if n < 9 {
                    s.n = 9;
                }
                let opts = if name == "masked" {
                    opts.with_mask([1, 1, 1, s.n], vec![true; s.n])
                } else {
                    opts
                };
                for path in Path::ALL {
                    if path != Path::ThreePass && d > 256 {
                        continue;
                    }
                    let opts = opts.clone().with_path(path);
                    match Plan::new(&request(s, &opts), &CAPS) {
                        Ok(plan) => assert_within_cap(&plan, LLVMPIPE_LOOP_CAP),
                        // K, V or the scratch over a binding: another limit, not the cap's.
                        Err(Error::Limit {
                            limit_name: "max_storage_buffer_binding_size",
                            ..
                        }) => {}
                        Err(e) => panic!("{s} {name} {}: {e}", path.name()),
                    }
                }
            }
        }
    }
    // A three-pass head dim past what one qk_scores dispatch can loop over.
    let s = shape(1, 2, 5, 1, 1, 65_535);
    let e = Plan::new(&request(s, &Attention::default()), &CAPS).unwrap_err();
    assert!(matches!(e, Error::Limit { .. }), "{e}");
    let text = e.to_string();
    for part in ["qk_scores", "head dims d_k", "at most 45568", "llvmpipe"] {
        assert!(text.contains(part), "`{part}` missing from: {text}");
    }
    // Three-pass rows longer than one softmax_rows dispatch may loop over.
    let long = shape(1, 1, 3_000_000, 1, 1, 1);
    let e = Plan::new(&request(long, &Attention::default().with_weights()), &CAPS).unwrap_err();
    assert!(
        e.to_string()
            .contains("softmax_rows over 3000000 keys per row"),
        "{e}"
    );
    let fused = Plan::new(&request(long, &Attention::default()), &CAPS).unwrap();
    assert_within_cap(&fused, LLVMPIPE_LOOP_CAP);
    // Without a cap the same head dim plans.
    let uncapped = DeviceCaps {
        loop_cap: None,
        ..CAPS
    };
    Plan::new(&request(s, &Attention::default()), &uncapped).unwrap();
}

/// Known llvmpipe behaviour, kept as a test that fails if it ever stops: planned as if the
/// device had no loop cap, three-pass over 70,000 keys drops the keys past ~45,600 from O.
/// With the adapter's cap, the same call is right.
#[test]
fn llvmpipe_cuts_loops_that_the_planner_does_not_split() {
    let Some(engine) = engine() else { return };
    let Some(cap) = engine.caps().loop_cap else {
        eprintln!(
            "{}: no loop cap on this adapter; nothing to show",
            engine.context().describe()
        );
        return;
    };
    assert_eq!(cap, LLVMPIPE_LOOP_CAP);
    let s = shape(1, 2, 70_000, 1, 1, 4);
    let (q, k, _) = qkv(&s, 1.0, 90);
    // V = key index / N: O is the weighted mean position (about 0.5), so lost keys show far
    // beyond the f32 error of a 70,000-term sum (random V would average out).
    let v = positions(&s);
    let opts = Attention::default().with_path(Path::ThreePass);
    let uncapped = DeviceCaps {
        loop_cap: None,
        ..*engine.caps()
    };
    let plan = Plan::new(&request(s, &opts), &uncapped).unwrap();
    let tq = engine.upload(&q, &s.q_dims()).unwrap();
    let tk = engine.upload(&k, &s.k_dims()).unwrap();
    let tv = engine.upload(&v, &s.v_dims()).unwrap();
    let ctx = engine.context();
    let lens = opts.masking().lens_words(&s);
    let lens = Tensor::upload_u32(ctx, "lens", &lens, &[lens.len()]).unwrap();
    let o = Tensor::empty(ctx, "o", &s.o_dims()).unwrap();
    let lse = Tensor::empty(ctx, "lse", &s.lse_dims()).unwrap();
    // The engine runs only what it planned for its device's cap, so this plan goes to the
    // executor directly.
    let io = plan.io();
    let tensors = std::collections::HashMap::from([
        (io.q, &tq),
        (io.k, &tk),
        (io.v, &tv),
        // No mask or bias: the program declares them absent.
        (io.lens, &lens),
        (io.o, &o),
        (io.lse, &lse),
    ]);
    let resources = (&Default::default(), &Default::default());
    xattn::gpu::executor::run(ctx, resources, plan.program(), &tensors, None).unwrap();
    let own = engine.prepare(&tq, &tk, &tv, &opts).unwrap();
    assert!(
        own.plan().dispatches() > plan.dispatches(),
        "the engine's own plan of this call should split the key loop that the uncapped plan \
         runs in one: {}",
        own.plan()
    );
    assert_within_cap(own.plan(), cap);
    let o = o.to_host().unwrap();
    let want = reference::attention(&s, &q, &k, &v, f64::from(opts.scale_for(s.d_k)));
    let worst = o
        .iter()
        .zip(&want.o)
        .map(|(&g, &w)| elem_err(g, w))
        .fold(0.0, f64::max);
    assert!(
        worst > 0.05,
        "llvmpipe ran 70,000 keys in one weighted_sum loop (error {worst:e}): is the loop cap \
         gone? Then plan::loop_cap_of may drop llvmpipe"
    );
    let (_, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap();
    check(
        "three-pass N=70000 with the cap",
        &s,
        &opts,
        (&q, &k, &v),
        &got,
    );
}

/// Dispatches planned right at the cap compute every key: the cost model is an upper bound
/// of what llvmpipe counts, for the fused kernel (plain and with every per-key control), the
/// three-pass key ranges and the three-pass head dim.
#[test]
fn dispatches_at_the_loop_cap_are_right() {
    let Some(engine) = engine() else { return };
    let engine = &capped(engine);
    let cap = LLVMPIPE_LOOP_CAP - 1;
    // The fused kernel over exactly the keys one pass may walk, for every configuration the
    // planner may pick at that head dim: each R (M = 5: R = 2 and 4 leave dead rows in the
    // last invocation), with subgroup lanes and with broadcast loads where the device has
    // subgroups. Masked: every mask and logit control ("all"), and the masked variant without
    // key segments, with a bool mask only or a softcap only (llvmpipe counts the exit test of
    // a loop in a branch not taken: the segment lookup was such a loop, uncounted, until
    // these cases found calls of 16,384 keys silently wrong).
    let lanes = engine.caps().subgroup_lanes.is_some();
    let variants = [
        (1usize, ""),
        (64, ""),
        (256, ""),
        (16, "all"),
        (16, "mask"),
        (16, "softcap"),
    ]
    .into_iter()
    .flat_map(|c| FusedConfig::ALL.map(|config| (c, config)))
    .filter(|&((d, _), config)| {
        let r = config.rows_per_invocation;
        (r == 1 || r * 2 * d.next_multiple_of(4) as u32 <= FUSED_ROW_FLOATS)
            && (lanes || !(config.subgroup_lanes || config.broadcast_loads))
    });
    for ((d, masking), config) in variants {
        let r = config.rows_per_invocation;
        let probe = shape(1, 5, 64, 1, 1, d);
        let opts_for = |n: usize| {
            let opts = Attention::default()
                .with_path(Path::Fused)
                .with_fused_config(config);
            match masking {
                "all" => opts
                    .with_mask([1, 1, 1, n], random_bools(n, 0.9, 3))
                    .with_bias([1, 1, 1, n], random(n, 1.0, 4))
                    .with_key_segment(0, n / 2, 1.5)
                    .with_key_segment(n / 2 + 1, n, 0.7)
                    .with_softcap(5.0),
                "mask" => opts.with_mask([1, 1, 1, n], random_bools(n, 0.9, 3)),
                "softcap" => opts.with_softcap(5.0),
                _ => opts,
            }
        };
        let plan = Plan::new(&request(probe, &opts_for(64)), engine.caps()).unwrap();
        let per_pass = max_len(&plan, "flash", cap);
        let s = shape(1, 5, per_pass, 1, 1, d);
        let opts = opts_for(per_pass);
        let (qa, ka, va) = qkv(&s, 1.0, 7);
        let (plan, got) = run_poisoned(engine, &s, (&qa, &ka, &va), &opts).unwrap();
        assert_eq!((plan.path(), plan.dispatches()), (Path::Fused, 1), "{plan}");
        assert!(plan.tiling().contains(&format!("_r{r}")), "{plan}");
        assert_eq!(
            plan.tiling().contains("_lanes"),
            config.subgroup_lanes,
            "{plan}"
        );
        assert_eq!(
            plan.tiling().contains("_bcast"),
            config.broadcast_loads,
            "{plan}"
        );
        check(
            &format!("fused {config} {masking} at the cap {s}"),
            &s,
            &opts,
            (&qa, &ka, &va),
            &got,
        );
        // One key more is split.
        let s1 = shape(1, 5, per_pass + 1, 1, 1, d);
        let plan = Plan::new(&request(s1, &opts_for(per_pass + 1)), engine.caps()).unwrap();
        assert_eq!(plan.path(), Path::SplitK, "{plan}");
    }
    // Three-pass with the weights: P·V over key ranges, the first one exactly at the cap.
    let probe = shape(1, 1, 1, 1, 1, 1);
    let probe_opts = Attention::default().with_path(Path::ThreePass);
    let plan = Plan::new(&request(probe, &probe_opts), engine.caps()).unwrap();
    let span = max_len(&plan, "weighted_sum", cap);
    for n in [span, 2 * span + 7] {
        let s = shape(1, 3, n, 2, 1, 4);
        let (q, k, v) = qkv(&s, 1.0, 11);
        let opts = Attention::default().with_weights();
        let (plan, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap();
        assert_within_cap(&plan, LLVMPIPE_LOOP_CAP);
        check(
            &format!("three-pass with weights N={n}"),
            &s,
            &opts,
            (&q, &k, &v),
            &got,
        );
    }
    // Three-pass at the largest head dim one qk_scores dispatch may loop over.
    let d_max = max_len(&plan, "qk_scores", cap);
    let s = AttnShape {
        d_v: 4,
        ..shape(1, 2, 5, 1, 1, d_max)
    };
    let (q, k, v) = qkv(&s, 0.05, 13);
    let opts = Attention::default();
    let (plan, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap();
    assert_eq!(plan.path(), Path::ThreePass);
    assert_within_cap(&plan, LLVMPIPE_LOOP_CAP);
    check("three-pass d_k at the cap", &s, &opts, (&q, &k, &v), &got);
    let s = AttnShape {
        d_k: d_max + 1,
        ..s
    };
    assert!(matches!(
        Plan::new(&request(s, &opts), engine.caps()),
        Err(Error::Limit { .. })
    ));
}

/// Split-K over more than eight million keys (it lost ~5% of the softmax mass at 10M when one
/// split walked more keys than llvmpipe's loop cap allows).
#[test]
fn split_k_over_eight_million_keys() {
    let Some(engine) = engine() else { return };
    let engine = &capped(engine);
    let s = shape(1, 1, (1 << 23) + 9, 1, 1, 1);
    let (q, k, _) = qkv(&s, 1.0, 17);
    let v = positions(&s);
    let scale = Attention::default().scale_for(s.d_k);
    let want = reference::attention(&s, &q, &k, &v, f64::from(scale));
    for path in [Path::Fused, Path::SplitK] {
        let opts = Attention::default().with_path(path);
        let (plan, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap();
        assert_eq!(plan.path(), Path::SplitK);
        assert_within_cap(&plan, LLVMPIPE_LOOP_CAP);
        // The error model's N·ε term (one f32 sum over all keys) would allow anything here;
        // split-K sums at most one split's keys, then the splits.
        let Some(flash) = plan.program().dispatches().next() else {
            panic!("{plan}")
        };
        let p: xattn::params::AttnParams = flash.params_as().expect("attention params");
        let terms = f64::from(p.split_len + p.n_splits);
        let tol = f64::from(f32::EPSILON) * (4.0 * (1.0 + f64::from(scale)) + terms);
        let what = format!("{} N={}", path.name(), s.n);
        assert_close(&format!("{what} O"), &got.o, &want.o, tol);
        let lse_tol = tol * want.lse[0].abs().max(1.0);
        assert_close(&format!("{what} LSE"), &got.lse, &want.lse, lse_tol);
    }
}

/// Logits near the bounds the checks accept: removal by bias only at ≤ −1e30 (a row whose
/// every bias is −9e29 is uniform, not empty), softcaps from 1e4 to 1e30 to f32 accuracy, the
/// largest scale and segment factors, and large positive biases.
#[test]
fn extreme_accepted_values_are_right_on_every_path() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 4, 150, 2, 1, 8);
    let (q, k, v) = qkv(&s, 1.0, 23);
    let n = s.n;
    // Row 0: every bias −9e29 (kept); row 1: half −9e29, half 0; row 2: all −1e30 (removed);
    // row 3: +9e29 on key 7 (dominates).
    let mut bias = vec![0.0f32; 4 * n];
    bias[..n].fill(-9e29);
    for j in (0..n).step_by(2) {
        bias[n + j] = -9e29;
    }
    bias[2 * n..3 * n].fill(-1e30);
    bias[3 * n + 7] = 9e29;
    let mut cases = vec![
        (
            "bias near the removal bound",
            Attention::default().with_bias([1, 1, 4, n], bias),
        ),
        ("scale 1e30", Attention::default().with_scale(1e30)),
        (
            "scale × segment factor 1e30",
            Attention::default()
                .with_scale(1e-8)
                .with_key_segment(10, 90, 1e38),
        ),
    ];
    for cap in [1e4, 1e5, 1e6, 1e8, 1e30] {
        cases.push(("softcap", Attention::default().with_softcap(cap)));
    }
    for (what, opts) in cases {
        for path in Path::ALL {
            let opts = opts.clone().with_path(path);
            let (_, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap();
            let what = format!("{what} {:?} {}", opts.masking().softcap, path.name());
            check(&what, &s, &opts, (&q, &k, &v), &got);
        }
    }
}

/// Seeded random cases over shapes, paths, masks and extreme values: every one is right (by
/// the reference) when its values are within the documented bounds and a typed argument
/// error when they are not.
#[test]
fn generated_inputs_are_right_or_refused() {
    let Some(engine) = engine() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let scales = [
        None,
        Some(0.0),
        Some(-0.7),
        Some(1e-30),
        Some(1e30),
        Some(3.4e38),
    ];
    let biases = [0.5, -9e29, -1e30, 1e30, 3e38, f32::NEG_INFINITY, f32::NAN];
    let caps = [0.0, 1e-3, 1.0, 1e8, 1e30, 1e31];
    let factors = [0.5, 3.0, 1e38];
    let mut refused = 0;
    let cases = 200;
    for case in 0..cases {
        let kv_heads = rng.random_range(1..=2);
        let s = AttnShape {
            batch: rng.random_range(1..=2),
            m: rng.random_range(1..=40),
            n: rng.random_range(1..=300),
            q_heads: kv_heads * rng.random_range(1..=2),
            kv_heads,
            // Few head dims: each new one compiles a fused pipeline, the costliest step here.
            d_k: [1, 5, 16, 33][rng.random_range(0..4)],
            d_v: [1, 7, 16][rng.random_range(0..3)],
        };
        let (q, k, v) = qkv(&s, 1.0, 1000 + case);
        let mut opts = Attention::default();
        let mut valid = true;
        let scale = scales[rng.random_range(0..scales.len())];
        if let Some(x) = scale {
            opts = opts.with_scale(x);
            valid &= x.abs() <= 1e30;
        }
        if rng.random_bool(0.3) {
            let align = [Alignment::TopLeft, Alignment::BottomRight][rng.random_range(0..2)];
            opts = opts.with_window(align, rng.random_range(0..20), rng.random_range(0..20));
        }
        if rng.random_bool(0.3) {
            opts = opts.with_kv_lens(
                (0..s.batch)
                    .map(|_| rng.random_range(0..=s.n as u32))
                    .collect(),
            );
        }
        if rng.random_bool(0.3) {
            let len = s.batch * s.q_heads * s.m * s.n;
            opts = opts.with_mask(s.weights_dims(), random_bools(len, 0.7, case));
        }
        if rng.random_bool(0.4) {
            let special = biases[rng.random_range(0..biases.len())];
            let mut b = random(s.m * s.n, 2.0, 500 + case);
            for x in b.iter_mut().filter(|_| rng.random_bool(0.3)) {
                *x = special;
            }
            valid &= b.iter().all(|x| !x.is_nan() && *x <= 1e30);
            opts = opts.with_bias([1, 1, s.m, s.n], b);
        }
        if rng.random_bool(0.3) {
            let cap = caps[rng.random_range(0..caps.len())];
            opts = opts.with_softcap(cap);
            valid &= cap > 0.0 && cap <= 1e30;
        }
        if rng.random_bool(0.3) && s.n >= 2 {
            let f = factors[rng.random_range(0..factors.len())];
            opts = opts.with_key_segment(0, s.n / 2 + 1, f);
            let sc = opts.scale_for(s.d_k);
            valid &= (sc * f).abs() <= 1e30;
        }
        for path in Path::ALL {
            let opts = opts.clone().with_path(path);
            let what = format!(
                "case {case} {s} {} {:?}",
                path.name(),
                opts.masking().softcap
            );
            match run_poisoned(engine, &s, (&q, &k, &v), &opts) {
                Ok((_, got)) => {
                    assert!(
                        valid,
                        "{what}: out-of-bounds values were accepted: {opts:?}"
                    );
                    check(&what, &s, &opts, (&q, &k, &v), &got);
                }
                Err(Error::Argument(msg)) if !valid => {
                    refused += 1;
                    assert!(!msg.is_empty());
                }
                Err(e) => panic!("{what}: {e}"),
            }
        }
    }
    assert!(
        refused > 30 && refused < 3 * cases,
        "{refused} of {cases} cases refused"
    );
}

/// The softcap formula the kernels use (its CPU twin, in f32) against f64's tanh: within a few
/// ulp for every cap from 1e-3 to 1e30 and arguments from 1e-9 to past saturation. The
/// exp-based tanh it replaces lost all digits from t ≈ 1e-8.
#[test]
fn softcap_is_f32_accurate_for_every_cap() {
    use xattn::cpu::mask::soft_cap;
    for cap in [1e-3f32, 0.1, 1.0, 30.0, 1e4, 1e8, 1e30] {
        for t in [
            1e-9f64, 1e-4, 0.1, 0.49, 0.5, 0.51, 1.0, 5.0, 14.9, 15.0, 100.0,
        ] {
            for sign in [1.0, -1.0] {
                let y = (sign * t * f64::from(cap)) as f32;
                let got = f64::from(soft_cap(y, cap));
                let want = f64::from(cap) * (f64::from(y) / f64::from(cap)).tanh();
                let ulps = (got - want).abs() / (want.abs() * f64::from(f32::EPSILON));
                assert!(
                    ulps <= 4.0,
                    "cap {cap} y {y}: {got} vs {want} ({ulps:.1} ulp)"
                );
            }
        }
    }
}
