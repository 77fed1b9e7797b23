//! Every GPU path against the f64 reference over a matrix of shapes.

mod common;

use common::*;
use xattn::{Attention, AttnShape, Path};

fn shape(
    batch: usize,
    m: usize,
    n: usize,
    q_heads: usize,
    kv_heads: usize,
    d_k: usize,
    d_v: usize,
) -> AttnShape {
    AttnShape {
        batch,
        m,
        n,
        q_heads,
        kv_heads,
        d_k,
        d_v,
    }
}

/// M ≠ N, M = 1, N = 1, sizes that are not tile multiples (1, 7, 33, 77, 257, 1500), head
/// dims 1…256 with d_v ≠ d_k, batch and heads > 1, GQA.
fn matrix() -> Vec<AttnShape> {
    vec![
        shape(1, 1, 1, 1, 1, 1, 1),
        shape(1, 1, 1500, 2, 2, 64, 64),
        shape(2, 7, 33, 3, 3, 3, 5),
        shape(1, 33, 7, 2, 2, 8, 8),
        shape(1, 77, 257, 2, 2, 40, 40),
        shape(2, 257, 77, 2, 2, 80, 64),
        shape(1, 1500, 1, 1, 1, 128, 128),
        shape(1, 33, 1500, 1, 1, 256, 256),
        shape(3, 7, 77, 2, 1, 128, 40),
        shape(1, 257, 33, 4, 2, 64, 32),
        shape(1, 1, 257, 8, 2, 80, 80),
    ]
}

fn check_path(path: Path, weights: bool) {
    let Some(engine) = engine() else { return };
    let mut worst = 0.0f64;
    for (i, s) in matrix().into_iter().enumerate() {
        let (q, k, v) = qkv(&s, 1.0, 100 + i as u64);
        let mut opts = Attention::default().with_path(path);
        if weights {
            opts = opts.with_weights();
        }
        let (plan, got) =
            run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(plan.path(), path);
        let err = check_against_reference(
            &format!("{} {s}", path.name()),
            &s,
            opts.scale_for(s.d_k),
            (&q, &k, &v),
            &got,
        );
        worst = worst.max(err);
    }
    eprintln!("{}: largest O error vs reference {worst:e}", path.name());
}

#[test]
fn three_pass_matches_reference_with_weights() {
    check_path(Path::ThreePass, true);
}

#[test]
fn fused_matches_reference() {
    check_path(Path::Fused, false);
}

#[test]
fn split_k_matches_reference() {
    check_path(Path::SplitK, false);
}

/// Logits of magnitude up to 1e4: no NaN or Inf, and still the reference's numbers.
#[test]
fn huge_logits_stay_finite_on_every_path() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 33, 257, 2, 2, 8, 8);
    let (q, k, v) = qkv(&s, 1.0, 7);
    // scale·d_k·max|q|·max|k| = 1250·8 = 1e4.
    let scale = 1250.0;
    for path in Path::ALL {
        let opts = Attention::default().with_scale(scale).with_path(path);
        let (_, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap();
        assert!(
            got.o.iter().chain(&got.lse).all(|x| x.is_finite()),
            "{}: non-finite output",
            path.name()
        );
        check_against_reference(
            &format!("huge logits {}", path.name()),
            &s,
            scale,
            (&q, &k, &v),
            &got,
        );
    }
}

/// The paths agree with each other, not only with the reference.
#[test]
fn paths_agree() {
    let Some(engine) = engine() else { return };
    let s = shape(2, 77, 1500, 4, 2, 64, 64);
    let (q, k, v) = qkv(&s, 1.0, 11);
    let runs: Vec<_> = Path::ALL
        .iter()
        .map(|&p| {
            run_poisoned(engine, &s, (&q, &k, &v), &Attention::default().with_path(p))
                .unwrap()
                .1
        })
        .collect();
    let tol = budget(&s, 0.125, &q, &k, &v);
    for r in &runs[1..] {
        let base: Vec<f64> = runs[0].o.iter().map(|&x| f64::from(x)).collect();
        assert_close("paths agree O", &r.o, &base, 2.0 * tol.o);
    }
}

/// Limits shrunk so that the three-pass scratch must be split into many chunks (row blocks
/// of one head) and the fused grid into head chunks: same numbers as the reference.
#[test]
fn split_work_under_small_limits() {
    let Some(engine) = engine() else { return };
    let small = xattn::plan::DeviceCaps {
        max_binding: 512 << 10,
        max_workgroups: 16,
        ..*engine.caps()
    };
    let tight = xattn::Engine::with_caps(engine.context(), small);
    for s in [
        shape(2, 257, 77, 3, 3, 16, 16),
        shape(1, 200, 60, 20, 4, 8, 8),
    ] {
        let (q, k, v) = qkv(&s, 1.0, 21);
        for path in Path::ALL {
            let mut opts = Attention::default().with_path(path);
            if path == Path::ThreePass {
                opts = opts.with_weights();
            }
            let (plan, got) = run_poisoned(&tight, &s, (&q, &k, &v), &opts)
                .unwrap_or_else(|e| panic!("{} {s} under small limits: {e}", path.name()));
            let min_dispatches = match path {
                Path::ThreePass => 3 * s.bh() * s.m.div_ceil(16),
                Path::Fused => s.bh().div_ceil(16),
                Path::SplitK => 1 + s.bh().div_ceil(16),
            };
            assert_eq!(
                plan.dispatches(),
                min_dispatches,
                "{}: unexpected split\n{plan}",
                path.name()
            );
            check_against_reference(
                &format!("small limits {}", path.name()),
                &s,
                opts.scale_for(s.d_k),
                (&q, &k, &v),
                &got,
            );
        }
    }
}

/// Sources longer than 65535 keys: Mesa's llvmpipe stops any shader loop after 65535
/// cumulative iterations, so no kernel may walk that many keys in one loop per invocation.
/// V holds key positions: random V would average out the keys a cut loop drops, within the
/// f32 error of a 70,000-term sum.
#[test]
fn sources_longer_than_65535_keys() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 3, 70_000, 1, 1, 4, 4);
    let (q, k, _) = qkv(&s, 1.0, 41);
    let v = positions(&s);
    for path in Path::ALL {
        let opts = Attention::default().with_path(path);
        let (_, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap();
        check_against_reference(
            &format!("N=70000 {}", path.name()),
            &s,
            opts.scale_for(s.d_k),
            (&q, &k, &v),
            &got,
        );
    }
}
