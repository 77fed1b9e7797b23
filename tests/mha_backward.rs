//! The layer's backward (`MultiHeadAttention::backward`, `backward_cached`) against the f64
//! reference composed from the attention's and the projections' reference backwards:
//! gradients of the inputs, of every weight and bias; GQA/MQA, kdim/vdim ≠ E, inner width ≠ E,
//! no biases, key padding, causal, half weights, the cached source path, and the errors.

mod common;

use common::layer::random_weights;
use common::layer_grad::{amax, backward_poisoned, compare};
use common::*;
use xattn::mha::reference as layer_ref;
use xattn::{
    Alignment, Attention, DType, Engine, MhaConfig, MhaOptions, MultiHeadAttention, Tensor,
};

const EPS: f64 = f32::EPSILON as f64;

struct Case {
    config: MhaConfig,
    dims: (usize, usize, usize),
    opts: MhaOptions,
    weights: DType,
}

fn case(config: MhaConfig, dims: (usize, usize, usize), opts: MhaOptions) -> Case {
    Case {
        config,
        dims,
        opts,
        weights: DType::F32,
    }
}

fn upload3(engine: &Engine, data: &[f32], dims: [usize; 3]) -> Tensor {
    engine.upload(data, &dims).unwrap()
}

fn check(engine: &Engine, name: &str, c: &Case, seed: u64) -> f64 {
    let cfg = c.config;
    let (b, m, n) = c.dims;
    let mut w = random_weights(&cfg, seed);
    if c.weights != DType::F32 {
        // The weights as the device holds them.
        let round = |x: &mut Vec<f32>| *x = c.weights.decode(&c.weights.encode(x), x.len());
        for t in [&mut w.q, &mut w.k, &mut w.v, &mut w.o] {
            round(t);
        }
        for t in [&mut w.q_bias, &mut w.k_bias, &mut w.v_bias, &mut w.o_bias]
            .into_iter()
            .flatten()
        {
            round(t);
        }
    }
    let layer = MultiHeadAttention::new_as(engine, cfg, &w, c.weights).unwrap();
    let query = random(b * m * cfg.embed_dim, 1.0, seed + 10);
    let key = random(b * n * cfg.kdim, 1.0, seed + 11);
    let value = random(b * n * cfg.vdim, 1.0, seed + 12);
    let d_out = random(b * m * cfg.embed_dim, 1.0, seed + 13);
    let attention = c.opts.attention_for(b, n).unwrap().into_owned();
    let scale = f64::from(attention.scale_for(cfg.head_dim()));
    let want = layer_ref::layer_backward(
        &cfg,
        &w,
        (&query, &key, &value),
        &d_out,
        b,
        scale,
        attention.masking(),
    );
    let tensors = (
        &upload3(engine, &query, [b, m, cfg.embed_dim]),
        &upload3(engine, &key, [b, n, cfg.kdim]),
        &upload3(engine, &value, [b, n, cfg.vdim]),
        &upload3(engine, &d_out, [b, m, cfg.embed_dim]),
    );
    let got = backward_poisoned(&layer, tensors, &c.opts);
    // The inputs are uniform in [-1, 1).
    compare(name, &cfg, c.dims, scale, &w, [1.0, 1.0], &got, &want)
}

