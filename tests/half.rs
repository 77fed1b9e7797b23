//! Half precision (f16 and bf16 storage, f32 compute) on every path, with native and packed
//! f16, masked and unmasked, tested as FlashAttention tests it: the error against an f64
//! reference on the same rounded inputs is at most twice the error of a naive attention that
//! runs in the same dtype (Q·Kᵀ accumulated in f32 and rounded, softmax in f32 rounded, P·V
//! accumulated in f32 and rounded), plus a tiny absolute term. bf16 results are held to the
//! bf16 naive, f16 to the f16 one.

mod common;

use common::*;
use xattn::cpu::mask::{masked_logit, MaskData, REMOVED_BELOW};
use xattn::cpu::reference;
use xattn::mask::Masking;
use xattn::plan::DeviceCaps;
use xattn::{Attention, AttnShape, DType, Engine, Path, Tensor};

/// The storages a device reads halves with: (dtype, native f16), each with an engine that
/// plans so (built once per test, so that pipelines compile once).
fn variants(engine: &Engine) -> Vec<((DType, bool), Engine)> {
    let with = |native_f16| {
        let caps = DeviceCaps {
            native_f16,
            ..*engine.caps()
        };
        Engine::with_caps(engine.context(), caps)
    };
    let packed = with(false);
    let mut out = vec![
        ((DType::F16, false), packed.clone()),
        ((DType::Bf16, false), packed),
    ];
    if engine.caps().native_f16 {
        out.push(((DType::F16, true), with(true)));
    }
    out
}

/// The naive attention in `dt`: the O every element of which FlashAttention's tests allow
/// twice the error of.
fn naive(
    s: &AttnShape,
    dt: DType,
    scale: f32,
    (q, k, v): (&[f32], &[f32], &[f32]),
    m: &Masking,
) -> Vec<f64> {
    let p = xattn::plan::base_params(s, scale, &m.spec(s).unwrap());
    let lens = m.lens_words(s);
    let words = m.mask_words().unwrap_or_default();
    let bias = m.bias_values().unwrap_or_default();
    let md = MaskData {
        lens: &lens,
        mask_bits: &words,
        bias: &bias,
    };
    let (dk, dv) = (s.d_k, s.d_v);
    let mut o = vec![0.0f64; s.batch * s.m * s.q_heads * dv];
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            let hk = h / (s.q_heads / s.kv_heads);
            for i in 0..s.m {
                let qr = &q[((b * s.m + i) * s.q_heads + h) * dk..][..dk];
                let logits: Vec<f32> = (0..s.n)
                    .map(|j| {
                        let kr = &k[((b * s.n + j) * s.kv_heads + hk) * dk..][..dk];
                        let dot = dt.round(qr.iter().zip(kr).map(|(a, c)| a * c).sum());
                        let x = dt.round(dot * scale);
                        let at = [b, h, i, j].map(|x| x as u32);
                        let l = masked_logit(&p, &md, x, at);
                        if l > REMOVED_BELOW {
                            dt.round(l)
                        } else {
                            l
                        }
                    })
                    .collect();
                let kept = |l: &f32| *l > REMOVED_BELOW;
                let max = logits.iter().copied().filter(kept).fold(f32::MIN, f32::max);
                if !logits.iter().any(kept) {
                    continue;
                }
                let e: Vec<f32> = logits
                    .iter()
                    .map(|&l| if kept(&l) { (l - max).exp() } else { 0.0 })
                    .collect();
                let sum: f32 = e.iter().sum();
                let pw: Vec<f32> = e.iter().map(|&x| dt.round(x / sum)).collect();
                for d in 0..dv {
                    let acc: f32 = (0..s.n)
                        .map(|j| pw[j] * v[((b * s.n + j) * s.kv_heads + hk) * dv + d])
                        .sum();
                    o[((b * s.m + i) * s.q_heads + h) * dv + d] = f64::from(dt.round(acc));
                }
            }
        }
    }
    o
}

/// Largest |got − want| (NaN counts as infinite).
fn max_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            let e = elem_err(g, w);
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

struct Case<'a> {
    name: &'a str,
    shape: AttnShape,
    opts: Attention,
    seed: u64,
}

