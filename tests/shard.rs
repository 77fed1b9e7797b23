//! Attention sharded over several devices of one process (xattn::shard): every masking case,
//! uneven and empty shards, GQA, f16, the three schedules (merge on one device, LV ring, K/V
//! ring) and a Vulkan + GL pair, against the f64 reference and the single-device call; the
//! byte counters against the byte models; typed errors for bad input.

mod common;

use std::sync::OnceLock;

use common::layer::{layer_tolerance, random_weights, reference_layer};
use common::*;
use rand::{Rng, SeedableRng};
use xattn::cpu::budget::grad_budget;
use xattn::cpu::reference;
use xattn::mask::Block;
use xattn::mha::MhaWeights;
use xattn::shard::{
    backward_bytes, lv_bytes, ring_bytes, star_bytes, RowBytes, ShardedAttention, ShardedGrads,
    ShardedLayer, ShardedOutput, Split,
};
use xattn::{
    Alignment, Attention, AttnShape, Context, DType, Engine, Error, MhaConfig, MhaOptions,
    MultiHeadAttention, NeedWeights, Path,
};

/// Four engines, each on its own device opened on the test adapter (engine 0 is the tests'
/// shared one).
fn engines() -> Option<&'static [Engine]> {
    let first = engine()?;
    static MORE: OnceLock<Vec<Engine>> = OnceLock::new();
    Some(MORE.get_or_init(|| {
        let mut all = vec![first.clone()];
        for _ in 0..3 {
            let ctx = Context::new().expect("the test adapter opens more than one device");
            all.push(Engine::new(&ctx));
        }
        all
    }))
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Star,
    Lv,
    Ring,
}

fn amax(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |a, &y| a.max(f64::from(y.abs())))
}

fn max_finite(x: &[f64]) -> f64 {
    x.iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |a, &y| a.max(y.abs()))
}

/// Seeded cuts of `n` keys into `r` shards; with `empty`, one shard (not the last) holds none.
fn uneven(n: usize, r: usize, empty: bool, seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut inner: Vec<usize> = (1..r).map(|_| rng.random_range(0..=n)).collect();
    if empty && r > 2 {
        inner[1] = inner[0];
    } else if empty {
        inner[0] = 0;
    }
    inner.sort();
    let mut cuts = vec![0];
    cuts.extend(inner);
    cuts.push(n);
    cuts
}

/// Runs `mode` over `engines` and checks the result against `want` (the reference) and
/// `single` (the one-device call), and its byte counters against the model.
#[allow(clippy::too_many_arguments)]
fn check_sharded(
    what: &str,
    engines: &[&Engine],
    split: Split,
    mode: Mode,
    dtype: DType,
    s: &AttnShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    opts: &Attention,
    out: usize,
    (want, single): (&reference::Reference, Option<&xattn::HostOutput>),
    budget: &Budget,
) -> ShardedOutput {
    let sharded = ShardedAttention::new(engines, split)
        .unwrap()
        .with_dtype(dtype);
    let kv = sharded
        .upload_kv(k, v, s)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = match mode {
        Mode::Star => sharded.attention_kv(q, &kv, s, opts, out),
        Mode::Lv => sharded.lv_ring(q, &kv, s, opts, out),
        Mode::Ring => sharded.kv_ring(q, &kv, s, opts, out),
    }
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let r = engines.len();
    let max_lse = max_finite(&want.lse);
    let (mo, ml) = merge_bound(r, max_lse, amax(v));
    let tol_o = budget.o + mo;
    let tol_lse = budget.lse * (1.0 + max_lse) + ml;
    assert_close(&format!("{what} O"), &got.o, &want.o, tol_o);
    assert_close(&format!("{what} LSE"), &got.lse, &want.lse, tol_lse);
    if let Some(single) = single {
        // Both within their bounds of the reference, so within the sum of each other.
        let o64: Vec<f64> = single.o.iter().map(|&x| f64::from(x)).collect();
        let l64: Vec<f64> = single.lse.iter().map(|&x| f64::from(x)).collect();
        assert_close(
            &format!("{what} O vs one device"),
            &got.o,
            &o64,
            tol_o + budget.o,
        );
        assert_close(
            &format!("{what} LSE vs one device"),
            &got.lse,
            &l64,
            tol_lse + budget.lse * (1.0 + max_lse),
        );
    }
    // Counted = modelled.
    let bytes = RowBytes::of(s, dtype);
    let cuts = kv.cuts();
    let keys: Vec<usize> = cuts.windows(2).map(|w| w[1] - w[0]).collect();
    let rows: Vec<usize> = (0..r).map(|p| (p + 1) * s.m / r - p * s.m / r).collect();
    let model = match mode {
        Mode::Star => star_bytes(bytes, s.m, &keys, out),
        Mode::Lv => lv_bytes(bytes, &rows, out),
        Mode::Ring => ring_bytes(bytes, &rows, &keys, out),
    };
    for (p, (t, m)) in got.traffic.iter().zip(&model).enumerate() {
        assert_eq!(
            (t.sent, t.received),
            (m.sent, m.received),
            "{what}: device {p} bytes sent/received, counted vs model"
        );
    }
    got
}