#[test]
fn layer_gradients_match_the_f64_reference() {
    let Some(engine) = engine() else { return };
    let base = MhaConfig::new(32, 4);
    let o = MhaOptions::default;
    let mut cases = vec![
        ("plain E32 H4", case(base, (2, 5, 37), o())),
        (
            "kdim/vdim ≠ E, GQA 4/2, not tile multiples",
            case(
                MhaConfig::new(80, 4)
                    .with_kv_heads(2)
                    .with_kdim(130)
                    .with_vdim(7),
                (1, 67, 129),
                o(),
            ),
        ),
        (
            "no bias, MQA",
            case(base.with_bias(false).with_kv_heads(1), (2, 3, 20), o()),
        ),
        (
            "key padding, causal bottom-right",
            case(
                base.with_kdim(24),
                (2, 6, 19),
                o().with_key_padding_mask((0..38).map(|j| j % 19 >= 15 + j / 19).collect())
                    .with_attention(Attention::default().with_causal(Alignment::BottomRight)),
            ),
        ),
        (
            "inner width 24 ≠ E 16, GQA 4/2",
            case(
                MhaConfig::new(16, 4).with_inner_dim(24).with_kv_heads(2),
                (2, 5, 13),
                o(),
            ),
        ),
    ];
    cases.push((
        "attention dropout 0.2",
        case(
            base.with_kv_heads(2),
            (2, 9, 23),
            o().with_attention(Attention::default().with_dropout(0.2, 3, 0)),
        ),
    ));
    cases.push((
        "bf16 weights",
        Case {
            weights: DType::Bf16,
            ..case(base, (1, 7, 11), o())
        },
    ));
    for (i, (name, c)) in cases.iter().enumerate() {
        if on_gl(engine) && i % 2 == 1 {
            continue;
        }
        let worst = check(engine, name, c, 40 + 100 * i as u64);
        eprintln!("{name}: worst error {worst:.4} of budget");
    }
}

#[test]
fn the_cached_path_gives_the_caches_gradients() {
    let Some(engine) = engine() else { return };
    let cfg = MhaConfig::new(32, 4).with_kv_heads(2);
    let (b, m, n) = (2, 6, 21);
    let w = random_weights(&cfg, 7);
    let layer = MultiHeadAttention::new(engine, cfg, &w).unwrap();
    let query = random(b * m * cfg.embed_dim, 1.0, 70);
    let key = random(b * n * cfg.kdim, 1.0, 71);
    let value = random(b * n * cfg.vdim, 1.0, 72);
    let d_out = random(b * m * cfg.embed_dim, 1.0, 73);
    let (q, k, v, dy) = (
        upload3(engine, &query, [b, m, cfg.embed_dim]),
        upload3(engine, &key, [b, n, cfg.kdim]),
        upload3(engine, &value, [b, n, cfg.vdim]),
        upload3(engine, &d_out, [b, m, cfg.embed_dim]),
    );
    let opts = MhaOptions::default();
    let cache = layer.project_source(&k, &v).unwrap();
    let cached = layer.backward_cached(&q, &cache, &dy, &opts).unwrap();
    let raw = layer.backward(&q, &k, &v, &dy, &opts).unwrap();
    assert!(cached.d_weights[1].is_none() && cached.d_weights[2].is_none());
    assert_eq!(cached.d_key.dims(), [b, n, cfg.kv_heads, cfg.head_dim()]);
    // The query side and W^Q, W^O are the raw path's, bit for bit: the same program pieces
    // on the same projected K and V.
    assert_eq!(
        cached.d_query.to_host().unwrap(),
        raw.d_query.to_host().unwrap()
    );
    for i in [0, 3] {
        let (a, r) = (&cached.d_weights[i], &raw.d_weights[i]);
        assert_eq!(
            a.as_ref().unwrap().to_host().unwrap(),
            r.as_ref().unwrap().to_host().unwrap()
        );
    }
    // The cache's gradients are the attention's dK and dV, which the raw path maps back
    // through W^K and W^V: d_key = dK·W^K.
    let dk = cached.d_key.to_host().unwrap();
    let kv = cfg.kv_dim();
    let mapped: Vec<f64> = (0..b * n * cfg.kdim)
        .map(|e| {
            let (row, i) = (e / cfg.kdim, e % cfg.kdim);
            (0..kv)
                .map(|o| f64::from(dk[row * kv + o]) * f64::from(w.k[o * cfg.kdim + i]))
                .sum()
        })
        .collect();
    let raw_dkey = raw.d_key.to_host().unwrap();
    let tol = 4.0 * EPS * (kv as f64 + 1.0) * amax(&mapped) * 4.0;
    assert_close("d_key through W^K", &raw_dkey, &mapped, tol);
}