/// Runs `case` with inputs stored as `dt` (read natively or packed) and O written as `out`
/// on `path`; asserts the error ratio and the LSE; returns (our error, naive error).
fn check(
    engine: &Engine,
    case: &Case,
    (dt, native): (DType, bool),
    out: DType,
    path: Path,
) -> (f64, f64) {
    let s = &case.shape;
    let (q, k, v) = qkv(s, 1.0, case.seed);
    let round = |x: &[f32]| x.iter().map(|&y| dt.round(y)).collect::<Vec<f32>>();
    let (q, k, v) = (round(&q), round(&k), round(&v));
    let opts = case.opts.clone().with_path(path).with_out_dtype(out);
    let scale = opts.scale_for(s.d_k);
    let m = opts.masking();
    let want = reference::attention_masked(s, &q, &k, &v, f64::from(scale), m);
    let naive_err = max_err(
        &naive(s, dt, scale, (&q, &k, &v), m)
            .iter()
            .map(|&x| x as f32)
            .collect::<Vec<_>>(),
        &want.o,
    );
    let ctx = engine.context();
    let up = |x: &[f32], dims: [usize; 4]| Tensor::upload_as(ctx, "x", x, &dims, dt).unwrap();
    let (tq, tk, tv) = (up(&q, s.q_dims()), up(&k, s.k_dims()), up(&v, s.v_dims()));
    let plan = engine.plan(&tq, &tk, &tv, &opts).unwrap();
    let what = format!(
        "{} {dt}{} → {out} {}",
        case.name,
        if native { " native" } else { "" },
        path.name()
    );
    assert!(
        plan.to_string().contains(if native {
            "read as f16"
        } else if dt == DType::F16 {
            "read as f16-packed"
        } else {
            "read as bf16-packed"
        }),
        "{what}: {plan}"
    );
    let call = engine.prepare(&tq, &tk, &tv, &opts).unwrap();
    assert_eq!(call.plan().to_string(), plan.to_string(), "{what}");
    assert_eq!(call.o().dtype(), out);
    call.o().fill(f32::NAN).unwrap();
    call.lse().fill(f32::NAN).unwrap();
    call.run().unwrap();
    let output = call.into_output();
    let o = output.o.to_host().unwrap();
    let err = max_err(&o, &want.o);
    let tiny = 1e-6;
    assert!(
        err <= 2.0 * naive_err + tiny,
        "{what}: error {err:e} > 2 × naive {naive_err:e} + {tiny:e}"
    );
    // LSE is computed and stored in f32 from the (rounded) inputs: the f32 error model.
    let tol = budget_masked(s, scale, (&q, &k, &v), m);
    let lse_tol = tol.lse * (1.0 + want.lse.iter().fold(0.0f64, |a, x| a.max(x.abs())));
    assert_close(
        &format!("{what} LSE"),
        &output.lse.to_host().unwrap(),
        &want.lse,
        lse_tol,
    );
    (err, naive_err)
}

#[test]
fn half_inputs_are_within_twice_the_naive_error_on_every_path() {
    let Some(engine) = engine() else { return };
    let cases = [
        Case {
            name: "diffusion-like",
            shape: shape(1, 130, 77, 2, 2, 40),
            opts: Attention::default(),
            seed: 11,
        },
        Case {
            name: "decode GQA",
            shape: shape(2, 1, 700, 4, 2, 64),
            opts: Attention::default(),
            seed: 12,
        },
        Case {
            name: "odd dims",
            shape: AttnShape {
                batch: 1,
                m: 33,
                n: 45,
                q_heads: 3,
                kv_heads: 3,
                d_k: 7,
                d_v: 5,
            },
            opts: Attention::default(),
            seed: 13,
        },
    ];
    let mut worst_ratio = [0.0f64; 3];
    let variants = variants(engine);
    for case in &cases {
        for (vi, (variant, engine)) in variants.iter().enumerate() {
            for path in Path::ALL {
                for out in [variant.0, DType::F32] {
                    let (err, naive) = check(engine, case, *variant, out, path);
                    worst_ratio[vi] = worst_ratio[vi].max(err / naive);
                }
            }
        }
    }
    eprintln!(
        "worst error / naive error: f16 packed {:.3}, bf16 {:.3}, f16 native {:.3}",
        worst_ratio[0], worst_ratio[1], worst_ratio[2]
    );
}

#[test]
fn half_inputs_with_every_mask_are_within_twice_the_naive_error() {
    let Some(engine) = engine() else { return };
    let variants = variants(engine);
    for (i, (name, shape, opts)) in mask_cases().into_iter().enumerate() {
        let case = Case {
            name: &name,
            shape,
            opts,
            seed: 300 + i as u64,
        };
        // Each (variant, path) pair meets a third of the cases, every case every variant
        // (on GL one variant per case, in turn).
        for (vi, (variant, engine)) in variants.iter().enumerate() {
            if on_gl(engine) && vi != i % variants.len() {
                continue;
            }
            check(engine, &case, *variant, variant.0, Path::ALL[(i + vi) % 3]);
        }
    }
}