#[test]
fn every_masking_case_sharded_matches_the_reference_and_one_device() {
    let Some(all) = engines() else { return };
    let modes = [Mode::Star, Mode::Lv, Mode::Ring];
    for (i, (name, s, opts)) in mask_cases().into_iter().enumerate() {
        let r = 2 + i % 3;
        let mode = modes[(i / 3 + i) % 3];
        let engines: Vec<&Engine> = all[..r].iter().collect();
        let (q, k, v) = qkv(&s, 1.0, 2300 + i as u64);
        let scale = opts.scale_for(s.d_k);
        let m = opts.masking();
        let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), m);
        let budget = budget_masked(&s, scale, (&q, &k, &v), m);
        let (_, single) = run_poisoned(&all[0], &s, (&q, &k, &v), &opts).unwrap();
        // Even shards for the first of each three cases, then seeded uneven ones, with an
        // empty shard every other time.
        let split = if i % 3 == 0 {
            Split::Even
        } else {
            Split::At(uneven(s.n, r, i % 2 == 0, 77 + i as u64))
        };
        let what = format!("{name} {s} R={r} {mode:?} {split:?}");
        check_sharded(
            &what,
            &engines,
            split,
            mode,
            DType::F32,
            &s,
            (&q, &k, &v),
            &opts,
            i % r,
            (&want, Some(&single)),
            &budget,
        );
    }
}

#[test]
fn shifted_diagonals_on_every_path() {
    // The block's diagonal shift on the three-pass, fused and split-K paths: causal and window
    // masks of both alignments with lengths, shards cut off every tile boundary, one empty.
    let Some(all) = engines() else { return };
    let engines: Vec<&Engine> = all[..3].iter().collect();
    let s = shape(2, 37, 150, 4, 2, 16);
    let (q, k, v) = qkv(&s, 1.0, 4100);
    let cases = [
        Attention::default().with_causal(Alignment::TopLeft),
        Attention::default()
            .with_causal(Alignment::BottomRight)
            .with_kv_lens(vec![150, 71])
            .with_q_lens(vec![37, 20]),
        Attention::default()
            .with_window(Alignment::TopLeft, 9, 4)
            .with_q_lens(vec![30, 37]),
        Attention::default()
            .with_window(Alignment::BottomRight, 20, 3)
            .with_kv_lens(vec![90, 149]),
    ];
    for (c, opts) in cases.into_iter().enumerate() {
        let scale = opts.scale_for(s.d_k);
        let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), opts.masking());
        let budget = budget_masked(&s, scale, (&q, &k, &v), opts.masking());
        for (pi, path) in Path::ALL.into_iter().enumerate() {
            let opts = opts.clone().with_path(path);
            let mode = [Mode::Star, Mode::Lv, Mode::Ring][(c + pi) % 3];
            check_sharded(
                &format!("case {c} {} {mode:?}", path.name()),
                &engines,
                Split::At(vec![0, 61, 61, 150]),
                mode,
                DType::F32,
                &s,
                (&q, &k, &v),
                &opts,
                1,
                (&want, None),
                &budget,
            );
        }
    }
}

