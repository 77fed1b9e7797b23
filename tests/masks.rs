//! Masks, lengths, windows and logit controls on every GPU path against the f64 reference,
//! and the typed errors for bad masking input.

mod common;

use common::*;
use xattn::cpu::reference;
use xattn::{Alignment, Attention, AttnShape, Error, Path};

#[test]
fn every_masking_case_matches_the_reference_on_every_path() {
    let Some(engine) = engine() else { return };
    let mut worst = 0.0f64;
    for (i, (name, s, opts)) in mask_cases().into_iter().enumerate() {
        let (q, k, v) = qkv(&s, 1.0, 900 + i as u64);
        let scale = opts.scale_for(s.d_k);
        let m = opts.masking();
        let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), m);
        let tol = budget_masked(&s, scale, (&q, &k, &v), m);
        for path in Path::ALL {
            let mut o = opts.clone().with_path(path);
            if path == Path::ThreePass {
                o = o.with_weights();
            }
            let what = format!("{} {name} {s}", path.name());
            let (plan, got) = run_poisoned(engine, &s, (&q, &k, &v), &o)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(plan.path(), path);
            worst = worst.max(assert_close(&format!("{what} O"), &got.o, &want.o, tol.o));
            assert_close(&format!("{what} LSE"), &got.lse, &want.lse, tol.lse * 10.0);
            if let Some(w) = &got.weights {
                assert_close(&format!("{what} P"), w, &want.weights, tol.weights);
            }
        }
    }
    eprintln!("masking: largest O error vs reference {worst:e}");
}

#[test]
fn fully_masked_rows_output_zero_and_lse_minus_infinity() {
    let Some(engine) = engine() else { return };
    let s = AttnShape {
        batch: 2,
        m: 9,
        n: 20,
        q_heads: 2,
        kv_heads: 1,
        d_k: 8,
        d_v: 8,
    };
    let (q, k, v) = qkv(&s, 1.0, 31);
    // Batch 1 sees no key; in batch 0, bottom-right alignment with q_len 9 > kv_len 5 leaves
    // rows 0..4 before the diagonal.
    let opts = Attention::default()
        .with_kv_lens(vec![5, 0])
        .with_causal(Alignment::BottomRight);
    for path in Path::ALL {
        let o = opts.clone().with_path(path);
        let (_, got) = run_poisoned(engine, &s, (&q, &k, &v), &o).unwrap();
        for b in 0..2 {
            for i in 0..9 {
                let empty = b == 1 || i < 4;
                for h in 0..2 {
                    let lse = got.lse[(b * 2 + h) * 9 + i];
                    let row = &got.o[((b * 9 + i) * 2 + h) * 8..][..8];
                    if empty {
                        assert_eq!(lse, f32::NEG_INFINITY, "{} b{b} h{h} row {i}", path.name());
                        assert!(
                            row.iter().all(|&x| x == 0.0),
                            "{} row {i}: {row:?}",
                            path.name()
                        );
                    } else {
                        assert!(lse.is_finite(), "{} b{b} h{h} row {i}: {lse}", path.name());
                        assert!(row.iter().all(|x| x.is_finite()), "{} row {i}", path.name());
                    }
                }
            }
        }
    }
}

fn plan_err(s: &AttnShape, opts: &Attention) -> Error {
    match opts.request(*s) {
        Err(e) => e,
        Ok(_) => panic!("{s}: masking {:?} was accepted", opts.masking()),
    }
}

#[test]
fn bad_masking_input_gets_a_typed_error() {
    let s = AttnShape {
        batch: 2,
        m: 5,
        n: 7,
        q_heads: 4,
        kv_heads: 2,
        d_k: 8,
        d_v: 8,
    };
    let a = Attention::default;
    let cases: Vec<(Attention, &str)> = vec![
        (a().with_mask([2, 4, 5, 6], vec![true; 240]), "broadcast"),
        (a().with_mask([2, 2, 5, 7], vec![true; 140]), "broadcast"),
        (a().with_mask([1, 1, 5, 7], vec![true; 34]), "35"),
        (a().with_bias([3, 1, 1, 7], vec![0.0; 21]), "broadcast"),
        (a().with_bias([1, 1, 1, 7], vec![f32::NAN; 7]), "finite"),
        (
            a().with_bias([1, 1, 1, 7], vec![f32::INFINITY; 7]),
            "finite",
        ),
        (a().with_q_lens(vec![5]), "one per batch entry"),
        (a().with_kv_lens(vec![7, 8]), "kv_lens[1] = 8"),
        (a().with_q_lens(vec![6, 0]), "q_lens[0] = 6"),
        (a().with_softcap(0.0), "softcap"),
        (a().with_softcap(f32::INFINITY), "softcap"),
        // Finite values whose logits f32 cannot carry through the kernels' pre-scaling.
        (a().with_bias([1, 1, 1, 7], vec![3e38; 7]), "at most 1e30"),
        (a().with_softcap(1e31), "at most 1e30"),
        (a().with_scale(3.4e38), "scale is 3.4e38"),
        (a().with_scale(f32::INFINITY), "scale must be finite"),
        (
            a().with_scale(0.5).with_key_segment(0, 5, 1e38),
            "scale × factor of key segment [0, 5) is 5e37",
        ),
        (a().with_key_segment(2, 2, 1.0), "non-empty"),
        (a().with_key_segment(0, 8, 1.0), "within the 7 keys"),
        (a().with_key_segment(0, 3, f32::NAN), "factor"),
        (
            a().with_key_segment(0, 3, 2.0).with_key_segment(2, 5, 2.0),
            "overlap",
        ),
        (
            (0..5).fold(a(), |o, g| o.with_key_segment(g, g + 1, 2.0)),
            "at most 4",
        ),
        (
            a().with_causal(Alignment::TopLeft)
                .with_window(Alignment::BottomRight, 1, 1),
            "disagree on alignment",
        ),
    ];
    for (opts, needle) in cases {
        let e = plan_err(&s, &opts);
        let text = e.to_string();
        assert!(
            text.contains(needle),
            "error for {:?} was `{text}`, expected it to mention `{needle}`",
            opts.masking()
        );
    }
}

#[test]
fn plans_describe_their_masks() {
    let s = AttnShape {
        batch: 1,
        m: 5,
        n: 7,
        q_heads: 1,
        kv_heads: 1,
        d_k: 8,
        d_v: 8,
    };
    let opts = Attention::default()
        .with_causal(Alignment::BottomRight)
        .with_softcap(30.0);
    let req = xattn::plan::Request {
        shape: s,
        scale: 1.0,
        weights: false,
        path: None,
        masks: opts.masking().spec(&s).unwrap(),
        dtype: xattn::DType::F32,
        out_dtype: xattn::DType::F32,
        stats: Default::default(),
        pool: None,
        fused: None,
    };
    let text = xattn::Plan::new(&req, &CAPS).unwrap().to_string();
    assert!(
        text.contains("masks: causal bottom-right, softcap 30"),
        "{text}"
    );
}
