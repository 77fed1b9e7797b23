//! The multi-head attention layer against an f64 reference built from the same weights:
//! projections, GQA, kdim/vdim ≠ E, inner width ≠ E, biases, masks, weights, and the source
//! cache; and its weights read back from safetensors files in every name family (no GPU).

mod common;

use common::files::safetensors_bytes;
use common::layer::*;
use common::*;
use xattn::cpu::reference;
use xattn::mha::weights::{LayerFile, Names};
use xattn::mha::{MhaWeights, SourceCache};
use xattn::{
    Alignment, Attention, Engine, MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights, Tensor,
};

struct Case {
    config: MhaConfig,
    dims: (usize, usize, usize),
    opts: MhaOptions,
}

fn upload3(engine: &Engine, data: &[f32], dims: [usize; 3]) -> Tensor {
    engine.upload(data, &dims).unwrap()
}

fn check_case(engine: &Engine, name: &str, case: &Case, seed: u64) -> f64 {
    let c = case.config;
    let (b, m, n) = case.dims;
    let w = random_weights(&c, seed);
    let layer = MultiHeadAttention::new(engine, c, &w).unwrap();
    let query = random(b * m * c.embed_dim, 1.0, seed + 10);
    let key = random(b * n * c.kdim, 1.0, seed + 11);
    let value = random(b * n * c.vdim, 1.0, seed + 12);
    let mut attention = case.opts.attention.clone();
    if let Some(kpm) = &case.opts.key_padding_mask {
        let keep = kpm.iter().map(|&x| !x).collect();
        attention = attention.with_mask([b, 1, 1, n], keep);
    }
    let (want, want_w) = reference_layer(&c, &w, b, (&query, &key, &value), &attention);
    let scale = f64::from(attention.scale_for(c.head_dim()));
    let (tol, w_tol) = layer_tolerance(&c, &w, [&query, &key, &value], n, scale);
    let q = upload3(engine, &query, [b, m, c.embed_dim]);
    let k = upload3(engine, &key, [b, n, c.kdim]);
    let v = upload3(engine, &value, [b, n, c.vdim]);
    let got = layer.forward(&q, &k, &v, &case.opts).unwrap();
    let err = assert_close(
        &format!("{name} out"),
        &got.out.to_host().unwrap(),
        &want,
        tol,
    );
    let h = c.num_heads;
    match (case.opts.need_weights, &got.weights) {
        (NeedWeights::None, None) => {}
        (NeedWeights::PerHead, Some(t)) => {
            assert_eq!(t.dims(), [b, h, m, n]);
            assert_close(
                &format!("{name} weights"),
                &t.to_host().unwrap(),
                &want_w,
                w_tol,
            );
        }
        (NeedWeights::Averaged, Some(t)) => {
            assert_eq!(t.dims(), [b, m, n]);
            let mean: Vec<f64> = (0..b * m * n)
                .map(|e| {
                    let (bb, ij) = (e / (m * n), e % (m * n));
                    (0..h)
                        .map(|hh| want_w[(bb * h + hh) * m * n + ij])
                        .sum::<f64>()
                        / h as f64
                })
                .collect();
            assert_close(
                &format!("{name} mean weights"),
                &t.to_host().unwrap(),
                &mean,
                w_tol,
            );
        }
        (need, got) => panic!("{name}: asked {need:?}, got weights {:?}", got.is_some()),
    }
    err
}