#[test]
fn a_block_alone_matches_the_reference_of_its_part() {
    // One block (rows 10..30 of 40, keys 50..90 of 120) computed alone equals the whole call's
    // reference on those rows, over those keys (the reference reads the block too).
    let Some(engine) = engine() else { return };
    let whole = shape(1, 40, 120, 2, 1, 8);
    let s = AttnShape {
        m: 20,
        n: 40,
        ..whole
    };
    let (q, k, v) = qkv(&s, 1.0, 4200);
    let block = Block {
        row_offset: 10,
        rows_total: 40,
        key_offset: 50,
        keys_total: 120,
    };
    for opts in [
        Attention::default().with_causal(Alignment::TopLeft),
        Attention::default()
            .with_causal(Alignment::BottomRight)
            .with_kv_lens(vec![75]),
        Attention::default().with_key_segment(40, 60, 2.0),
    ] {
        let opts = opts.with_block(block);
        let scale = opts.scale_for(s.d_k);
        let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), opts.masking());
        let budget = budget_masked(&s, scale, (&q, &k, &v), opts.masking());
        for path in Path::ALL {
            let (_, got) = run_poisoned(engine, &s, (&q, &k, &v), &opts.clone().with_path(path))
                .unwrap_or_else(|e| panic!("{opts:?}: {e}"));
            let what = format!("{} {:?}", path.name(), opts.masking().window);
            assert_close(&format!("{what} O"), &got.o, &want.o, budget.o);
            let tol = budget.lse * (1.0 + max_finite(&want.lse));
            assert_close(&format!("{what} LSE"), &got.lse, &want.lse, tol);
        }
    }
}

#[test]
fn half_inputs_sharded() {
    let Some(all) = engines() else { return };
    let engines: Vec<&Engine> = all[..2].iter().collect();
    let s = shape(1, 33, 140, 4, 2, 24);
    let (q, k, v) = qkv(&s, 1.0, 4300);
    let opts = Attention::default()
        .with_causal(Alignment::BottomRight)
        .with_bias([1, 1, 1, 140], random(140, 1.0, 4301));
    for (dtype, mode) in [(DType::F16, Mode::Lv), (DType::Bf16, Mode::Star)] {
        // The reference reads the inputs as stored.
        let round = |x: &[f32]| x.iter().map(|&y| dtype.round(y)).collect::<Vec<f32>>();
        let (qr, kr, vr) = (round(&q), round(&k), round(&v));
        let scale = opts.scale_for(s.d_k);
        let want = reference::attention_masked(&s, &qr, &kr, &vr, f64::from(scale), opts.masking());
        let budget = budget_masked(&s, scale, (&qr, &kr, &vr), opts.masking());
        check_sharded(
            &format!("{dtype} {mode:?}"),
            &engines,
            Split::At(vec![0, 90, 140]),
            mode,
            dtype,
            &s,
            (&q, &k, &v),
            &opts,
            0,
            (&want, None),
            &budget,
        );
    }
}