/// Half tensors round-trip: what is uploaded as f16/bf16 comes back as stored, and f32
/// uploads round to nearest once.
#[test]
fn half_tensors_round_trip() {
    let Some(engine) = engine() else { return };
    let ctx = engine.context();
    let data = random(37, 3.0, 5);
    for dt in [DType::F16, DType::Bf16] {
        let t = Tensor::upload_as(ctx, "t", &data, &[37], dt).unwrap();
        assert_eq!(t.byte_len(), 76, "{dt}: 37 halves in whole words");
        let want: Vec<f32> = data.iter().map(|&x| dt.round(x)).collect();
        assert_eq!(t.to_host().unwrap(), want, "{dt}");
        t.write(&data[..].iter().map(|x| -x).collect::<Vec<_>>())
            .unwrap();
        let neg: Vec<f32> = want.iter().map(|x| -x).collect();
        assert_eq!(t.to_host().unwrap(), neg, "{dt} after write");
    }
    let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
    let t = Tensor::upload_f16(ctx, "h", &h, &[37]).unwrap();
    assert_eq!(t.to_host_f16().unwrap(), h);
    assert!(t.to_host_bf16().is_err(), "an f16 tensor is not bf16");
    let b: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let t = Tensor::upload_bf16(ctx, "b", &b, &[37]).unwrap();
    assert_eq!(t.to_host_bf16().unwrap(), b);
}

/// Mixed input types are refused with a typed error.
#[test]
fn mixed_input_types_are_refused() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 4, 9, 2, 2, 8);
    let (q, k, v) = qkv(&s, 1.0, 3);
    let ctx = engine.context();
    let tq = Tensor::upload_as(ctx, "q", &q, &s.q_dims(), DType::F16).unwrap();
    let tk = Tensor::upload_as(ctx, "k", &k, &s.k_dims(), DType::Bf16).unwrap();
    let tv = Tensor::upload_as(ctx, "v", &v, &s.v_dims(), DType::F16).unwrap();
    let err = engine
        .attention(&tq, &tk, &tv, &Attention::default())
        .unwrap_err();
    assert!(matches!(err, xattn::Error::Argument(_)), "{err}");
    assert!(err.to_string().contains("bf16"), "{err}");
}

/// The CPU executor runs half programs through the twins (widening what they read, packing O)
/// within the same bound.
#[test]
fn twins_run_half_programs_within_twice_the_naive_error() {
    use std::collections::HashMap;
    use xattn::cpu::program::{floats, run, words};
    use xattn::plan::{Plan, Request};
    let case_shape = AttnShape {
        batch: 2,
        m: 9,
        n: 70,
        q_heads: 4,
        kv_heads: 2,
        d_k: 12,
        d_v: 7,
    };
    let masked = Attention::default()
        .with_causal(xattn::Alignment::BottomRight)
        .with_kv_lens(vec![70, 31]);
    for (opts, seed) in [(Attention::default(), 21), (masked, 22)] {
        let (q, k, v) = qkv(&case_shape, 1.0, seed);
        for (dt, native) in [
            (DType::F16, true),
            (DType::F16, false),
            (DType::Bf16, false),
        ] {
            let round = |x: &[f32]| x.iter().map(|&y| dt.round(y)).collect::<Vec<f32>>();
            let (q, k, v) = (round(&q), round(&k), round(&v));
            let scale = opts.scale_for(case_shape.d_k);
            let m = opts.masking();
            let want = reference::attention_masked(&case_shape, &q, &k, &v, f64::from(scale), m);
            let naive_o: Vec<f32> = naive(&case_shape, dt, scale, (&q, &k, &v), m)
                .iter()
                .map(|&x| x as f32)
                .collect();
            let naive_err = max_err(&naive_o, &want.o);
            for path in Path::ALL {
                let req = Request {
                    path: Some(path),
                    ..opts.request_typed(case_shape, dt).unwrap()
                };
                let caps = DeviceCaps {
                    native_f16: native,
                    ..CAPS
                };
                let plan = Plan::new(&req, &caps).unwrap();
                let io = plan.io();
                let half = |x: &[f32]| -> Vec<u32> { bytemuck::pod_collect_to_vec(&dt.encode(x)) };
                let mut inputs = HashMap::from([
                    (io.q, half(&q)),
                    (io.k, half(&k)),
                    (io.v, half(&v)),
                    (io.lens, m.lens_words(&case_shape)),
                ]);
                // Absent from the program where the call has none.
                if let Some(bits) = m.mask_words() {
                    inputs.insert(io.mask, bits);
                }
                if let Some(values) = m.bias_values() {
                    inputs.insert(io.bias, words(&values));
                }
                let mut out = run(plan.program(), &inputs).unwrap();
                let o_words = out.remove(&io.o).unwrap();
                let o = dt.decode(bytemuck::cast_slice(&o_words), want.o.len());
                let err = max_err(&o, &want.o);
                let what = format!(
                    "twins {dt} native={native} {} {}",
                    path.name(),
                    m.spec(&case_shape).unwrap()
                );
                assert!(
                    err <= 2.0 * naive_err + 1e-6,
                    "{what}: {err:e} vs naive {naive_err:e}"
                );
                let lse = floats(&out.remove(&io.lse).unwrap());
                let tol = budget_masked(&case_shape, scale, (&q, &k, &v), m);
                let lse_tol = tol.lse * (1.0 + want.lse.iter().fold(0.0f64, |a, x| a.max(x.abs())));
                assert_close(&format!("{what} LSE"), &lse, &want.lse, lse_tol);
            }
        }
    }
}