fn cases() -> Vec<(&'static str, Case)> {
    let base = MhaConfig::new(32, 4);
    let o = MhaOptions::default;
    vec![
        (
            "plain E32 H4",
            Case {
                config: base,
                dims: (2, 5, 37),
                opts: o(),
            },
        ),
        (
            "kdim/vdim ≠ E, GQA 4/2, not tile multiples",
            Case {
                config: MhaConfig::new(80, 4)
                    .with_kv_heads(2)
                    .with_kdim(130)
                    .with_vdim(7),
                dims: (1, 67, 129),
                opts: o(),
            },
        ),
        (
            "no bias, MQA",
            Case {
                config: base.with_bias(false).with_kv_heads(1),
                dims: (2, 3, 20),
                opts: o(),
            },
        ),
        (
            "key padding + averaged weights",
            Case {
                config: base.with_kdim(24),
                dims: (2, 6, 19),
                opts: o()
                    .with_key_padding_mask((0..38).map(|j| j % 19 >= 15 + j / 19).collect())
                    .with_need_weights(NeedWeights::Averaged),
            },
        ),
        (
            "per-head weights, causal bottom-right",
            Case {
                config: base,
                dims: (1, 9, 14),
                opts: o()
                    .with_need_weights(NeedWeights::PerHead)
                    .with_attention(Attention::default().with_causal(Alignment::BottomRight)),
            },
        ),
        (
            "inner width 24 ≠ E 16 (T5 v1.1), GQA 4/2, kdim 10",
            Case {
                config: MhaConfig::new(16, 4)
                    .with_inner_dim(24)
                    .with_kv_heads(2)
                    .with_kdim(10),
                dims: (2, 5, 13),
                opts: o().with_need_weights(NeedWeights::PerHead),
            },
        ),
        (
            "decode M=1 over N=1500",
            Case {
                config: MhaConfig::new(64, 4),
                dims: (1, 1, 1500),
                opts: o(),
            },
        ),
    ]
}

#[test]
fn layer_matches_the_f64_reference() {
    let Some(engine) = engine() else { return };
    let mut worst = 0.0f64;
    for (i, (name, case)) in cases().iter().enumerate() {
        worst = worst.max(check_case(engine, name, case, 40 + 20 * i as u64));
    }
    eprintln!("layer: largest output error vs reference {worst:e}");
}

#[test]
fn self_attention_is_the_same_layer() {
    let Some(engine) = engine() else { return };
    let c = MhaConfig::new(32, 8);
    let w = random_weights(&c, 5);
    let layer = MultiHeadAttention::new(engine, c, &w).unwrap();
    let x = random(2 * 11 * 32, 1.0, 6);
    let t = upload3(engine, &x, [2, 11, 32]);
    let opts =
        MhaOptions::default().with_attention(Attention::default().with_causal(Alignment::TopLeft));
    let got = layer
        .forward(&t, &t, &t, &opts)
        .unwrap()
        .out
        .to_host()
        .unwrap();
    let (want, _) = reference_layer(&c, &w, 2, (&x, &x, &x), &opts.attention);
    assert_close(
        "self-attention",
        &got,
        &want,
        layer_tolerance(&c, &w, [&x, &x, &x], 11, 1.0 / (c.head_dim() as f64).sqrt()).0,
    );
}

#[test]
fn source_cache_equals_recompute_and_belongs_to_its_layer() {
    let Some(engine) = engine() else { return };
    let c = MhaConfig::new(48, 6).with_kdim(20).with_vdim(20);
    let layer = MultiHeadAttention::new(engine, c, &random_weights(&c, 70)).unwrap();
    let source = random(2 * 40 * 20, 1.0, 71);
    let src = upload3(engine, &source, [2, 40, 20]);
    let cache: SourceCache = layer.project_source(&src, &src).unwrap();
    assert_eq!(cache.dims(), (2, 40));
    for step in 0..3 {
        let query = random(2 * 48, 1.0, 72 + step);
        let q = upload3(engine, &query, [2, 1, 48]);
        let opts = MhaOptions::default();
        let fresh = layer
            .forward(&q, &src, &src, &opts)
            .unwrap()
            .out
            .to_host()
            .unwrap();
        let cached = layer
            .forward_cached(&q, &cache, &opts)
            .unwrap()
            .out
            .to_host()
            .unwrap();
        // Same kernels on the same values: bit-for-bit equal, not merely close.
        assert_eq!(fresh, cached, "step {step}");
        assert!(fresh.iter().all(|x| x.is_finite()));
    }
    let other = MultiHeadAttention::new(engine, c, &random_weights(&c, 70)).unwrap();
    let q = upload3(engine, &random(2 * 48, 1.0, 80), [2, 1, 48]);
    let err = other
        .forward_cached(&q, &cache, &MhaOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("source cache was projected by layer"), "{err}");
}