#[test]
fn host_slices_and_resident_shards_agree_and_count_their_loads() {
    let Some(all) = engines() else { return };
    let engines: Vec<&Engine> = all[..4].iter().collect();
    let s = shape(2, 5, 333, 4, 4, 32);
    let (q, k, v) = qkv(&s, 1.0, 4400);
    let opts = Attention::default().with_kv_lens(vec![333, 100]);
    let sharded = ShardedAttention::new(&engines, Split::Even).unwrap();
    let a = sharded.attention(&q, &k, &v, &s, &opts, 3).unwrap();
    let kv = sharded.upload_kv(&k, &v, &s).unwrap();
    let b = sharded.attention_kv(&q, &kv, &s, &opts, 3).unwrap();
    assert_eq!(a.o, b.o);
    assert_eq!(a.lse, b.lse);
    // Host slices load K and V each call; resident shards load Q only.
    let kv_bytes = (s.batch * s.n * s.kv_heads * (s.d_k + s.d_v) * 4) as u64;
    let q_bytes = (s.batch * s.m * s.q_heads * s.d_k * 4) as u64;
    let loaded = |o: &ShardedOutput| o.traffic.iter().map(|t| t.loaded).sum::<u64>();
    assert_eq!(loaded(&a), kv_bytes + 4 * q_bytes);
    assert_eq!(loaded(&b), 4 * q_bytes);
}

#[test]
fn vulkan_and_gl_mixed() {
    let Some(vk) = engine() else { return };
    let gl = xattn::gpu::context::adapters()
        .into_iter()
        .find(|a| a.get_info().backend == wgpu::Backend::Gl);
    let Some(gl) = gl else {
        eprintln!("\n*** SKIPPING the Vulkan + GL case: no GL adapter ***\n");
        return;
    };
    if vk.context().info.backend == wgpu::Backend::Gl {
        eprintln!("\n*** SKIPPING the Vulkan + GL case: the test device is GL already ***\n");
        return;
    }
    let gl = Engine::new(&Context::from_adapter(&gl).expect("the GL adapter opens"));
    eprintln!(
        "mixed: {} + {}",
        vk.context().describe(),
        gl.context().describe()
    );
    let s = shape(1, 9, 100, 2, 1, 16);
    let (q, k, v) = qkv(&s, 1.0, 4500);
    let opts = Attention::default()
        .with_causal(Alignment::BottomRight)
        .with_key_segment(30, 70, 1.5);
    let scale = opts.scale_for(s.d_k);
    let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), opts.masking());
    let budget = budget_masked(&s, scale, (&q, &k, &v), opts.masking());
    for (mode, out) in [(Mode::Star, 1), (Mode::Lv, 0)] {
        check_sharded(
            &format!("Vulkan + GL {mode:?}"),
            &[vk, &gl],
            Split::At(vec![0, 45, 100]),
            mode,
            DType::F32,
            &s,
            (&q, &k, &v),
            &opts,
            out,
            (&want, None),
            &budget,
        );
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let Some(all) = engines() else { return };
    let two: Vec<&Engine> = all[..2].iter().collect();
    let s = shape(1, 4, 50, 2, 2, 8);
    let (q, k, v) = qkv(&s, 1.0, 4600);
    let opts = Attention::default();
    assert!(matches!(
        ShardedAttention::new(&[], Split::Even),
        Err(Error::Argument(_))
    ));
    for cuts in [
        vec![0, 20],
        vec![0, 20, 49],
        vec![1, 20, 50],
        vec![0, 30, 20, 50],
    ] {
        let sh = ShardedAttention::new(&two, Split::At(cuts.clone())).unwrap();
        let got = sh.attention(&q, &k, &v, &s, &opts, 0);
        assert!(
            matches!(got, Err(Error::Argument(_))),
            "cuts {cuts:?}: {got:?}"
        );
    }
    let sh = ShardedAttention::new(&two, Split::Even).unwrap();
    assert!(matches!(
        sh.attention(&q[1..], &k, &v, &s, &opts, 0),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        sh.attention(&q, &k, &v[1..], &s, &opts, 0),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        sh.attention(&q, &k, &v, &s, &opts, 2),
        Err(Error::Argument(_))
    ));
    assert!(matches!(
        sh.attention(&q, &k, &v, &s, &opts.clone().with_weights(), 0),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        sh.attention(&q, &k, &v, &s, &opts.clone().with_dropout(0.1, 1, 0), 0),
        Err(Error::Unsupported(_))
    ));
    // A mask over other than the whole N keys, and K/V resident for another shape.
    let bad_mask = opts.clone().with_mask([1, 1, 1, 25], vec![true; 25]);
    assert!(matches!(
        sh.attention(&q, &k, &v, &s, &bad_mask, 0),
        Err(Error::Shape(_))
    ));
    let kv = sh.upload_kv(&k, &v, &s).unwrap();
    let other = AttnShape { m: 3, n: 49, ..s };
    assert!(matches!(
        sh.lv_ring(&q[..3 * 16], &kv, &other, &opts, 0),
        Err(Error::Shape(_))
    ));
    // A block beyond its whole sequences.
    let block = Block {
        row_offset: 0,
        rows_total: 4,
        key_offset: 10,
        keys_total: 55,
    };
    let got = run_poisoned(&all[0], &s, (&q, &k, &v), &opts.clone().with_block(block));
    assert!(matches!(got, Err(Error::Shape(_))), "{got:?}");
}