/// A layer keeping f16/bf16 weights, reading half inputs and writing a half output: the f32
/// layer's error budget on the rounded weights and inputs plus the output's one rounding
/// (half an ulp: 2⁻¹¹ relative for f16, 2⁻⁸ for bf16).
#[test]
fn a_half_layer_matches_the_reference_on_its_rounded_weights() {
    use common::layer::{layer_tolerance, random_weights, reference_layer};
    use xattn::{MhaConfig, MhaOptions, MultiHeadAttention};
    let Some(engine) = engine() else { return };
    let c = MhaConfig {
        kv_heads: 2,
        ..MhaConfig::new(32, 4)
    };
    let (batch, m, n) = (2, 5, 40);
    for (dt, unit) in [(DType::F16, 2f64.powi(-11)), (DType::Bf16, 2f64.powi(-8))] {
        let w = random_weights(&c, 81);
        let round = |x: &[f32]| x.iter().map(|&y| dt.round(y)).collect::<Vec<f32>>();
        let rb = |b: &Option<Vec<f32>>| b.as_deref().map(round);
        let w = xattn::mha::MhaWeights {
            q: round(&w.q),
            k: round(&w.k),
            v: round(&w.v),
            o: round(&w.o),
            q_bias: rb(&w.q_bias),
            k_bias: rb(&w.k_bias),
            v_bias: rb(&w.v_bias),
            o_bias: rb(&w.o_bias),
        };
        let layer = MultiHeadAttention::new_as(engine, c, &w, dt).unwrap();
        assert_eq!(layer.dtype(), dt);
        let query = round(&random(batch * m * c.embed_dim, 1.0, 82));
        let source = round(&random(batch * n * c.embed_dim, 1.0, 83));
        let ctx = engine.context();
        let tq = Tensor::upload_as(ctx, "q", &query, &[batch, m, c.embed_dim], dt).unwrap();
        let ts = Tensor::upload_as(ctx, "s", &source, &[batch, n, c.embed_dim], dt).unwrap();
        let attention = Attention::default();
        let (want, _) = reference_layer(&c, &w, batch, (&query, &source, &source), &attention);
        let scale = f64::from(attention.scale_for(c.head_dim()));
        let (tol, _) = layer_tolerance(&c, &w, [&query, &source, &source], n, scale);
        let out_max = want.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        let cache = layer.project_source(&ts, &ts).unwrap();
        for out in [dt, DType::F32] {
            let opts =
                MhaOptions::default().with_attention(Attention::default().with_out_dtype(out));
            let bound = tol + if out == dt { unit * out_max } else { 0.0 };
            let got = layer.forward(&tq, &ts, &ts, &opts).unwrap().out;
            assert_eq!(got.dtype(), out);
            assert_close(
                &format!("{dt} layer → {out}"),
                &got.to_host().unwrap(),
                &want,
                bound,
            );
            let got = layer.forward_cached(&tq, &cache, &opts).unwrap().out;
            assert_close(
                &format!("{dt} cached layer → {out}"),
                &got.to_host().unwrap(),
                &want,
                bound,
            );
        }
    }
}
