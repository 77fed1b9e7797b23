//! Statistics of P (entropy, focus, coverage) and pooled maps of P on every path, masks and
//! GQA included, against the f64 reference computed from the full P.

mod common;

use common::weight_stats::{check, check_stats};
use common::*;
use xattn::cpu::reference;
use xattn::{Attention, AttnShape, Error, Path, Pool, PoolOp, Stats};

#[test]
fn statistics_match_the_reference_on_every_path_and_mask() {
    let Some(engine) = engine() else { return };
    let gl = on_gl(engine);
    let mut cases = mask_cases();
    cases.push((
        "M = 1".into(),
        shape(2, 1, 150, 4, 2, 16),
        Attention::default(),
    ));
    cases.push((
        "N = 1".into(),
        shape(1, 40, 1, 2, 2, 8),
        Attention::default(),
    ));
    for (i, (name, s, opts)) in cases.into_iter().enumerate() {
        let (q, k, v) = qkv(&s, 1.0, 1200 + i as u64);
        let scale = opts.scale_for(s.d_k);
        let m = opts.masking();
        let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), m);
        let base = budget_masked(&s, scale, (&q, &k, &v), m).lse;
        for (p, path) in Path::ALL.into_iter().enumerate() {
            // On GL a rotating third of the cases per path (every path, op and mask kind
            // still runs there); all of them on Vulkan.
            if gl && (i + p) % 3 != 0 {
                continue;
            }
            let pool = Pool {
                max_side: 7,
                op: if (i + p) % 2 == 0 {
                    PoolOp::Max
                } else {
                    PoolOp::Mean
                },
            };
            let o = opts
                .clone()
                .with_path(path)
                .with_stats(Stats::ALL)
                .with_pooled_weights(pool);
            let what = format!("{} {name} {s}", path.name());
            let (plan, got) = run_poisoned(engine, &s, (&q, &k, &v), &o)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(plan.path(), path);
            check_stats(&what, &s, &got, &want.weights, pool, base);
        }
    }
}

#[test]
fn split_k_statistics_equal_the_fused_ones() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 3, 2000, 4, 1, 32);
    let (q, k, v) = qkv(&s, 1.0, 1301);
    let pool = Pool {
        max_side: 16,
        op: PoolOp::Max,
    };
    let run = |path| {
        let o = Attention::default()
            .with_causal(xattn::Alignment::BottomRight)
            .with_path(path)
            .with_stats(Stats::ALL)
            .with_pooled_weights(pool);
        run_poisoned(engine, &s, (&q, &k, &v), &o).unwrap()
    };
    let (fused_plan, fused) = run(Path::Fused);
    let (split_plan, split) = run(Path::SplitK);
    assert_eq!(fused_plan.path(), Path::Fused);
    assert!(
        split_plan.tiling().contains("split"),
        "split-K plan: {}",
        split_plan.tiling()
    );
    // Both rebuild P from their own LSE; the LSEs agree to a few ulps, so do the statistics.
    let base = budget(&s, 1.0 / (s.d_k as f32).sqrt(), &q, &k, &v).lse;
    for ((name, f), (_, sp)) in fused.stats.named().into_iter().zip(split.stats.named()) {
        let (f, sp) = (f.unwrap(), sp.unwrap());
        let want: Vec<f64> = f.iter().map(|&x| f64::from(x)).collect();
        check(&format!("split-K {name}"), sp, &want, |_, x| {
            10.0 * base * (1.0 + x)
        });
    }
}

#[test]
fn statistics_need_no_m_by_n_memory() {
    // M = N = 16384: P would take 1 GiB per head; the plan with every statistic declares
    // buffers of O(M + N) per head. (It runs in the test below, at d 8 and without the map.)
    let big = shape(1, 16384, 16384, 1, 1, 64);
    let req = Attention::default()
        .with_path(Path::Fused)
        .with_stats(Stats::ALL)
        .with_pooled_weights(Pool {
            max_side: Pool::HEATMAP_SIDE,
            op: PoolOp::Max,
        })
        .request(big)
        .unwrap();
    let caps = xattn::DeviceCaps {
        loop_cap: Some(xattn::device::LLVMPIPE_LOOP_CAP),
        ..xattn::DeviceCaps::from_limits(&wgpu::Limits::default())
    };
    let plan = xattn::Plan::new(&req, &caps).unwrap();
    let total: u64 = plan.program().buffers().iter().map(|b| b.bytes).sum();
    let p_bytes = (big.m * big.n * 4) as u64;
    eprintln!(
        "M = N = 16384, d 64, every statistic and a 2048² max-pooled map: {} declared, P \
         would be {}",
        xattn::shape::human_bytes(total),
        xattn::shape::human_bytes(p_bytes)
    );
    // Q, K, V, O (4 MiB each), LSE, three statistics and the 2048² map (16 MiB).
    assert!(total < p_bytes / 30, "{total} bytes declared");
    assert!(plan.program().buffers().iter().all(|b| b.bytes <= 16 << 20));
}