/// `x` rounded to `dtype` and back, as the devices store it.
fn stored(x: &[f32], dtype: DType) -> Vec<f32> {
    let to = |x: f32| match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::Bf16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    };
    x.iter().map(|&x| to(x)).collect()
}

#[test]
fn the_sharded_layer_matches_the_reference_and_one_device() {
    let Some(all) = engines() else { return };
    let o = MhaOptions::default;
    let causal = Attention::default().with_causal(Alignment::BottomRight);
    let kpm = |b: usize, n: usize| (0..b * n).map(|j| j % n >= n - 3 - j / n).collect();
    #[rustfmt::skip]
    let cases = [
        ("plain", MhaConfig::new(32, 4), (2, 5, 37), o(), 3, true, DType::F32),
        ("GQA 4/2, kdim 10, vdim 7, key padding", MhaConfig::new(16, 4).with_kv_heads(2).with_kdim(10).with_vdim(7), (2, 6, 19), o().with_key_padding_mask(kpm(2, 19)), 4, true, DType::F32),
        ("no bias, MQA, causal", MhaConfig::new(32, 4).with_bias(false).with_kv_heads(1), (1, 9, 14), o().with_attention(causal), 2, false, DType::F32),
        ("f16, GQA 4/2, inner 24 ≠ E 16", MhaConfig::new(16, 4).with_inner_dim(24).with_kv_heads(2), (2, 7, 33), o(), 3, true, DType::F16),
    ];
    for (i, (name, c, (b, m, n), opts, r, uneven_split, dtype)) in cases.into_iter().enumerate() {
        let seed = 4100 + 20 * i as u64;
        let w = random_weights(&c, seed);
        let query = random(b * m * c.embed_dim, 1.0, seed + 10);
        let key = random(b * n * c.kdim, 1.0, seed + 11);
        let value = random(b * n * c.vdim, 1.0, seed + 12);
        let split = if uneven_split {
            Split::At(uneven(n, r, true, seed))
        } else {
            Split::Even
        };
        let engines: Vec<&Engine> = all[..r].iter().collect();
        let layer = ShardedLayer::new(&engines, split.clone(), c, &w, dtype).unwrap();
        let out = i % r;
        let what = format!("{name} R={r} {split:?} {dtype} out={out}");
        let got = layer
            .forward(&query, &key, &value, (b, m, n), &opts, out)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        // The reference reads what the devices store.
        let round = |x: &Option<Vec<f32>>| x.as_ref().map(|x| stored(x, dtype));
        let ws = MhaWeights {
            q: stored(&w.q, dtype),
            k: stored(&w.k, dtype),
            v: stored(&w.v, dtype),
            o: stored(&w.o, dtype),
            q_bias: round(&w.q_bias),
            k_bias: round(&w.k_bias),
            v_bias: round(&w.v_bias),
            o_bias: round(&w.o_bias),
        };
        let [qs, ks, vs] = [&query, &key, &value].map(|x| stored(x, dtype));
        let attention = opts.attention_for(b, n).unwrap().into_owned();
        let (want, _) = reference_layer(&c, &ws, b, (&qs, &ks, &vs), &attention);
        let scale = f64::from(attention.scale_for(c.head_dim()));
        let (tol, _) = layer_tolerance(&c, &ws, [&qs, &ks, &vs], n, scale);
        // The merge's bound on the heads, carried through W^O.
        let v_heads = reference::linear(&vs, &ws.v, ws.v_bias.as_deref(), c.vdim);
        let amax_v = v_heads.iter().fold(0.0f64, |a, &y| a.max(y.abs()));
        let lse: Vec<f64> = got.lse.iter().map(|&x| f64::from(x)).collect();
        let (mo, _) = merge_bound(r, max_finite(&lse), amax_v);
        let wo_row =
            ws.o.chunks(c.inner_dim)
                .map(|row| row.iter().map(|&x| f64::from(x.abs())).sum::<f64>())
                .fold(0.0f64, f64::max);
        let tol = tol + mo * wo_row;
        assert_eq!(got.o.len(), b * m * c.embed_dim, "{what}: output length");
        assert_close(&format!("{what} out"), &got.o, &want, tol);
        if dtype == DType::F32 {
            let single = MultiHeadAttention::new(&all[0], c, &w).unwrap();
            let up = |x: &[f32], d: usize, rows: usize| all[0].upload(x, &[b, rows, d]).unwrap();
            let one = single
                .forward(
                    &up(&query, c.embed_dim, m),
                    &up(&key, c.kdim, n),
                    &up(&value, c.vdim, n),
                    &opts,
                )
                .unwrap();
            let one: Vec<f64> = one
                .out
                .to_host()
                .unwrap()
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            assert_close(
                &format!("{what} out vs one device"),
                &got.o,
                &one,
                2.0 * tol,
            );
        }
        // The source projected once serves a second query.
        let kv = layer.project_source(&key, &value, (b, n)).unwrap();
        let again = layer.forward_kv(&query, &kv, m, &opts, out).unwrap();
        assert_eq!(again.o, got.o, "{what}: forward_kv on a projected source");
        // Only the projected Q and the partials move, as the merge-on-one-device model says.
        let keys: Vec<usize> = kv.cuts().windows(2).map(|w| w[1] - w[0]).collect();
        let bytes = RowBytes::of(&c.attn_shape(b, m, n), DType::F32);
        let model = star_bytes(bytes, m, &keys, out);
        for (p, (t, want)) in got.traffic.iter().zip(&model).enumerate() {
            assert_eq!(
                (t.sent, t.received),
                (want.sent, want.received),
                "{what}: device {p} bytes sent/received, counted vs model"
            );
        }
    }
}