/// A prepared decoder step (cached source) run again after writing the next query gives,
/// bit for bit, what a fresh `forward_cached` gives for that query.
#[test]
fn a_prepared_decoder_step_equals_forward_cached() {
    let Some(engine) = engine() else { return };
    let c = MhaConfig::new(48, 6).with_kdim(20).with_vdim(20);
    let layer = MultiHeadAttention::new(engine, c, &random_weights(&c, 90)).unwrap();
    let src = upload3(engine, &random(2 * 40 * 20, 1.0, 91), [2, 40, 20]);
    let cache = layer.project_source(&src, &src).unwrap();
    let q = upload3(engine, &random(2 * 48, 1.0, 92), [2, 1, 48]);
    let opts = MhaOptions::default();
    let step = layer.prepare_cached(&q, &cache, &opts).unwrap();
    for i in 0..3 {
        let query = random(2 * 48, 1.0, 93 + i);
        q.write(&query).unwrap();
        step.output().out.fill(f32::NAN).unwrap();
        step.run().unwrap();
        let prepared = step.output().out.to_host().unwrap();
        let fresh = layer
            .forward_cached(&q, &cache, &opts)
            .unwrap()
            .out
            .to_host()
            .unwrap();
        assert_eq!(prepared, fresh, "step {i}");
        assert!(prepared.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn bad_layer_input_gets_a_typed_error() {
    let Some(engine) = engine() else { return };
    let c = MhaConfig::new(32, 4).with_kdim(16);
    let w = random_weights(&c, 1);
    assert!(MultiHeadAttention::new(engine, MhaConfig::new(30, 4), &w)
        .unwrap_err()
        .to_string()
        .contains("multiple of num_heads"));
    let short = MhaWeights {
        k: vec![0.5; 10],
        ..w.clone()
    };
    assert!(MultiHeadAttention::new(engine, c, &short)
        .unwrap_err()
        .to_string()
        .contains("W_k has 10 elements"));
    let layer = MultiHeadAttention::new(engine, c, &w).unwrap();
    let q = upload3(engine, &random(2 * 3 * 32, 1.0, 2), [2, 3, 32]);
    let k_bad = upload3(engine, &random(2 * 5 * 32, 1.0, 3), [2, 5, 32]);
    let k = upload3(engine, &random(2 * 5 * 16, 1.0, 3), [2, 5, 16]);
    let v = upload3(engine, &random(2 * 5 * 32, 1.0, 4), [2, 5, 32]);
    let opts = MhaOptions::default();
    let e = layer
        .forward(&q, &k_bad, &v, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("key has dims [2, 5, 32]: axis 2 must be 16"),
        "{e}"
    );
    let e = layer
        .forward(
            &q,
            &k,
            &v,
            &opts.clone().with_key_padding_mask(vec![false; 9]),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("[batch, N] = [2, 5]"), "{e}");
    let nan_scale = opts
        .clone()
        .with_attention(Attention::default().with_scale(f32::NAN));
    let e = layer
        .forward(&q, &k, &v, &nan_scale)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scale must be finite"), "{e}");
}

/// The projection kernel alone, over sizes that are not tile multiples, against f64 with the
/// rounding bound of an f32 dot product: n·ε·Σ_i|x_i·w_i| per element, plus the bias add.
#[test]
fn linear_matches_f64_over_awkward_sizes() {
    let Some(engine) = engine() else { return };
    for (i, &(rows, in_dim, out_dim, bias)) in [
        (1, 1, 1, true),
        (5, 7, 3, false),
        (67, 130, 80, true),
        (130, 64, 65, true),
        (64, 16, 64, false),
        (2, 300, 1, true),
    ]
    .iter()
    .enumerate()
    {
        let seed = 200 + 10 * i as u64;
        let x = random(rows * in_dim, 1.0, seed);
        let w = random(out_dim * in_dim, 0.5, seed + 1);
        let b = bias.then(|| random(out_dim, 0.5, seed + 2));
        let xt = engine.upload(&x, &[rows, in_dim]).unwrap();
        let wt = engine.upload(&w, &[out_dim, in_dim]).unwrap();
        let bt = b.as_ref().map(|b| engine.upload(b, &[out_dim]).unwrap());
        let y = engine.linear(&xt, &wt, bt.as_ref()).unwrap();
        assert_eq!(y.dims(), [rows, out_dim]);
        let got = y.to_host().unwrap();
        let want = reference::linear(&x, &w, b.as_deref(), in_dim);
        let eps = f64::from(f32::EPSILON);
        for (e, (&g, &r)) in got.iter().zip(&want).enumerate() {
            let (row, col) = (e / out_dim, e % out_dim);
            let abs_sum: f64 = (0..in_dim)
                .map(|d| f64::from(x[row * in_dim + d] * w[col * in_dim + d]).abs())
                .sum();
            let tol = eps * (in_dim as f64 * abs_sum + 2.0 * r.abs());
            assert!(
                (f64::from(g) - r).abs() <= tol,
                "linear {rows}×{in_dim}→{out_dim} element {e}: got {g}, want {r}, tol {tol:e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Weights from safetensors files (no GPU).

/// Every name family reads back exactly the weights written under its names: the biases the
/// file holds and no others, the inner width from W^Q, PyTorch's packed blocks split right.
#[test]
fn every_name_family_reads_back_what_was_written() {
    let e8 = MhaConfig::new(8, 2);
    let cases = [
        ("pytorch", e8, [true; 4]),
        (
            "pytorch",
            e8.with_kdim(6).with_vdim(5),
            [false, false, false, true],
        ),
        ("hf", e8.with_kdim(6), [true, false, true, true]),
        ("hf", e8, [false; 4]),
        (
            "diffusers",
            e8.with_kdim(6).with_inner_dim(12),
            [false, false, false, true],
        ),
        (
            "diffusers",
            e8.with_inner_dim(4).with_kv_heads(1),
            [true, false, false, true],
        ),
        ("t5", e8.with_inner_dim(12), [false; 4]),
    ];
    let prefix = "model.layers.3.attn.";
    for (i, (names, c, keep)) in cases.into_iter().enumerate() {
        let what = format!("{names} {c:?} biases {keep:?}");
        let w = keep_biases(random_weights(&c, 300 + i as u64), keep);
        let bytes = safetensors_bytes(&layer_tensors(names, prefix, &c, &w));
        let file = LayerFile::open(&bytes, prefix, None).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(file.names().as_str(), names, "{what}");
        assert_eq!(file.inner_dim(), c.inner_dim, "{what}");
        assert_eq!(file.weights(&c).unwrap(), w, "{what}");
        assert_eq!(
            file.weights(&c.with_bias(false)).unwrap(),
            keep_biases(w, [false; 4]),
            "{what}: bias = false ignores the file's biases"
        );
    }
}

/// A prefix holding the projections of two families loads only with one named; a config whose
/// inner width disagrees with the file says how to set it.
#[test]
fn two_families_under_one_prefix_need_one_named() {
    let c = MhaConfig::new(8, 2);
    let (t5, diffusers) = (random_weights(&c, 1), random_weights(&c, 2));
    let mut tensors = layer_tensors("t5", "attn.", &c, &t5);
    tensors.extend(layer_tensors("diffusers", "attn.", &c, &diffusers));
    let bytes = safetensors_bytes(&tensors);
    let err = LayerFile::open(&bytes, "attn.", None)
        .unwrap_err()
        .to_string();
    for part in [
        "`attn.`",
        "diffusers (`attn.to_q.weight`)",
        "t5 (`attn.q.weight`)",
    ] {
        assert!(err.contains(part), "`{err}` should mention {part}");
    }
    for (names, w) in [(Names::T5, &t5), (Names::Diffusers, &diffusers)] {
        let file = LayerFile::open(&bytes, "attn.", Some(names)).unwrap();
        assert_eq!(&file.weights(&c).unwrap(), w, "{names}");
    }
    assert_eq!("t5".parse::<Names>(), Ok(Names::T5));
    let err = "torch".parse::<Names>().unwrap_err();
    assert!(err.contains("pytorch, hf, diffusers or t5"), "{err}");

    let wide = MhaConfig::new(8, 2).with_inner_dim(12);
    let bytes = safetensors_bytes(&layer_tensors("t5", "", &wide, &random_weights(&wide, 3)));
    let err = MhaWeights::from_safetensors(&bytes, "", &c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("with_inner_dim(12)"), "{err}");
}

#[test]
fn the_layer_computes_statistics_per_head_and_averaged() {
    use common::weight_stats::{check, check_stats};
    use xattn::{Path, Pool, PoolOp, Stats};
    let Some(engine) = engine() else { return };
    let c = MhaConfig::new(32, 4).with_kv_heads(2);
    let (b, m, n) = (2, 19, 45);
    let w = random_weights(&c, 1801);
    let layer = MultiHeadAttention::new(engine, c, &w).unwrap();
    let query = random(b * m * c.embed_dim, 1.0, 1811);
    let key = random(b * n * c.kdim, 1.0, 1812);
    let value = random(b * n * c.vdim, 1.0, 1813);
    let pool = Pool {
        max_side: 6,
        op: PoolOp::Mean,
    };
    for path in Path::ALL {
        let attention = Attention::default()
            .with_causal(Alignment::BottomRight)
            .with_path(path)
            .with_stats(Stats::ALL)
            .with_pooled_weights(pool);
        let (_, want_w) = reference_layer(&c, &w, b, (&query, &key, &value), &attention);
        let scale = f64::from(attention.scale_for(c.head_dim()));
        let (_, w_tol) = layer_tolerance(&c, &w, [&query, &key, &value], n, scale);
        let q = upload3(engine, &query, [b, m, c.embed_dim]);
        let k = upload3(engine, &key, [b, n, c.kdim]);
        let v = upload3(engine, &value, [b, n, c.vdim]);
        let opts = MhaOptions::default().with_attention(attention);
        let got = layer.forward(&q, &k, &v, &opts).unwrap();
        let host = xattn::HostOutput {
            o: Vec::new(),
            lse: Vec::new(),
            weights: None,
            stats: got.stats.to_host().unwrap(),
        };
        let what = format!("layer {}", path.name());
        let s = c.attn_shape(b, m, n);
        check_stats(&what, &s, &host, &want_w, pool, w_tol);
        // Averaged over heads: the mean of the per-head values, to f32 rounding.
        let h = c.num_heads;
        let mean = got.mean_stats.to_host().unwrap();
        for ((name, per_head), (_, mean)) in host.stats.named().into_iter().zip(mean.named()) {
            let (per_head, mean) = (per_head.unwrap(), mean.unwrap());
            let inner = per_head.len() / (b * h);
            let want: Vec<f64> = (0..b * inner)
                .map(|e| {
                    let (bb, x) = (e / inner, e % inner);
                    (0..h)
                        .map(|hh| f64::from(per_head[(bb * h + hh) * inner + x]))
                        .sum::<f64>()
                        / h as f64
                })
                .collect();
            let eps = f64::from(f32::EPSILON);
            check(&format!("{what} mean {name}"), mean, &want, |_, x| {
                2.0 * h as f64 * eps * x.abs()
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors under the prefix that the layer does not read (no GPU).

/// Tensors beside a layer: `(name after the prefix, shape)`.
type Extras = Vec<(&'static str, Vec<usize>)>;

/// A layer of family `names` under `prefix` with `extra` tensors beside it (`(name after the
/// prefix, shape)`), all seeded random: the file's bytes and the layer's weights.
fn layer_with_extras(
    names: &str,
    prefix: &str,
    c: &MhaConfig,
    extra: &[(&str, Vec<usize>)],
    seed: u64,
) -> (Vec<u8>, MhaWeights) {
    let w = random_weights(c, seed);
    let mut tensors = layer_tensors(names, prefix, c, &w);
    for (i, (name, shape)) in extra.iter().enumerate() {
        let values = random(shape.iter().product(), 1.0, seed + 100 + i as u64);
        tensors.push((format!("{prefix}{name}"), shape.clone(), values));
    }
    (safetensors_bytes(&tensors), w)
}

/// Each kind of tensor a model keeps beside the projections, which changes what it computes
/// (PyTorch's add_bias_kv, diffusers' qk_norm and cross_attention_norm, T5's relative position
/// bias, LoRA, a name nobody knows), makes the file refused, naming every such tensor and what
/// it is, where before it was dropped without a word.
#[test]
fn tensors_the_layer_does_not_read_are_refused_by_name() {
    let e8 = MhaConfig::new(8, 2);
    let t5 = "encoder.block.0.layer.0.SelfAttention.";
    let attn2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.";
    let cases: [(&str, &str, MhaConfig, Extras, &[&str]); 7] = [
        (
            "pytorch",
            "",
            e8,
            vec![("bias_k", vec![1, 1, 8]), ("bias_v", vec![1, 1, 8])],
            &[
                "bias_k, bias_v: nn.MultiheadAttention(add_bias_kv=True)'s learned key and value",
                "xattn does not implement add_bias_kv",
                "--ignore-tensors bias_k,bias_v",
            ],
        ),
        (
            "diffusers",
            attn2,
            e8.with_kdim(6).with_vdim(6),
            vec![("norm_q.weight", vec![4]), ("norm_k.weight", vec![4])],
            &[
                "norm_k.weight, norm_q.weight: diffusers qk_norm (RMSNorm/LayerNorm over each \
                 head's query and key)",
                attn2,
            ],
        ),
        (
            "diffusers",
            attn2,
            e8.with_kdim(6).with_vdim(6),
            vec![("norm_cross.weight", vec![6]), ("norm_cross.bias", vec![6])],
            &["norm_cross.bias, norm_cross.weight: diffusers cross_attention_norm (LayerNorm"],
        ),
        (
            "t5",
            t5,
            e8.with_inner_dim(12),
            vec![("relative_attention_bias.weight", vec![32, 2])],
            &[
                "relative_attention_bias.weight: T5's relative position bias (pass it as --bias, \
                 computed by the model",
                "the t5 layer under prefix `encoder.block.0.layer.0.SelfAttention.`",
            ],
        ),
        (
            "hf",
            "model.decoder.layers.0.encoder_attn.",
            e8,
            vec![("rope.freqs", vec![4])],
            &["rope.freqs: not part of a hf layer as xattn knows it"],
        ),
        (
            "diffusers",
            "",
            e8,
            vec![
                ("to_q.lora_A.weight", vec![2, 8]),
                ("to_q.lora_B.weight", vec![8, 2]),
            ],
            &["to_q.lora_A.weight, to_q.lora_B.weight: LoRA adapter weights"],
        ),
        (
            "pytorch",
            "attn.",
            e8,
            vec![
                ("bias_k", vec![1, 1, 8]),
                ("bias_v", vec![1, 1, 8]),
                ("extra_scale", vec![1]),
            ],
            &[
                "does not read 3 of the tensors there",
                "bias_k, bias_v: nn.MultiheadAttention",
                "extra_scale: not part of a pytorch layer",
                "--ignore-tensors bias_k,bias_v,extra_scale",
            ],
        ),
    ];
    for (i, (names, prefix, c, extra, parts)) in cases.into_iter().enumerate() {
        let (bytes, _) = layer_with_extras(names, prefix, &c, &extra, 400 + 10 * i as u64);
        let what = format!("{names} under {prefix:?} with {extra:?}");
        let err = match MhaWeights::from_safetensors(&bytes, prefix, &c) {
            Ok(_) => panic!("{what}: loaded, the extra tensors dropped without a word"),
            Err(e) => e,
        };
        assert!(matches!(err, xattn::Error::Weights(_)), "{what}: {err:?}");
        let err = err.to_string();
        for part in parts {
            assert!(
                err.contains(part),
                "{what}: `{err}` should mention `{part}`"
            );
        }
        for (name, _) in &extra {
            assert!(err.contains(name), "{what}: `{err}` should name {name}");
        }
        eprintln!("{what}: {err}");
    }
}

/// Named to `LayerFile::ignore` (after the prefix or in full), the unread tensors no longer
/// stop the layer: it reads exactly the projections written, and lists what it set aside.
/// A name the file lacks, or a tensor the layer reads, cannot be ignored.
#[test]
fn unread_tensors_named_to_ignore_load_without_them() {
    let c = MhaConfig::new(8, 2);
    let prefix = "encoder_attn.";
    let extra = [
        ("bias_k", vec![1, 1, 8]),
        ("bias_v", vec![1, 1, 8]),
        ("mystery", vec![3]),
    ];
    let (bytes, w) = layer_with_extras("pytorch", prefix, &c, &extra, 470);
    let mut file = LayerFile::open(&bytes, prefix, None).unwrap();
    let unread: Vec<(&str, bool)> = file
        .unread()
        .iter()
        .map(|u| (u.name.as_str(), u.what.is_some()))
        .collect();
    assert_eq!(
        unread,
        [("bias_k", true), ("bias_v", true), ("mystery", false)]
    );
    // Ignoring only some: the rest still refuse, named.
    file.ignore(&["bias_k", "encoder_attn.bias_v"]).unwrap();
    let err = file.weights(&c).unwrap_err().to_string();
    assert!(err.contains("mystery") && !err.contains("bias_k"), "{err}");
    for (bad, why) in [
        (
            "nope",
            "the file holds no tensor `nope` nor `encoder_attn.nope`",
        ),
        (
            "in_proj_weight",
            "the layer reads `encoder_attn.in_proj_weight`",
        ),
    ] {
        let err = file.ignore(&["mystery", bad]).unwrap_err().to_string();
        assert!(err.contains(why), "{bad}: `{err}` should say {why}");
        assert!(
            err.contains("`mystery`"),
            "{bad}: `{err}` lists what is unread"
        );
    }
    // A failed call ignored nothing; a name already ignored may be named again.
    assert_eq!(file.unread().len(), 1);
    file.ignore(&["mystery", "bias_k"]).unwrap();
    assert!(file.unread().is_empty());
    let ignored: Vec<&str> = file.ignored().iter().map(|u| u.name.as_str()).collect();
    assert_eq!(ignored, ["bias_k", "bias_v", "mystery"]);
    assert_eq!(file.weights(&c).unwrap(), w);
}

/// What counts as the layer's: every tensor under its prefix, except those of layers deeper
/// under it and the projections of another family there (the caller named which to read).
/// Siblings whose names merely begin alike (`layer.1.` vs `layer.10.`) are not under the
/// prefix; a module deeper that is not a whole layer is the layer's, and refused.
#[test]
fn tensors_of_other_layers_are_not_the_layers() {
    let e8 = MhaConfig::new(8, 2);
    let t5 = e8.with_inner_dim(12);
    let p1 = "decoder.block.0.layer.1.EncDecAttention.";
    let mut tensors = layer_tensors("t5", p1, &t5, &random_weights(&t5, 480));
    tensors.extend(layer_tensors(
        "t5",
        "decoder.block.0.layer.10.EncDecAttention.",
        &t5,
        &random_weights(&t5, 481),
    ));
    tensors.push((
        "decoder.block.0.layer.1.layer_norm.weight".into(),
        vec![8],
        random(8, 1.0, 482),
    ));
    // A layer with a whole layer deeper under its prefix.
    tensors.extend(layer_tensors("hf", "attn.", &e8, &random_weights(&e8, 483)));
    tensors.extend(layer_tensors(
        "diffusers",
        "attn.inner.",
        &e8,
        &random_weights(&e8, 484),
    ));
    let bytes = safetensors_bytes(&tensors);
    for (prefix, c) in [(p1, t5), ("attn.", e8), ("attn.inner.", e8)] {
        let file = LayerFile::open(&bytes, prefix, None).unwrap();
        assert_eq!(file.unread(), [], "{prefix}");
        file.weights(&c).unwrap_or_else(|e| panic!("{prefix}: {e}"));
    }
    // Half a layer deeper is no layer: its tensors are the outer layer's, unread.
    tensors.push((
        "attn.half.to_q.weight".into(),
        vec![8, 8],
        random(64, 1.0, 485),
    ));
    let bytes = safetensors_bytes(&tensors);
    let err = MhaWeights::from_safetensors(&bytes, "attn.", &e8)
        .unwrap_err()
        .to_string();
    assert!(err.contains("half.to_q.weight"), "{err}");
    assert!(!err.contains("inner."), "{err}");
}