#[test]
fn statistics_of_a_16384_square_run_on_the_fused_path() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 16384, 16384, 1, 1, 8);
    let (q, k, v) = qkv(&s, 2.0, 1501);
    let opts = Attention::default()
        .with_path(Path::Fused)
        .with_stats(Stats::ALL);
    let start = std::time::Instant::now();
    let (plan, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap();
    eprintln!(
        "{s}: {:.1} s with uploads and readback",
        start.elapsed().as_secs_f64()
    );
    let declared: u64 = plan.program().buffers().iter().map(|b| b.bytes).sum();
    eprintln!(
        "{s} fused with every statistic: {} declared in all ({}), P would be {}",
        xattn::shape::human_bytes(declared),
        plan.path().name(),
        xattn::shape::human_bytes((s.m * s.n * 4) as u64)
    );
    assert!(declared < 8 << 20, "{declared} bytes");
    let (entropy, focus, coverage) = (
        got.stats.entropy.unwrap(),
        got.stats.focus.unwrap(),
        got.stats.coverage.unwrap(),
    );
    // Every row's weights sum to 1, so the coverage sums to M.
    let total: f64 = coverage.iter().map(|&c| f64::from(c)).sum();
    assert!(
        (total - s.m as f64).abs() < 1e-3 * s.m as f64,
        "Σ coverage {total}"
    );
    // A few rows and keys against f64 (the reference needs P's row or column only).
    let scale = 1.0 / (s.d_k as f64).sqrt();
    let logit = |i: usize, j: usize| -> f64 {
        (0..s.d_k)
            .map(|d| f64::from(q[i * s.d_k + d]) * f64::from(k[j * s.d_k + d]))
            .sum::<f64>()
            * scale
    };
    let lse = |i: usize| -> f64 {
        let row: Vec<f64> = (0..s.n).map(|j| logit(i, j)).collect();
        let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln()
    };
    let base = budget(&s, scale as f32, &q, &k, &v).lse;
    let rel = 11.0 * base;
    for i in [0, 7777, 16383] {
        let l = lse(i);
        let got_lse = f64::from(got.lse[i]);
        assert!(
            (got_lse - l).abs() <= 10.0 * base * (1.0 + l.abs()),
            "LSE[{i}] {got_lse} vs {l}"
        );
        let p: Vec<f64> = (0..s.n).map(|j| (logit(i, j) - l).exp()).collect();
        let h: f64 = p.iter().map(|&x| -x * x.ln()).sum();
        let f = p.iter().cloned().fold(0.0, f64::max);
        let eps = f64::from(f32::EPSILON);
        let (eh, ef) = (f64::from(entropy[i]), f64::from(focus[i]));
        assert!(
            (eh - h).abs() <= (rel + s.n as f64 * eps) * (1.0 + h),
            "entropy[{i}] {eh} vs {h}"
        );
        assert!((ef - f).abs() <= rel * f, "focus[{i}] {ef} vs {f}");
    }
    // Coverage rebuilds P from the path's LSE (checked above for a few rows, and on every
    // path by the other tests); an f64 LSE of all 16384 rows would take minutes unoptimized.
    for j in [0, 12345] {
        let c: f64 = (0..s.m)
            .map(|i| (logit(i, j) - f64::from(got.lse[i])).exp())
            .sum();
        let tol = (rel + s.m as f64 * f64::from(f32::EPSILON)) * c;
        let got = f64::from(coverage[j]);
        assert!((got - c).abs() <= tol, "coverage[{j}] {got} vs {c}");
    }
}

/// Dispatches of `kernel` in `plan`.
fn passes(plan: &xattn::Plan, kernel: &str) -> usize {
    plan.program()
        .dispatches()
        .filter(|d| d.kernel.name() == kernel)
        .count()
}

#[test]
fn statistics_run_in_several_passes_on_long_problems() {
    let Some(engine) = engine() else { return };
    let capped = engine.caps().loop_cap.is_some();
    let pool = Pool {
        max_side: 64,
        op: PoolOp::Mean,
    };
    // Long rows: on three-pass, weight_blocks walks 2100 keys for entropy and for focus in
    // ≤ 963 per pass (68 loop iterations a key) under llvmpipe's cap; the fused kernel writes
    // them itself. Many rows: key_coverage walks 4000 query rows of d 128 in ≤ 1760 per pass.
    // Each shape with its runs: path, the kernel that takes passes, and at least how many.
    type Runs = &'static [(Path, &'static str, usize)];
    let cases: [(AttnShape, Runs); 2] = [
        (
            shape(1, 200, 2100, 1, 1, 64),
            &[
                (Path::ThreePass, "weight_blocks", 7),
                (Path::Fused, "weight_blocks", 1),
            ],
        ),
        (
            shape(1, 4000, 50, 2, 1, 128),
            &[(Path::Fused, "key_coverage", 3)],
        ),
    ];
    for (s, runs) in cases {
        let (q, k, v) = qkv(&s, 1.0, 1401);
        let scale = 1.0 / (s.d_k as f64).sqrt();
        let want = reference::attention(&s, &q, &k, &v, scale);
        let base = budget(&s, scale as f32, &q, &k, &v).lse;
        for &(path, kernel, least) in runs {
            let o = Attention::default()
                .with_path(path)
                .with_stats(Stats::ALL)
                .with_pooled_weights(pool);
            let (plan, got) = run_poisoned(engine, &s, (&q, &k, &v), &o).unwrap();
            let what = format!("{} {s}", path.name());
            if capped {
                let n = passes(&plan, kernel);
                assert!(n >= least, "{what}: {n} {kernel} passes");
            }
            check_stats(&what, &s, &got, &want.weights, pool, base);
        }
    }
}

#[test]
fn a_pool_of_zero_values_a_side_is_refused() {
    let s = shape(1, 4, 4, 1, 1, 4);
    let e = Attention::default()
        .with_pooled_weights(Pool {
            max_side: 0,
            op: PoolOp::Max,
        })
        .request(s)
        .unwrap_err();
    assert!(matches!(e, Error::Argument(_)), "{e}");
    assert!(e.to_string().contains("max_side"), "{e}");
}