#[test]
fn the_sharded_layer_refuses_weights_and_bad_shapes() {
    let Some(all) = engines() else { return };
    let c = MhaConfig::new(16, 2);
    let engines: Vec<&Engine> = all[..2].iter().collect();
    let layer =
        ShardedLayer::new(&engines, Split::Even, c, &random_weights(&c, 5), DType::F32).unwrap();
    let (q, k) = (random(3 * 16, 1.0, 6), random(8 * 16, 1.0, 7));
    let weights = MhaOptions::default().with_need_weights(NeedWeights::Averaged);
    let err = layer
        .forward(&q, &k, &k, (1, 3, 8), &weights, 0)
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    let err = layer
        .forward(&q[1..], &k, &k, (1, 3, 8), &MhaOptions::default(), 0)
        .unwrap_err();
    assert!(matches!(err, Error::Length { .. }), "{err}");
    let err = layer
        .forward(&q, &k[1..], &k, (1, 3, 8), &MhaOptions::default(), 0)
        .unwrap_err();
    assert!(matches!(err, Error::Length { .. }), "{err}");
    let err = layer
        .forward(&q, &k, &k, (1, 3, 8), &MhaOptions::default(), 2)
        .unwrap_err();
    assert!(matches!(err, Error::Argument(_)), "{err}");
}

