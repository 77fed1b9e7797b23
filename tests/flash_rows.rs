//! Every configuration of the fused kernel on the GPU (each rows-per-invocation R, plain and,
//! where the device has subgroups, with subgroup lanes and with broadcast loads), forced
//! through the planner, on the
//! fused and split-K paths: plain shapes (M, N not multiples of a row block,
//! head dims 1…256, GQA) and every masking case, against the f64 reference with NaN-poisoned
//! outputs.

mod common;

use common::*;
use xattn::cpu::reference;
use xattn::kernels::flash::Flash;
use xattn::kernels::Kernel;
use xattn::{Alignment, Attention, AttnShape, FusedConfig, Path, Plan};

/// The R and lanes of every flash dispatch of `plan`, asserted to be `config`'s (and at
/// least one).
fn assert_config(plan: &Plan, config: FusedConfig) {
    let found: Vec<(u32, bool, bool)> = plan
        .program()
        .dispatches()
        .filter_map(|d| match d.kernel {
            Kernel::Flash(Flash {
                r,
                lanes,
                broadcast,
                ..
            }) => Some((r, lanes > 1, broadcast > 1)),
            _ => None,
        })
        .collect();
    let want = (
        config.rows_per_invocation,
        config.subgroup_lanes,
        config.broadcast_loads,
    );
    assert!(
        !found.is_empty() && found.iter().all(|&x| x == want),
        "forced {config}, planned {found:?}\n{plan}"
    );
}

/// Shapes whose rows end inside an invocation's block and a workgroup's (R·64 rows), several
/// workgroups of rows, N = 1 and N not a tile multiple, every head dim bucket, GQA.
fn shapes() -> Vec<AttnShape> {
    let s = |batch, m, n, q_heads, kv_heads, d_k, d_v| AttnShape {
        batch,
        m,
        n,
        q_heads,
        kv_heads,
        d_k,
        d_v,
    };
    vec![
        s(1, 1, 1, 1, 1, 1, 1),
        s(1, 1, 300, 2, 2, 64, 64),
        s(2, 7, 33, 3, 3, 3, 5),
        s(1, 259, 77, 2, 1, 40, 40),
        s(1, 515, 130, 2, 2, 64, 64),
        s(2, 131, 1, 2, 2, 80, 64),
        s(1, 70, 257, 4, 2, 128, 40),
        s(1, 33, 300, 1, 1, 256, 256),
    ]
}

#[test]
fn every_rows_variant_matches_the_reference() {
    let Some(engine) = engine() else { return };
    for (i, s) in shapes().into_iter().enumerate() {
        let (q, k, v) = qkv(&s, 1.0, 1200 + i as u64);
        for path in [Path::Fused, Path::SplitK] {
            for config in configs_for(engine, &s) {
                let opts = Attention::default()
                    .with_path(path)
                    .with_fused_config(config);
                let what = format!("{} {config} {s}", path.name());
                let (plan, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(plan.path(), path, "{what}");
                assert_config(&plan, config);
                check_against_reference(&what, &s, opts.scale_for(s.d_k), (&q, &k, &v), &got);
            }
        }
    }
}

#[test]
fn every_rows_variant_masks_like_the_reference() {
    let Some(engine) = engine() else { return };
    let mut cases = mask_cases();
    // Rows of several 256-row workgroups whose ranges differ within an invocation's block.
    let tall = AttnShape {
        batch: 1,
        m: 600,
        n: 530,
        q_heads: 2,
        kv_heads: 1,
        d_k: 40,
        d_v: 40,
    };
    for (name, opts) in [
        (
            "causal top-left",
            Attention::default().with_causal(Alignment::TopLeft),
        ),
        (
            "window bottom-right",
            Attention::default().with_window(Alignment::BottomRight, 70, 3),
        ),
        (
            "mask [1,1,M,N] + kv_lens",
            Attention::default()
                .with_mask([1, 1, 600, 530], random_bools(600 * 530, 0.5, 1301))
                .with_kv_lens(vec![400]),
        ),
    ] {
        cases.push((format!("{name} tall"), tall, opts));
    }
    for (i, (name, s, opts)) in cases.into_iter().enumerate() {
        let (q, k, v) = qkv(&s, 1.0, 1300 + i as u64);
        let scale = opts.scale_for(s.d_k);
        let m = opts.masking();
        let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), m);
        let tol = budget_masked(&s, scale, (&q, &k, &v), m);
        let variants: Vec<(Path, FusedConfig)> = [Path::Fused, Path::SplitK]
            .into_iter()
            .flat_map(|path| configs_for(engine, &s).into_iter().map(move |c| (path, c)))
            .collect();
        let spread = on_gl(engine);
        for (vi, &(path, config)) in variants.iter().enumerate() {
            if spread && vi % variants.len() != i % variants.len() {
                continue;
            }
            {
                let o = opts.clone().with_path(path).with_fused_config(config);
                let what = format!("{} {config} {name} {s}", path.name());
                let (plan, got) = run_poisoned(engine, &s, (&q, &k, &v), &o)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(plan.path(), path, "{what}");
                assert_config(&plan, config);
                assert_close(&format!("{what} O"), &got.o, &want.o, tol.o);
                assert_close(&format!("{what} LSE"), &got.lse, &want.lse, tol.lse * 10.0);
            }
        }
    }
}

/// What the planner picks by itself: R = 4 for short rows and many queries, smaller R as
/// rows grow (R·(d_k + d_v) ≤ 512 floats), R = 1 where M would leave rows idle; subgroup
/// lanes (on a device with them, as CAPS) where M < 64.
#[test]
fn the_planner_picks_rows_by_head_dim_and_queries() {
    for (m, d, want) in [
        (4096, 40, 4),
        (1024, 64, 4),
        (1024, 80, 2),
        (1024, 128, 2),
        (1024, 256, 1),
        (1, 64, 1),
        (64, 64, 1),
        (65, 64, 2),
        (256, 64, 4),
    ] {
        let s = AttnShape {
            batch: 1,
            m,
            n: 77,
            q_heads: 8,
            kv_heads: 8,
            d_k: d,
            d_v: d,
        };
        let req = Attention::default()
            .with_path(Path::Fused)
            .request(s)
            .unwrap();
        let plan = Plan::new(&req, &CAPS).unwrap();
        assert_config(&plan, FusedConfig::rows(want).with_subgroup_lanes(m < 64));
        let plain = xattn::DeviceCaps {
            subgroup_lanes: None,
            ..CAPS
        };
        assert_config(&Plan::new(&req, &plain).unwrap(), FusedConfig::rows(want));
    }
}