#[test]
fn bad_backward_calls_are_typed_errors() {
    let Some(engine) = engine() else { return };
    let cfg = MhaConfig::new(16, 2);
    let layer = MultiHeadAttention::new(engine, cfg, &random_weights(&cfg, 9)).unwrap();
    let x = upload3(engine, &random(2 * 3 * 16, 1.0, 1), [2, 3, 16]);
    let s = upload3(engine, &random(2 * 5 * 16, 1.0, 2), [2, 5, 16]);
    let opts = MhaOptions::default();
    let bad = upload3(engine, &random(2 * 4 * 16, 1.0, 3), [2, 4, 16]);
    let err = layer.backward(&x, &s, &s, &bad, &opts).unwrap_err();
    assert!(err.to_string().contains("d_out"), "{err}");
    let half = Tensor::upload_as(
        engine.context(),
        "d",
        &random(96, 1.0, 4),
        &[2, 3, 16],
        DType::F16,
    )
    .unwrap();
    let err = layer.backward(&x, &s, &s, &half, &opts).unwrap_err();
    assert!(err.to_string().contains("f32"), "{err}");
}

/// A training step's update: `set_weights` writes new weights in place; a forward and a
/// backward prepared before it read them at their next run, bit for bit as a layer built with
/// them; a source cache projected before is refused; another set of biases is an error.
#[test]
fn set_weights_updates_prepared_calls_in_place() {
    let Some(engine) = engine() else { return };
    let cfg = MhaConfig::new(16, 2).with_kdim(12).with_vdim(12);
    let (b, m, n) = (1, 3, 7);
    let (w1, w2) = (random_weights(&cfg, 21), random_weights(&cfg, 22));
    let mut layer = MultiHeadAttention::new(engine, cfg, &w1).unwrap();
    let q = upload3(engine, &random(b * m * 16, 1.0, 23), [b, m, 16]);
    let s = upload3(engine, &random(b * n * 12, 1.0, 24), [b, n, 12]);
    let dy = upload3(engine, &random(b * m * 16, 1.0, 25), [b, m, 16]);
    let opts = MhaOptions::default();
    let forward = layer.prepare(&q, &s, &s, &opts).unwrap();
    let backward = layer.prepare_backward(&q, &s, &s, &dy, &opts).unwrap();
    let cache = layer.project_source(&s, &s).unwrap();
    forward.run().unwrap();
    let before = forward.output().out.to_host().unwrap();

    layer.set_weights(&w2).unwrap();
    forward.run().unwrap();
    backward.run().unwrap();
    let fresh = MultiHeadAttention::new(engine, cfg, &w2).unwrap();
    let want = fresh.forward(&q, &s, &s, &opts).unwrap();
    let got = forward.output().out.to_host().unwrap();
    assert_ne!(
        got, before,
        "the prepared forward still reads the old weights"
    );
    assert_eq!(got, want.out.to_host().unwrap());
    let want = fresh.backward(&q, &s, &s, &dy, &opts).unwrap();
    let got = backward.output();
    for (a, w) in got.d_weights.iter().zip(&want.d_weights) {
        let (a, w) = (a.as_ref().unwrap(), w.as_ref().unwrap());
        assert_eq!(a.to_host().unwrap(), w.to_host().unwrap());
    }
    assert_eq!(
        got.d_query.to_host().unwrap(),
        want.d_query.to_host().unwrap()
    );

    let err = layer.forward_cached(&q, &cache, &opts).unwrap_err();
    assert!(err.to_string().contains("source cache"), "{err}");
    let mut no_bias = w2.clone();
    no_bias.k_bias = None;
    let err = layer.set_weights(&no_bias).unwrap_err();
    assert!(err.to_string().contains("bias"), "{err}");
    let mut short = w2;
    short.q.pop();
    assert!(layer.set_weights(&short).is_err());
}