/// The sharded backward of `(q, k, v, d_o)` (inputs as stored in `dtype`) fed the one-device
/// forward's O and LSE, against the f64 reference backward and the one-device backward; its
/// byte counters against [`backward_bytes`].
fn check_sharded_backward(
    what: &str,
    engines: &[&Engine],
    split: Split,
    dtype: DType,
    s: &AttnShape,
    (q, k, v, d_o): (&[f32], &[f32], &[f32], &[f32]),
    opts: &Attention,
) {
    let (fwd, single) = engines[0]
        .attention_backward_host((q, s.q_dims()), (k, s.k_dims()), (v, s.v_dims()), d_o, opts)
        .unwrap_or_else(|e| panic!("{what} one device: {e}"));
    let sharded = ShardedAttention::new(engines, split)
        .unwrap()
        .with_dtype(dtype);
    let kv = sharded.upload_kv(k, v, s).unwrap();
    let got = sharded
        .backward_kv(q, &kv, (&fwd.o, &fwd.lse), d_o, s, opts)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let scale = opts.scale_for(s.d_k);
    let want = reference::attention_backward(s, (q, k, v), d_o, f64::from(scale), opts.masking());
    let b = grad_budget(s, scale, (q, k, v, d_o), opts.masking());
    // The f32 sum of R partial dQs: (R − 1)·ε·Σ_s|dQ_s|, Σ_s|dQ_s| ≤ 2·d_v·max|dO|·max|V|·
    // |scale|·slope·max|K| (the segments' largest factor scales the logits).
    let slope = opts
        .masking()
        .segments
        .iter()
        .fold(1.0f64, |a, g| a.max(f64::from(g.factor.abs())));
    let sum_bound = (engines.len() - 1) as f64
        * f64::from(f32::EPSILON)
        * 2.0
        * s.d_v as f64
        * amax(d_o)
        * amax(v)
        * f64::from(scale.abs())
        * slope
        * amax(k);
    let (dk, dv) = got.gathered_kv();
    for (name, got, want, one, tol) in [
        ("dQ", &got.dq, &want.dq, &single.dq, b.dq + sum_bound),
        ("dK", &dk, &want.dk, &single.dk, b.dk),
        ("dV", &dv, &want.dv, &single.dv, b.dv),
    ] {
        assert_close(&format!("{what} {name}"), got, want, tol);
        // Both within their budgets of the reference, so within the sum of each other.
        let one: Vec<f64> = one.iter().map(|&x| f64::from(x)).collect();
        assert_close(
            &format!("{what} {name} vs one device"),
            got,
            &one,
            2.0 * tol,
        );
    }
    let keys: Vec<usize> = got.cuts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(
        got.traffic,
        backward_bytes(s, dtype, &keys),
        "{what}: bytes"
    );
}

#[test]
fn gradients_sharded_match_the_reference_and_one_device() {
    let Some(all) = engines() else { return };
    for (i, (name, s, opts)) in mask_cases().into_iter().enumerate() {
        let r = 2 + i % 3;
        let engines: Vec<&Engine> = all[..r].iter().collect();
        let (q, k, v) = qkv(&s, 1.0, 5100 + i as u64);
        let d_o = random(s.o_dims().iter().product(), 1.0, 5200 + i as u64);
        // Even shards for the first of each three cases, then seeded uneven ones, with an
        // empty shard every other time.
        let split = if i % 3 == 0 {
            Split::Even
        } else {
            Split::At(uneven(s.n, r, i % 2 == 0, 177 + i as u64))
        };
        let what = format!("{name} {s} R={r} {split:?}");
        check_sharded_backward(
            &what,
            &engines,
            split,
            DType::F32,
            &s,
            (&q, &k, &v, &d_o),
            &opts,
        );
    }
}

#[test]
fn gradients_sharded_with_half_inputs_gqa_and_global_diagonals() {
    let Some(all) = engines() else { return };
    let s = shape(2, 37, 150, 4, 2, 16);
    let opts = Attention::default()
        .with_causal(Alignment::BottomRight)
        .with_kv_lens(vec![150, 71])
        .with_bias([1, 1, 1, 150], random(150, 1.0, 5301));
    for (c, dtype) in [DType::F32, DType::F16, DType::Bf16]
        .into_iter()
        .enumerate()
    {
        // The reference reads the inputs as stored.
        let round = |x: Vec<f32>| x.iter().map(|&y| dtype.round(y)).collect::<Vec<f32>>();
        let (q, k, v) = qkv(&s, 1.0, 5300 + c as u64);
        let (q, k, v) = (round(q), round(k), round(v));
        let d_o = random(s.o_dims().iter().product(), 1.0, 5310 + c as u64);
        let r = 2 + c;
        let engines: Vec<&Engine> = all[..r].iter().collect();
        let split = Split::At(uneven(s.n, r, c > 0, 5320 + c as u64));
        check_sharded_backward(
            &format!("{dtype} R={r} {split:?}"),
            &engines,
            split,
            dtype,
            &s,
            (&q, &k, &v, &d_o),
            &opts,
        );
    }
}

#[test]
fn sharded_gradients_from_host_slices_and_their_errors() {
    let Some(all) = engines() else { return };
    let engines: Vec<&Engine> = all[..3].iter().collect();
    let s = shape(2, 9, 70, 4, 2, 8);
    let (q, k, v) = qkv(&s, 1.0, 5400);
    let d_o = random(s.o_dims().iter().product(), 1.0, 5401);
    let opts = Attention::default().with_causal(Alignment::TopLeft);
    let sharded = ShardedAttention::new(&engines, Split::At(vec![0, 30, 30, 70])).unwrap();
    let fwd = sharded.attention(&q, &k, &v, &s, &opts, 1).unwrap();
    let ol = (&fwd.o[..], &fwd.lse[..]);
    let a = sharded.backward(&q, &k, &v, ol, &d_o, &s, &opts).unwrap();
    let kv = sharded.upload_kv(&k, &v, &s).unwrap();
    let b = sharded.backward_kv(&q, &kv, ol, &d_o, &s, &opts).unwrap();
    assert_eq!((&a.dq, &a.dk, &a.dv), (&b.dq, &b.dk, &b.dv));
    // Host slices load K and V each call.
    let kv_bytes = (s.batch * s.n * s.kv_heads * (s.d_k + s.d_v) * 4) as u64;
    let loaded = |g: &ShardedGrads| g.traffic.iter().map(|t| t.loaded).sum::<u64>();
    assert_eq!(loaded(&a), loaded(&b) + kv_bytes);
    assert!(a.dk[1].is_empty() && a.dv[1].is_empty(), "the empty shard");
    let bias = opts.clone().with_bias([1, 1, 1, 70], random(70, 1.0, 5402));
    for (name, got) in [
        (
            "bias gradient",
            sharded.backward_kv(&q, &kv, ol, &d_o, &s, &bias.with_bias_grad()),
        ),
        (
            "short LSE",
            sharded.backward_kv(&q, &kv, (ol.0, &ol.1[1..]), &d_o, &s, &opts),
        ),
        (
            "short dO",
            sharded.backward_kv(&q, &kv, ol, &d_o[1..], &s, &opts),
        ),
        (
            "dropout",
            sharded.backward_kv(&q, &kv, ol, &d_o, &s, &opts.clone().with_dropout(0.1, 1, 0)),
        ),
    ] {
        assert!(got.is_err(), "{name}: {got:?}");
    }
}
