//! `xattn mha` end to end: the binary on the PyTorch fixtures of `tests/fixtures/mha/` (see
//! `tests/fixtures/generate_mha.py`), outputs and attention weights compared with PyTorch's
//! within a derived error bound; on random layers saved under diffusers, T5 and Hugging Face
//! names (biases as models save them, inner width ≠ E), against the f64 layer; and the errors a
//! user gets for a wrong prefix, head count, mismatched inputs or flags (checked on the host
//! before a device is opened, so they need no GPU).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::files::*;
use common::layer::*;
use common::mha_fixture::*;
use common::*;
use xattn::MhaConfig;

fn xattn(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xattn"))
        .args(args)
        .output()
        .expect("start the xattn binary")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> String {
    p.to_str().expect("paths are UTF-8").to_string()
}

/// How `xattn mha` is run on a case.
impl Case {
    /// `query`, `key`, `value` (and `kpm`), writing `out.npy` (and `w.npy`) under `dir`; only
    /// the flags a user needs (no `--no-bias` or `--names`: the loader sees them in the file;
    /// `--scale` for T5).
    fn args(
        &self,
        dir: &TempDir,
        [query, key, value]: [&Path; 3],
        kpm: Option<&Path>,
    ) -> Vec<String> {
        let mut a: Vec<String> = ["mha", "--weights"].map(String::from).to_vec();
        a.push(s(&self.file("weights.safetensors")));
        a.extend(["--heads".into(), self.heads.to_string()]);
        if !self.prefix.is_empty() {
            a.extend(["--prefix".into(), self.prefix.clone()]);
        }
        if let Some(scale) = self.scale {
            a.extend(["--scale".into(), scale.to_string()]);
        }
        for (flag, path) in [("--query", query), ("--key", key), ("--value", value)] {
            a.extend([flag.into(), s(path)]);
        }
        a.extend(["--out".into(), s(&dir.path("out.npy"))]);
        if let Some(kpm) = kpm {
            a.extend(["--key-padding-mask".into(), s(kpm)]);
        }
        if self.need != Need::None {
            a.extend(["--need-weights".into(), s(&dir.path("w.npy"))]);
        }
        if self.need == Need::PerHead {
            a.push("--per-head-weights".into());
        }
        a
    }

    /// The arguments on the fixture's own files (query.npy three times for self-attention).
    fn fixture_args(&self, dir: &TempDir) -> Vec<String> {
        let (q, k, v) = (
            self.file("query.npy"),
            self.file("key.npy"),
            self.file("value.npy"),
        );
        let kv = if self.self_attention {
            [&q, &q, &q]
        } else {
            [&q, &k, &v]
        };
        let kpm = self.file("key_padding_mask.npy");
        self.args(
            dir,
            kv.map(PathBuf::as_path),
            self.key_padding_mask.is_some().then_some(&*kpm),
        )
    }
}

/// Per-element bounds on how far the CLI's outputs may be from PyTorch's files: `out`
/// [B, M, E] and the weights in the case's layout (`Case::weight_dims`; empty without weights).
/// Our f64 forward pass gives the forward-error bound of an f32 implementation (`reference` in
/// `tests/common/mha_fixture.rs`, derived there step by step). PyTorch's f32 result obeys the
/// same bound, so the two may differ by twice it; [`compare`] adds ε·|reference| for the
/// rounding of the stored file.
fn bounds(c: &Case) -> (Vec<f64>, Vec<f64>) {
    let r = reference(c);
    let twice = |tol: &[f64]| tol.iter().map(|t| 2.0 * t).collect();
    (twice(&r.out_tol), twice(&expected_weights(c, &r).1))
}

/// What a run should produce: out.npy and, if asked, w.npy, with their shapes and bounds.
struct Expected<'a> {
    out: (&'a [f32], &'a [usize], &'a [f64]),
    weights: Option<(&'a [f32], &'a [usize], &'a [f64])>,
}

/// Runs `args`, asserts success, and compares out.npy (and w.npy) under `dir` with `want`,
/// shapes included. Returns the largest errors and stderr.
fn run_and_compare(
    name: &str,
    dir: &TempDir,
    args: &[String],
    want: Expected,
) -> (f64, f64, String) {
    let out = xattn(args);
    let err = stderr(&out);
    assert!(out.status.success(), "{name}: xattn failed: {err}");
    let (o, os) = read_npy::<f32>(&dir.path("out.npy"));
    let (want_o, dims, tol) = want.out;
    assert_eq!(os, dims, "{name}: out shape");
    let st = compare(&format!("{name} out"), &o, want_o, tol, dims).unwrap();
    let (out_err, out_tol) = (st.max_err, st.max_tol);
    // A bound near the values themselves could not tell a wrong mask polarity, head split or
    // weight layout from rounding.
    let largest = want_o
        .iter()
        .fold(0.0f64, |a, &x| a.max(f64::from(x.abs())));
    assert!(
        out_tol < 1e-2 * largest,
        "{name}: bound {out_tol:e}, outputs up to {largest}"
    );
    let (mut w_err, mut w_tol) = (0.0, 0.0);
    match want.weights {
        None => assert!(!dir.path("w.npy").exists(), "{name}: no weights asked"),
        Some((want_w, dims, tol)) => {
            let (w, ws) = read_npy::<f32>(&dir.path("w.npy"));
            assert_eq!(ws, dims, "{name}: weights shape");
            let st = compare(&format!("{name} weights"), &w, want_w, tol, dims).unwrap();
            (w_err, w_tol) = (st.max_err, st.max_tol);
        }
    }
    eprintln!(
        "{name:20} out max err {out_err:.2e} (bound ≤ {out_tol:.2e}); weights max err \
         {w_err:.2e} (bound ≤ {w_tol:.2e})"
    );
    (out_err, w_err, err)
}

const CASES: [&str; 17] = [
    "packed_bias",
    "separate_kdim_vdim",
    "no_bias",
    "no_bias_separate",
    "key_padding_mask",
    "weights_averaged",
    "weights_per_head",
    "self_attention",
    "hf_prefix",
    "hf_kdim_vdim",
    "decode_m1",
    "one_head",
    "whisper",
    "bart",
    "t5",
    "unet_attn2",
    "diffusers_inner",
];

/// Every fixture through the binary: packed and separate PyTorch names, prefixes, kdim ≠ vdim,
/// no bias, key padding, averaged and per-head weights, Hugging Face names, M = 1; the layers
/// of Whisper, BART, T5 and diffusers models, with the names and prefixes their state dicts use.
#[test]
fn mha_matches_pytorch_on_every_fixture() {
    let Some(_) = engine() else { return };
    let (mut worst_out, mut worst_w) = (0.0f64, 0.0f64);
    for name in CASES {
        let c = Case::load(name);
        let dir = TempDir::new(name);
        let (out_tol, w_tol) = bounds(&c);
        let wd = c.weight_dims();
        let want = Expected {
            out: (&c.out, &[c.b, c.m, c.e], &out_tol),
            weights: c.weights.as_deref().map(|w| (w, &wd[..], &w_tol[..])),
        };
        let (o, w, err) = run_and_compare(name, &dir, &c.fixture_args(&dir), want);
        assert!(err.contains("xattn: mha B"), "{name}: summary line: {err}");
        if c.key_padding_mask.is_some() {
            assert!(err.contains("key padding"), "{name}: summary: {err}");
        }
        worst_out = worst_out.max(o);
        worst_w = worst_w.max(w);
    }
    eprintln!("largest error vs PyTorch: out {worst_out:.2e}, weights {worst_w:.2e}");
}

/// 2-D inputs [seq, features] are batch 1 and give outputs without the batch axis: batch entry
/// 1 of a padded case with averaged weights (its mask given as [N]), and the single-batch
/// per-head case.
#[test]
fn two_d_inputs_give_two_d_outputs() {
    let Some(_) = engine() else { return };
    for (name, bi) in [("weights_averaged", 1), ("one_head", 0)] {
        let c = Case::load(name);
        let dir = TempDir::new(&format!("2d-{name}"));
        let (out_tol, w_tol) = bounds(&c);
        // Batch entry `bi` of `data` of shape `shape`, and that shape without the batch axis.
        fn entry<T: Copy>(data: &[T], shape: &[usize], bi: usize) -> (Vec<T>, Vec<usize>) {
            let per = data.len() / shape[0];
            (data[bi * per..(bi + 1) * per].to_vec(), shape[1..].to_vec())
        }
        let slice = |file: &str| {
            let (data, shape) = read_npy::<f32>(&c.file(file));
            entry(&data, &shape, bi)
        };
        for f in ["query.npy", "key.npy", "value.npy"] {
            let (data, shape) = slice(f);
            write_npy(&dir.path(f), &data, &shape);
        }
        let kpm = dir.path("kpm.npy");
        if c.key_padding_mask.is_some() {
            let (mask, shape) = read_npy::<bool>(&c.file("key_padding_mask.npy"));
            let (mask, shape) = entry(&mask, &shape, bi);
            write_npy(&kpm, &mask, &shape);
        }
        let files = ["query.npy", "key.npy", "value.npy"].map(|f| dir.path(f));
        let args = c.args(
            &dir,
            [&files[0], &files[1], &files[2]].map(PathBuf::as_path),
            c.key_padding_mask.is_some().then_some(&*kpm),
        );
        let (out, out_dims) = slice("out.npy");
        let (w, w_dims) = slice("weights.npy");
        let (out_tol, _) = entry(&out_tol, &[c.b, c.m, c.e], bi);
        let (w_tol, _) = entry(&w_tol, &c.weight_dims(), bi);
        let want = Expected {
            out: (&out, &out_dims, &out_tol),
            weights: Some((&w, &w_dims, &w_tol)),
        };
        run_and_compare(&format!("{name} 2-D"), &dir, &args, want);
    }
}

// ---------------------------------------------------------------------------------------------
// Errors: one line naming the flag and file, no panic, no output written.

/// Runs `args`, asserts failure without a panic and without out.npy, and returns stderr.
fn fails(dir: &TempDir, args: &[String]) -> String {
    let out = xattn(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "xattn {args:?} should fail: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!dir.path("out.npy").exists(), "no output on error: {err}");
    err
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error should mention `{p}`: {err}");
    }
}

#[test]
fn a_wrong_prefix_names_the_tensors_looked_for() {
    let c = Case::load("packed_bias");
    let dir = TempDir::new("prefix");
    let err = fails(&dir, &with(c.fixture_args(&dir), "--prefix", "nope."));
    assert_mentions(
        &err,
        &[
            "--weights",
            "weights.safetensors",
            "`nope.`",
            "`in_proj_weight`",
        ],
    );
    // A prefix without its trailing dot: the hint gives the one that loads.
    let c = Case::load("separate_kdim_vdim");
    let args = with(
        c.fixture_args(&dir),
        "--prefix",
        "decoder.layers.0.encoder_attn",
    );
    let err = fails(&dir, &args);
    assert_mentions(
        &err,
        &["did you mean --prefix `decoder.layers.0.encoder_attn.`"],
    );
    // Hugging Face names under a prefix, given none: the hint lists the file's prefix.
    let c = Case::load("hf_prefix");
    let mut args = c.fixture_args(&dir);
    let i = args.iter().position(|a| a == "--prefix").unwrap();
    args.drain(i..i + 2);
    let err = fails(&dir, &args);
    assert_mentions(
        &err,
        &["q_proj.weight", "`model.decoder.layers.0.encoder_attn.`"],
    );
}

#[test]
fn a_truncated_weights_file_says_truncated() {
    let c = Case::load("packed_bias");
    let dir = TempDir::new("truncweights");
    let w = dir.path("w.safetensors");
    std::fs::copy(c.file("weights.safetensors"), &w).unwrap();
    // Cut inside the data, the JSON header, the header's length.
    for len in [std::fs::metadata(&w).unwrap().len() - 10, 100, 5] {
        truncate(&w, len);
        let err = fails(&dir, &with(c.fixture_args(&dir), "--weights", &s(&w)));
        assert_mentions(
            &err,
            &[
                "--weights",
                "w.safetensors",
                "truncated",
                &format!("after {len} bytes"),
            ],
        );
    }
}

#[test]
fn heads_not_dividing_e_is_rejected() {
    let c = Case::load("packed_bias");
    let dir = TempDir::new("heads");
    let err = fails(&dir, &with(c.fixture_args(&dir), "--heads", "5"));
    assert_mentions(
        &err,
        &["--heads 5", "inner width 32", "E = 32", "query.npy"],
    );
    let err = fails(&dir, &with(c.fixture_args(&dir), "--kv-heads", "3"));
    assert_mentions(&err, &["--kv-heads 3", "--heads 4"]);
    let err = fails(&dir, &with(c.fixture_args(&dir), "--heads", "0"));
    assert_mentions(&err, &["--heads"]);
}

#[test]
fn mismatched_inputs_are_rejected() {
    let c = Case::load("packed_bias");
    let dir = TempDir::new("batch");
    // Query with batch 1, key and value with batch 2.
    let (q, shape) = read_npy::<f32>(&c.file("query.npy"));
    let per = q.len() / shape[0];
    let q1 = dir.path("q1.npy");
    write_npy(&q1, &q[..per], &[1, shape[1], shape[2]]);
    let err = fails(&dir, &with(c.fixture_args(&dir), "--query", &s(&q1)));
    assert_mentions(
        &err,
        &[
            "--query",
            "q1.npy",
            "--key",
            "batch",
            "[1, 7, 32]",
            "[2, 19, 32]",
        ],
    );
    // Key and value with different N.
    let other = Case::load("weights_averaged");
    let args = with(
        c.fixture_args(&dir),
        "--value",
        &s(&other.file("value.npy")),
    );
    let err = fails(&dir, &args);
    assert_mentions(&err, &["--key", "--value", "N", "19 vs 29"]);
    // A 2-D query with 3-D key and value.
    let q2 = dir.path("q2.npy");
    write_npy(&q2, &q[..per], &shape[1..]);
    let err = fails(&dir, &with(c.fixture_args(&dir), "--query", &s(&q2)));
    assert_mentions(&err, &["all be 3-D", "all 2-D"]);
    // A key whose width disagrees with the weights: kdim comes from the key file.
    let c = Case::load("separate_kdim_vdim");
    let args = with(c.fixture_args(&dir), "--key", &s(&c.file("value.npy")));
    let err = fails(&dir, &args);
    assert_mentions(
        &err,
        &[
            "--weights",
            "kdim 40 from --key",
            "k_proj_weight",
            "[32, 24]",
            "[32, 40]",
        ],
    );
}

#[test]
fn per_head_weights_need_need_weights() {
    let c = Case::load("packed_bias");
    let dir = TempDir::new("perhead");
    let mut args = c.fixture_args(&dir);
    args.push("--per-head-weights".into());
    let err = fails(&dir, &args);
    assert_mentions(&err, &["--need-weights"]);
}

#[test]
fn bad_key_padding_masks_are_rejected() {
    let c = Case::load("weights_averaged");
    let dir = TempDir::new("kpm");
    // [N, B] instead of [B, N].
    let (mask, _) = read_npy::<bool>(&c.file("key_padding_mask.npy"));
    let t = dir.path("t.npy");
    write_npy(&t, &mask, &[c.n, c.b]);
    let err = fails(
        &dir,
        &with(c.fixture_args(&dir), "--key-padding-mask", &s(&t)),
    );
    assert_mentions(
        &err,
        &[
            "--key-padding-mask",
            "t.npy",
            "[29, 2]",
            "[2, 29]",
            "true = ignore",
        ],
    );
    // float32: the dtype hint states this mask's polarity.
    let f = dir.path("f.npy");
    write_npy(&f, &vec![0.0f32; c.b * c.n], &[c.b, c.n]);
    let err = fails(
        &dir,
        &with(c.fixture_args(&dir), "--key-padding-mask", &s(&f)),
    );
    assert_mentions(
        &err,
        &["f.npy", "float32", "bool", "true = ignore that key"],
    );
    // Together with --mask.
    let m = dir.path("m.npy");
    write_npy(&m, &vec![true; c.n], &[c.n]);
    let err = fails(&dir, &with(c.fixture_args(&dir), "--mask", &s(&m)));
    assert_mentions(
        &err,
        &["--key-padding-mask", "--mask", "cannot be combined"],
    );
}

/// An integer 0/1 key padding mask is refused, naming this flag's convention (true =
/// ignore) and both conversions: following the old hint (a.astype(bool)) on a Hugging Face
/// attention_mask (1 = keep) would ignore every real token.
#[test]
fn an_integer_key_padding_mask_is_refused_with_both_conversions() {
    let c = Case::load("weights_averaged");
    let dir = TempDir::new("intkpm");
    let (kpm, _) = read_npy::<bool>(&c.file("key_padding_mask.npy"));
    let p = dir.path("kpm.npy");
    for dtype in ["int64", "uint8"] {
        if dtype == "int64" {
            let hf: Vec<i64> = kpm.iter().map(|&ignore| i64::from(!ignore)).collect();
            write_npy(&p, &hf, &[c.b, c.n]);
        } else {
            let torch: Vec<u8> = kpm.iter().map(|&ignore| u8::from(ignore)).collect();
            write_npy(&p, &torch, &[c.b, c.n]);
        }
        let err = fails(
            &dir,
            &with(c.fixture_args(&dir), "--key-padding-mask", &s(&p)),
        );
        assert_mentions(
            &err,
            &[
                "kpm.npy",
                dtype,
                "true = ignore that key (PyTorch's key_padding_mask)",
                "PyTorch-style 0/1 padding mask (1 = ignore) pass (a != 0)",
                "Hugging Face attention_mask (1 = keep) pass (a == 0)",
                "--attention-mask",
                "a.sum(1) to --kv-lens",
            ],
        );
        assert!(!err.contains("astype(bool)"), "{err}");
    }
}

/// `--attention-mask` (Hugging Face: 1 = keep) gives exactly what the key padding mask it
/// inverts gives, and the two together are refused.
#[test]
fn attention_mask_equals_the_key_padding_mask_it_inverts() {
    let Some(_) = engine() else { return };
    let c = Case::load("weights_averaged");
    let dir = TempDir::new("hfmask");
    let (kpm, _) = read_npy::<bool>(&c.file("key_padding_mask.npy"));
    assert!(kpm.iter().any(|&x| x), "the fixture pads some keys");
    let run = |args: &[String]| {
        let out = xattn(args);
        assert!(out.status.success(), "xattn failed: {}", stderr(&out));
        read_npy::<f32>(&dir.path("out.npy")).0
    };
    let by_kpm = run(&c.fixture_args(&dir));
    let hf: Vec<i64> = kpm.iter().map(|&ignore| i64::from(!ignore)).collect();
    let a = dir.path("attention_mask.npy");
    write_npy(&a, &hf, &[c.b, c.n]);
    let (q, k, v) = (c.file("query.npy"), c.file("key.npy"), c.file("value.npy"));
    let mut args = c.args(&dir, [&q, &k, &v], None);
    args.extend(["--attention-mask".into(), s(&a)]);
    let by_hf = run(&args);
    assert_eq!(
        by_hf, by_kpm,
        "--attention-mask a is --key-padding-mask (a == 0)"
    );
    let none = run(&c.args(&dir, [&q, &k, &v], None));
    assert_ne!(none, by_kpm, "the padding changes the output");
    let mut both = c.fixture_args(&dir);
    both.extend(["--attention-mask".into(), s(&a)]);
    let _ = std::fs::remove_file(dir.path("out.npy"));
    let err = fails(&dir, &both);
    assert_mentions(
        &err,
        &["--key-padding-mask", "--attention-mask", "give one"],
    );
}

/// Every file input of `mha` is refused at once when it is not a regular file: a FIFO would
/// block the read forever.
#[cfg(unix)]
#[test]
fn fifo_inputs_are_refused_without_blocking() {
    let c = Case::load("weights_averaged");
    let dir = TempDir::new("fifo");
    let fifo = dir.path("f.npy");
    if !make_fifo(&fifo) {
        return;
    }
    for flag in [
        "--weights",
        "--query",
        "--value",
        "--key-padding-mask",
        "--kv-lens",
    ] {
        let args = with(c.fixture_args(&dir), flag, &s(&fifo));
        let out = output_within(
            {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_xattn"));
                cmd.args(&args);
                cmd
            },
            60,
        );
        let err = stderr(&out);
        assert!(!out.status.success(), "{flag}: should fail: {err}");
        assert_mentions(&err, &["f.npy", "FIFO", "regular files"]);
        assert!(!dir.path("out.npy").exists(), "{flag}: no output on error");
    }
}

/// The masks and logit controls of `run` reach the attention inside the layer: the binary with
/// --causal, --softcap and a key padding mask gives what the library gives in this process for
/// the same options (same kernels, same device), and something else than without them.
/// The fixture's layer loaded through the library, and its inputs on the device.
fn case_layer(
    engine: &xattn::Engine,
    c: &Case,
) -> (
    xattn::MultiHeadAttention,
    xattn::Tensor,
    xattn::Tensor,
    xattn::Tensor,
) {
    let layer = xattn::MultiHeadAttention::from_safetensors(
        engine,
        MhaConfig::new(c.e, c.heads),
        &c.file("weights.safetensors"),
        &c.prefix,
    )
    .expect("load the layer");
    let q = engine.upload(&c.query, &[c.b, c.m, c.e]).unwrap();
    let k = engine.upload(&c.key, &[c.b, c.n, c.kdim]).unwrap();
    let v = engine.upload(&c.value, &[c.b, c.n, c.vdim]).unwrap();
    (layer, q, k, v)
}

#[test]
fn run_masks_reach_the_layer() {
    use xattn::{Alignment, Attention, MhaOptions};
    let Some(engine) = engine() else { return };
    let c = Case::load("weights_averaged");
    let dir = TempDir::new("masks");
    let mut args = c.fixture_args(&dir);
    args.extend(["--causal", "bottom-right", "--softcap", "2.5"].map(String::from));
    let out = xattn(&args);
    assert!(out.status.success(), "xattn failed: {}", stderr(&out));
    let err = stderr(&out);
    assert_mentions(&err, &["causal bottom-right", "softcap", "key padding"]);
    let (got, _) = read_npy::<f32>(&dir.path("out.npy"));
    let (got_w, _) = read_npy::<f32>(&dir.path("w.npy"));

    let (layer, q, k, v) = case_layer(engine, &c);
    let kpm = c.key_padding_mask.clone().expect("a key padding mask");
    let opts = MhaOptions::default()
        .with_attention(
            Attention::default()
                .with_causal(Alignment::BottomRight)
                .with_softcap(2.5),
        )
        .with_key_padding_mask(kpm)
        .with_need_weights(xattn::NeedWeights::Averaged);
    let want = layer.forward(&q, &k, &v, &opts).expect("forward");
    let want_o = want.out.to_host().unwrap();
    let want_w = want.weights.expect("weights").to_host().unwrap();
    assert_eq!(got, want_o, "out: the binary and the library disagree");
    assert_eq!(
        got_w, want_w,
        "weights: the binary and the library disagree"
    );
    let moved = got
        .iter()
        .zip(&c.out)
        .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        moved > 1e-2,
        "the masks changed nothing (max change {moved:e})"
    );
}

// ---------------------------------------------------------------------------------------------
// Random layers saved as diffusers, T5 and Hugging Face models save them.

/// Writes `[batch, seq, width]` inputs for `c` (batch 2, M 5, N 7) under `dir`: the paths of
/// query, key, value and their values.
fn write_inputs(dir: &TempDir, c: &MhaConfig, seed: u64) -> ([PathBuf; 3], [Vec<f32>; 3]) {
    let (b, m, n) = (2, 5, 7);
    let dims = [[b, m, c.embed_dim], [b, n, c.kdim], [b, n, c.vdim]];
    let names = ["query.npy", "key.npy", "value.npy"];
    let values: [Vec<f32>; 3] =
        std::array::from_fn(|i| random(dims[i].iter().product(), 1.0, seed + i as u64));
    for i in 0..3 {
        write_npy(&dir.path(names[i]), &values[i], &dims[i]);
    }
    (names.map(|f| dir.path(f)), values)
}

/// `xattn mha` on the files of `dir` with this weights file, prefix and heads, plus `flags`.
fn layer_args(
    dir: &TempDir,
    weights: &Path,
    prefix: &str,
    heads: usize,
    flags: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = vec!["mha".into(), "--weights".into(), s(weights)];
    a.extend([
        "--prefix".into(),
        prefix.into(),
        "--heads".into(),
        heads.to_string(),
    ]);
    for (flag, f) in [
        ("--query", "query.npy"),
        ("--key", "key.npy"),
        ("--value", "value.npy"),
    ] {
        a.extend([flag.into(), s(&dir.path(f))]);
    }
    a.extend(["--out".into(), s(&dir.path("out.npy"))]);
    a.extend(flags.iter().map(|f| f.to_string()));
    a
}

/// A random layer saved under a family's names.
struct Saved {
    what: &'static str,
    names: &'static str,
    prefix: &'static str,
    config: MhaConfig,
    /// Which of Q, K, V, O have a bias in the file.
    biases: [bool; 4],
    /// Flags beyond the files, prefix and heads.
    flags: &'static [&'static str],
}

/// Each layer through the binary with only the flags its model needs (none: no `--no-bias`,
/// and T5's scale 1 comes from its names), against the f64 layer with the biases the file
/// holds.
#[test]
fn model_families_match_the_f64_layer() {
    let Some(_) = engine() else { return };
    let e16 = MhaConfig::new(16, 2);
    let e8 = MhaConfig::new(8, 2);
    let attn2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.";
    let t5 = "decoder.block.0.layer.1.EncDecAttention.";
    let whisper = "model.decoder.layers.0.encoder_attn.";
    let cases = [
        Saved {
            what: "diffusers attn2, only to_out.0 biased",
            names: "diffusers",
            prefix: attn2,
            config: e16.with_kdim(12).with_vdim(12),
            biases: [false, false, false, true],
            flags: &[],
        },
        Saved {
            what: "diffusers attn2, to_q biased too",
            names: "diffusers",
            prefix: attn2,
            config: e16.with_kdim(12).with_vdim(12),
            biases: [true, false, false, true],
            flags: &[],
        },
        Saved {
            what: "T5 v1.1: E 8, 2 heads of 6",
            names: "t5",
            prefix: t5,
            config: e8.with_inner_dim(12),
            biases: [false; 4],
            flags: &[],
        },
        Saved {
            what: "T5 v1.1: E 8, 3 heads of 4",
            names: "t5",
            prefix: t5,
            config: MhaConfig::new(8, 3).with_inner_dim(12),
            biases: [false; 4],
            flags: &["--scale", "1"],
        },
        Saved {
            what: "Hugging Face without biases",
            names: "hf",
            prefix: whisper,
            config: e16.with_kdim(10),
            biases: [false; 4],
            flags: &[],
        },
        Saved {
            what: "Whisper: k_proj unbiased",
            names: "hf",
            prefix: whisper,
            config: e16,
            biases: [true, false, true, true],
            flags: &[],
        },
        Saved {
            what: "--no-bias ignores the file's biases",
            names: "hf",
            prefix: whisper,
            config: e16,
            biases: [true; 4],
            flags: &["--no-bias"],
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let (c, what) = (case.config, case.what);
        let dir = TempDir::new(&format!("family-{i}"));
        let seed = 500 + 10 * i as u64;
        let saved = keep_biases(random_weights(&c, seed), case.biases);
        let weights = dir.path("layer.safetensors");
        write_safetensors(
            &weights,
            &layer_tensors(case.names, case.prefix, &c, &saved),
        );
        let (_, [query, key, value]) = write_inputs(&dir, &c, seed + 5);
        let args = layer_args(&dir, &weights, case.prefix, c.num_heads, case.flags);
        let out = xattn(&args);
        let err = stderr(&out);
        assert!(out.status.success(), "{what}: xattn failed: {err}");
        assert_mentions(&err, &[&format!("({} names)", case.names)]);
        let (got, dims) = read_npy::<f32>(&dir.path("out.npy"));
        assert_eq!(dims, [2, 5, c.embed_dim], "{what}");
        let used = if case.flags.contains(&"--no-bias") {
            keep_biases(saved, [false; 4])
        } else {
            saved
        };
        let mut attention = xattn::Attention::default();
        if case.names == "t5" {
            // One case leaves the scale to the names, one gives --scale 1: the same layer.
            let noted = err.contains("T5 and MT5 do not scale their logits, so the scale is 1");
            assert_eq!(noted, !case.flags.contains(&"--scale"), "{what}: {err}");
            attention = attention.with_scale(1.0);
        }
        let inputs = (&query[..], &key[..], &value[..]);
        let (want, _) = reference_layer(&c, &used, 2, inputs, &attention);
        let scale = f64::from(attention.scale_for(c.head_dim()));
        let (tol, _) = layer_tolerance(&c, &used, [&query, &key, &value], 7, scale);
        let e = assert_close(what, &got, &want, tol);
        eprintln!("{what:40} max err {e:.2e} (bound {tol:.2e})");
    }
}

/// A layer under T5 names runs at T5's scale, 1, when --scale is not given, and says so: the
/// same numbers as with --scale 1, not those of 1/sqrt(head dim); --scale still overrides it.
#[test]
fn a_t5_layer_without_scale_runs_at_scale_1_with_a_note() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("t5scale");
    let c = MhaConfig::new(8, 2).with_inner_dim(12);
    let prefix = "encoder.block.0.layer.0.SelfAttention.";
    let weights = dir.path("t5.safetensors");
    write_safetensors(
        &weights,
        &layer_tensors(
            "t5",
            prefix,
            &c,
            &keep_biases(random_weights(&c, 71), [false; 4]),
        ),
    );
    write_inputs(&dir, &c, 72);
    let run = |flags: &[&str]| {
        let out = xattn(&layer_args(&dir, &weights, prefix, 2, flags));
        let err = stderr(&out);
        assert!(out.status.success(), "{flags:?}: xattn failed: {err}");
        (read_npy::<f32>(&dir.path("out.npy")).0, err)
    };
    let (default, err) = run(&[]);
    assert_mentions(
        &err,
        &[
            "note: T5 names",
            "the scale is 1 (not 1/sqrt(head dim) = 0.4082)",
            "pass --scale",
        ],
    );
    let (one, err) = run(&["--scale", "1"]);
    assert!(
        !err.contains("note: T5"),
        "no note when --scale is given: {err}"
    );
    assert_eq!(default, one, "a T5 layer without --scale is --scale 1");
    let (sqrt, _) = run(&["--scale", &(1.0 / 6f64.sqrt()).to_string()]);
    assert_ne!(sqrt, one, "--scale overrides T5's 1");
}

/// `data` of 3-D `dims` with its first two axes swapped: `x.transpose(0, 1)`.
fn swap01(data: &[f32], [x, y, f]: [usize; 3]) -> Vec<f32> {
    let mut out = Vec::with_capacity(data.len());
    for j in 0..y {
        for i in 0..x {
            out.extend_from_slice(&data[(i * y + j) * f..][..f]);
        }
    }
    out
}

/// PyTorch's nn.MultiheadAttention takes [seq, batch, features] unless batch_first=True:
/// with --layout sbe (or seq-first) such inputs give the batch-first run's output transposed,
/// and the same batch-first weights; without it, the mismatch names seq first and the way out.
#[test]
fn seq_first_inputs_equal_batch_first_inputs_transposed() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("seqfirst");
    let c = MhaConfig::new(16, 2).with_kdim(10).with_vdim(12);
    let prefix = "model.decoder.layers.0.encoder_attn.";
    let weights = dir.path("layer.safetensors");
    write_safetensors(
        &weights,
        &layer_tensors("hf", prefix, &c, &random_weights(&c, 81)),
    );
    // Batch first: query [2, 5, 16], key [2, 7, 10], value [2, 7, 12].
    let ([query, key, value], data) = write_inputs(&dir, &c, 82);
    let kpm = dir.path("kpm.npy");
    let mask: Vec<bool> = (0..14).map(|i| i % 7 == 4 || i == 13).collect();
    write_npy(&kpm, &mask, &[2, 7]);
    let run = |flags: &[&str]| {
        let mut args = layer_args(&dir, &weights, prefix, 2, flags);
        args.extend(["--key-padding-mask".into(), s(&kpm)]);
        args.extend(["--need-weights".into(), s(&dir.path("w.npy"))]);
        let out = xattn(&args);
        let err = stderr(&out);
        assert!(out.status.success(), "{flags:?}: xattn failed: {err}");
        let o = read_npy::<f32>(&dir.path("out.npy"));
        let w = read_npy::<f32>(&dir.path("w.npy"));
        (o, w, err)
    };
    let ((bf, bf_dims), w_bf, _) = run(&[]);
    assert_eq!(bf_dims, [2, 5, 16]);
    // The same inputs seq first.
    let dims = [[2, 5, 16], [2, 7, 10], [2, 7, 12]];
    for ((path, x), d) in [&query, &key, &value].into_iter().zip(&data).zip(dims) {
        write_npy(path, &swap01(x, d), &[d[1], d[0], d[2]]);
    }
    for name in ["sbe", "seq-first"] {
        let ((sf, sf_dims), w_sf, err) = run(&["--layout", name]);
        assert_eq!(sf_dims, [5, 2, 16], "--layout {name}: out is seq first");
        assert_eq!(sf, swap01(&bf, [2, 5, 16]), "--layout {name}: out");
        assert_eq!(
            w_sf, w_bf,
            "--layout {name}: weights are batch first in both"
        );
        assert!(!err.contains("note:"), "{err}");
    }
    // Without --layout: batch 5 (query) against 7 (key), and the way out.
    let mut args = layer_args(&dir, &weights, prefix, 2, &[]);
    args.extend(["--key-padding-mask".into(), s(&kpm)]);
    let _ = std::fs::remove_file(dir.path("out.npy"));
    let err = fails(&dir, &args);
    assert_mentions(
        &err,
        &[
            "--query",
            "--key",
            "differ in batch: 5 vs 7",
            "read as --layout bse [batch, seq, features]",
            "they fit --layout sbe [seq, batch, features]",
            "batch_first=False",
            "x.transpose(0, 1)",
        ],
    );
}

/// Where query, key and value fit both layouts (same length and batch count in the first two
/// axes), the default is read with a note, as `run` does; naming the layout silences it.
#[test]
fn mha_shapes_that_fit_both_layouts_get_a_note_unless_the_layout_is_named() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("bothlayouts");
    let c = MhaConfig::new(8, 2);
    let prefix = "attn.";
    let weights = dir.path("layer.safetensors");
    write_safetensors(
        &weights,
        &layer_tensors("hf", prefix, &c, &random_weights(&c, 91)),
    );
    // Self-attention: [5, 2, 8] three times; batch 5 of 2 tokens, or batch 2 of 5.
    let x = random(80, 1.0, 92);
    for f in ["query.npy", "key.npy", "value.npy"] {
        write_npy(&dir.path(f), &x, &[5, 2, 8]);
    }
    let run = |flags: &[&str]| {
        let out = xattn(&layer_args(&dir, &weights, prefix, 2, flags));
        let err = stderr(&out);
        assert!(out.status.success(), "{flags:?}: xattn failed: {err}");
        (read_npy::<f32>(&dir.path("out.npy")).0, err)
    };
    let (default, err) = run(&[]);
    assert_mentions(
        &err,
        &[
            "note: query, key, value fit both layouts",
            "bse: batch 5, M 2, N 2",
            "sbe: batch 2, M 5, N 5",
            "pass --layout",
        ],
    );
    let (bse, err) = run(&["--layout", "bse"]);
    assert!(!err.contains("note:"), "{err}");
    assert_eq!(bse, default, "the default is bse");
    let (sbe, _) = run(&["--layout", "sbe"]);
    assert_ne!(sbe, bse, "the two readings differ: the note is needed");
}

/// `--dtype f16` keeps the inputs and the layer's weights in float16: a value past ±65504 in
/// either would become inf, so it is refused before the run, by name.
#[test]
fn mha_dtype_f16_refuses_inputs_and_weights_past_its_range() {
    let dir = TempDir::new("f16range");
    let c = MhaConfig::new(8, 2);
    let prefix = "attn.";
    let mut w = random_weights(&c, 101);
    w.k[3] = -1e5;
    let weights = dir.path("layer.safetensors");
    write_safetensors(&weights, &layer_tensors("hf", prefix, &c, &w));
    write_inputs(&dir, &c, 102);
    let args = layer_args(&dir, &weights, prefix, 2, &["--dtype", "f16"]);
    let err = fails(&dir, &args);
    assert_mentions(
        &err,
        &[
            "W_k of --weights",
            "layer.safetensors",
            "-1e5 at [3]",
            "±65504",
            "-inf",
        ],
    );
    let (mut q, shape) = read_npy::<f32>(&dir.path("query.npy"));
    q[7] = 123456.0;
    write_npy(&dir.path("query.npy"), &q, &shape);
    let err = fails(&dir, &args);
    assert_mentions(
        &err,
        &["--query", "query.npy", "1.23456e5 at [0, 0, 7]", "±65504"],
    );
}

/// Flags that do not go together are usage errors, exit status 2 as for clap's; a layer file
/// that does not fit the flags is an error, 1.
#[test]
fn mha_usage_errors_exit_2() {
    let dir = TempDir::new("usage");
    let c = MhaConfig::new(8, 2);
    let weights = dir.path("layer.safetensors");
    write_safetensors(
        &weights,
        &layer_tensors("hf", "attn.", &c, &random_weights(&c, 111)),
    );
    write_inputs(&dir, &c, 112);
    let kpm = dir.path("kpm.npy");
    write_npy(&kpm, &[false; 14], &[2, 7]);
    let (kp, am) = (s(&kpm), s(&dir.path("am.npy")));
    for (heads, flags, code) in [
        (2, vec!["--kv-heads", "3"], 2),
        (
            2,
            vec!["--key-padding-mask", &kp, "--attention-mask", &am],
            2,
        ),
        (2, vec!["--key-padding-mask", &kp, "--mask", &am], 2),
        (2, vec!["--bogus"], 2),
        (3, vec![], 1),
    ] {
        let out = xattn(&layer_args(&dir, &weights, "attn.", heads, &flags));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// A UNet-like file: 240 unrelated tensors, diffusers layers `attn1` and `attn2` in two blocks,
/// and under `mid_block.attn2.` a layer missing `to_out.0`. Errors list what lies near the
/// prefix — the layers below it, the tensors under it, or the closest layers — never the
/// file's first names.
#[test]
fn weights_errors_list_what_is_near_the_prefix() {
    let dir = TempDir::new("near");
    let c = MhaConfig::new(8, 2);
    write_inputs(&dir, &c, 1);
    let mut tensors: Vec<NamedTensor> = (0..240)
        .map(|i| {
            (
                format!("down_blocks.{}.resnets.{i}.conv.weight", i % 3),
                vec![1],
                vec![0.5],
            )
        })
        .collect();
    let block =
        |b: usize, a: usize| format!("down_blocks.{b}.attentions.0.transformer_blocks.0.attn{a}.");
    for b in 0..2 {
        for a in [1, 2] {
            tensors.extend(layer_tensors(
                "diffusers",
                &block(b, a),
                &c,
                &random_weights(&c, 9),
            ));
        }
    }
    let mid = "mid_block.attn2.";
    tensors.extend(
        layer_tensors("diffusers", mid, &c, &random_weights(&c, 9))
            .into_iter()
            .filter(|(n, _, _)| !n.contains("to_out")),
    );
    tensors.push((format!("{mid}norm_cross.weight"), vec![8], vec![1.0; 8]));
    let weights = dir.path("unet.safetensors");
    write_safetensors(&weights, &tensors);
    let err_for = |prefix: &str| fails(&dir, &layer_args(&dir, &weights, prefix, 2, &[]));
    let no_unrelated =
        |err: &str| assert!(!err.contains("resnets"), "unrelated names listed: {err}");

    // A prefix that names nothing: the closest layers, the nearest first.
    let err = err_for(&block(1, 3));
    let closest = format!(
        "closest prefixes holding a layer are `{}` (diffusers), `{}` (diffusers), `{}`",
        block(1, 1),
        block(1, 2),
        block(0, 1)
    );
    assert_mentions(&err, &[&closest]);
    no_unrelated(&err);
    // A block above the layers: the layers below it.
    let err = err_for("down_blocks.1.");
    assert_mentions(
        &err,
        &[&format!(
            "`{}` (diffusers), `{}` (diffusers)",
            block(1, 1),
            block(1, 2)
        )],
    );
    assert!(!err.contains(&block(0, 1)), "{err}");
    no_unrelated(&err);
    // An incomplete layer: the missing tensor, and every tensor under the prefix.
    let err = err_for(mid);
    assert_mentions(
        &err,
        &[
            "tensor `mid_block.attn2.to_out.0.weight` is missing (diffusers names)",
            "`mid_block.attn2.norm_cross.weight`",
            "`mid_block.attn2.to_q.weight`",
            "`mid_block.attn2.to_v.weight`",
        ],
    );
    no_unrelated(&err);
}

/// A layer whose prefix holds tensors it does not read (here nn.MultiheadAttention's bias_k
/// and bias_v of add_bias_kv=True, and T5's relative position bias) is refused before a
/// device is opened, naming each tensor and what it is; with --ignore-tensors it runs, says
/// what it ignored, and equals the f64 layer without them. Ignoring a tensor the file lacks,
/// or one the layer reads, is an error naming it.
#[test]
fn mha_refuses_tensors_the_layer_does_not_read() {
    let dir = TempDir::new("unread");
    let c = MhaConfig::new(8, 2);
    let (_, [query, key, value]) = write_inputs(&dir, &c, 720);
    let saved = random_weights(&c, 721);
    let mut tensors = layer_tensors("pytorch", "", &c, &saved);
    tensors.push(("bias_k".into(), vec![1, 1, 8], random(8, 1.0, 722)));
    tensors.push(("bias_v".into(), vec![1, 1, 8], random(8, 1.0, 723)));
    let weights = dir.path("add_bias_kv.safetensors");
    write_safetensors(&weights, &tensors);
    let err = fails(&dir, &layer_args(&dir, &weights, "", 2, &[]));
    assert_mentions(
        &err,
        &[
            "--weights",
            "add_bias_kv.safetensors",
            "bias_k, bias_v: nn.MultiheadAttention(add_bias_kv=True)'s learned key and value",
            "--ignore-tensors bias_k,bias_v",
        ],
    );
    for (names, why) in [
        (
            "bias_k,nope",
            "cannot ignore `nope`: the file holds no tensor `nope`",
        ),
        ("out_proj.weight", "the layer reads `out_proj.weight`"),
    ] {
        let err = fails(
            &dir,
            &layer_args(&dir, &weights, "", 2, &["--ignore-tensors", names]),
        );
        assert_mentions(&err, &[why]);
    }
    // Ignoring one of the two: the other is still refused.
    let err = fails(
        &dir,
        &layer_args(&dir, &weights, "", 2, &["--ignore-tensors", "bias_k"]),
    );
    assert_mentions(&err, &["bias_v: nn.MultiheadAttention(add_bias_kv=True)"]);

    let t5 = c.with_inner_dim(12);
    let prefix = "encoder.block.0.layer.0.SelfAttention.";
    let mut tensors = layer_tensors(
        "t5",
        prefix,
        &t5,
        &keep_biases(random_weights(&t5, 724), [false; 4]),
    );
    tensors.push((
        format!("{prefix}relative_attention_bias.weight"),
        vec![32, 2],
        random(64, 1.0, 725),
    ));
    let t5_weights = dir.path("t5.safetensors");
    write_safetensors(&t5_weights, &tensors);
    let err = fails(&dir, &layer_args(&dir, &t5_weights, prefix, 2, &[]));
    assert_mentions(
        &err,
        &[
            "relative_attention_bias.weight: T5's relative position bias (pass it as --bias",
            &format!("prefix `{prefix}`"),
        ],
    );

    let Some(_) = engine() else { return };
    let out = xattn(&layer_args(
        &dir,
        &weights,
        "",
        2,
        &["--ignore-tensors", "bias_k", "--ignore-tensors", "bias_v"],
    ));
    let err = stderr(&out);
    assert!(out.status.success(), "xattn failed: {err}");
    assert_mentions(
        &err,
        &[
            "note: --ignore-tensors: the layer runs without bias_k (nn.MultiheadAttention",
            "bias_v (",
            "differs from the model's",
        ],
    );
    let (got, _) = read_npy::<f32>(&dir.path("out.npy"));
    let attention = xattn::Attention::default();
    let inputs = (&query[..], &key[..], &value[..]);
    let (want, _) = reference_layer(&c, &saved, 2, inputs, &attention);
    let scale = f64::from(attention.scale_for(c.head_dim()));
    let (tol, _) = layer_tolerance(&c, &saved, [&query, &key, &value], 7, scale);
    assert_close("ignored bias_k, bias_v", &got, &want, tol);
}

/// The largest |logit| of the layer `w` on these inputs (batch 2, N 7), in f64.
fn largest_logit(c: &MhaConfig, w: &xattn::mha::MhaWeights, query: &[f32], key: &[f32]) -> f64 {
    use xattn::cpu::reference::linear;
    let q = linear(query, &w.q, w.q_bias.as_deref(), c.embed_dim);
    let k = linear(key, &w.k, w.k_bias.as_deref(), c.kdim);
    let (d, group) = (c.head_dim(), c.num_heads / c.kv_heads);
    let scale = 1.0 / (d as f64).sqrt();
    let (m, n) = (q.len() / 2 / c.inner_dim, k.len() / 2 / c.kv_dim());
    let mut largest = 0.0f64;
    for b in 0..2 {
        for h in 0..c.num_heads {
            for i in 0..m {
                for j in 0..n {
                    let qi = &q[(b * m + i) * c.inner_dim + h * d..][..d];
                    let kj = &k[(b * n + j) * c.kv_dim() + h / group * d..][..d];
                    let dot: f64 = qi.iter().zip(kj).map(|(x, y)| x * y).sum();
                    largest = largest.max((scale * dot).abs());
                }
            }
        }
    }
    largest
}

/// The logits of the projected query and key that f32 cannot hold are refused before the run,
/// naming the projection and the input (the run wrote NaN); large ones it holds, up to 1e37,
/// run and match the f64 layer.
#[test]
fn mha_refuses_logits_past_what_f32_holds() {
    let dir = TempDir::new("mha-logits");
    let c = MhaConfig::new(8, 2);
    let prefix = "attn.";
    let w = random_weights(&c, 730);
    let weights = dir.path("layer.safetensors");
    write_safetensors(&weights, &layer_tensors("hf", prefix, &c, &w));
    let ([qp, kp, _], [query, key, value]) = write_inputs(&dir, &c, 731);
    let grown = |x: &[f32], by: f32| x.iter().map(|y| y * by).collect::<Vec<f32>>();
    let (q_big, k_big) = (grown(&query, 3e19), grown(&key, 3e19));
    assert!(largest_logit(&c, &w, &q_big, &k_big) > 1e38);
    write_npy(&qp, &q_big, &[2, 5, 8]);
    write_npy(&kp, &k_big, &[2, 7, 8]);
    let err = fails(&dir, &layer_args(&dir, &weights, prefix, 2, &[]));
    assert_mentions(
        &err,
        &[
            "the logit at head ",
            "of the query projected by W_q (--query ",
            "of the key projected by W_k (--key ",
            "±5e37",
        ],
    );

    let Some(_) = engine() else { return };
    // Scaled to logits up to about 1e37 (the biases do not scale), where the bound through the weights' norms is past the
    // limit: the projections computed on the host decide.
    let s = (1e37 / largest_logit(&c, &w, &query, &key)).sqrt() as f32;
    let (q_large, k_large) = (grown(&query, s), grown(&key, s));
    let largest = largest_logit(&c, &w, &q_large, &k_large);
    assert!(
        (5e36..=1.5e37).contains(&largest),
        "logits up to {largest:e}"
    );
    let norm = |x: &[f32]| x.iter().map(|&y| f64::from(y).powi(2)).sum::<f64>().sqrt();
    let rows_max = |x: &[f32]| x.chunks(8).map(norm).fold(0.0f64, f64::max);
    let bound = |x: &[f32], wt: &[f32], b: &Option<Vec<f32>>, h: usize| {
        norm(&wt[h * 32..(h + 1) * 32]) * rows_max(x)
            + b.as_ref().map_or(0.0, |b| norm(&b[h * 4..(h + 1) * 4]))
    };
    let through_weights = (0..2)
        .map(|h| 0.5 * bound(&q_large, &w.q, &w.q_bias, h) * bound(&k_large, &w.k, &w.k_bias, h))
        .fold(0.0f64, f64::max);
    assert!(through_weights > 5e37, "bound {through_weights:e}");
    write_npy(&qp, &q_large, &[2, 5, 8]);
    write_npy(&kp, &k_large, &[2, 7, 8]);
    let out = xattn(&layer_args(&dir, &weights, prefix, 2, &[]));
    assert!(out.status.success(), "xattn failed: {}", stderr(&out));
    let (got, _) = read_npy::<f32>(&dir.path("out.npy"));
    let attention = xattn::Attention::default();
    let (want, _) = reference_layer(&c, &w, 2, (&q_large, &k_large, &value), &attention);
    // One key dominates each row by far more than f32's rounding of the logits: the output is
    // that key's projected value through W_o, to f32 rounding.
    let top = want.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    assert_close("logits up to 1e37", &got, &want, 1e-5 * top);
}

/// Where one prefix holds two families the error says to pass --names; with it, the layer's
/// inner width (from the named family's W^Q) is what --heads must divide.
#[test]
fn names_choose_between_families_under_one_prefix() {
    let dir = TempDir::new("names");
    let c = MhaConfig::new(8, 2);
    write_inputs(&dir, &c, 1);
    let wide = c.with_inner_dim(12);
    let mut tensors = layer_tensors("t5", "attn.", &wide, &random_weights(&wide, 2));
    tensors.extend(layer_tensors(
        "diffusers",
        "attn.",
        &c,
        &random_weights(&c, 3),
    ));
    let weights = dir.path("both.safetensors");
    write_safetensors(&weights, &tensors);
    let err = fails(&dir, &layer_args(&dir, &weights, "attn.", 2, &[]));
    assert_mentions(
        &err,
        &["diffusers", "t5", "choose one with --names diffusers|t5"],
    );
    let err = fails(
        &dir,
        &layer_args(&dir, &weights, "attn.", 5, &["--names", "t5"]),
    );
    assert_mentions(
        &err,
        &["--heads 5 does not divide the inner width 12", "E = 8"],
    );
    let err = fails(
        &dir,
        &layer_args(&dir, &weights, "attn.", 5, &["--names", "diffusers"]),
    );
    assert_mentions(&err, &["--heads 5 does not divide the inner width 8"]);
    let err = fails(
        &dir,
        &layer_args(&dir, &weights, "attn.", 2, &["--names", "torch"]),
    );
    assert_mentions(&err, &["--names", "pytorch, hf, diffusers or t5"]);
}

// ---------------------------------------------------------------------------------------------
// Half precision: --dtype keeps the weights and inputs in f16 or bf16, --out-dtype.

/// `x` rounded to f16 (`true`) or bf16.
fn round_all(x: &[f32], f16: bool) -> Vec<f32> {
    x.iter()
        .map(|&y| {
            if f16 {
                half::f16::from_f32(y).to_f32()
            } else {
                half::bf16::from_f32(y).to_f32()
            }
        })
        .collect()
}

/// `w` with every weight and bias rounded as [`round_all`] does.
fn round_weights(w: &xattn::mha::MhaWeights, f16: bool) -> xattn::mha::MhaWeights {
    let rb = |b: &Option<Vec<f32>>| b.as_deref().map(|b| round_all(b, f16));
    xattn::mha::MhaWeights {
        q: round_all(&w.q, f16),
        k: round_all(&w.k, f16),
        v: round_all(&w.v, f16),
        o: round_all(&w.o, f16),
        q_bias: rb(&w.q_bias),
        k_bias: rb(&w.k_bias),
        v_bias: rb(&w.v_bias),
        o_bias: rb(&w.o_bias),
    }
}

/// `mha --dtype f16` (float32 files and weights, rounded on upload) writes a float16 output
/// within the f32 layer's budget on the rounded weights and inputs plus the output's one
/// rounding (2⁻¹¹·max|out|); float16 input files without --dtype give the same bits. `--dtype
/// bf16 --out-dtype f32` writes float32 within the budget on the bf16-rounded layer alone.
#[test]
fn mha_dtype_keeps_the_layer_in_half_precision() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("half");
    let prefix = "model.decoder.layers.0.encoder_attn.";
    let c = MhaConfig::new(16, 4)
        .with_kv_heads(2)
        .with_kdim(12)
        .with_vdim(12);
    let saved = random_weights(&c, 700);
    let weights = dir.path("layer.safetensors");
    write_safetensors(&weights, &layer_tensors("hf", prefix, &c, &saved));
    let (_, inputs) = write_inputs(&dir, &c, 705);
    let attention = xattn::Attention::default();
    let scale = f64::from(attention.scale_for(c.head_dim()));
    let expected = |f16: bool| {
        let w = round_weights(&saved, f16);
        let [q, k, v] = inputs.each_ref().map(|x| round_all(x, f16));
        let (want, _) = reference_layer(&c, &w, 2, (&q, &k, &v), &attention);
        let (tol, _) = layer_tolerance(&c, &w, [&q, &k, &v], 7, scale);
        (want, tol)
    };
    let run = |flags: &[&str]| {
        let flags = [&["--kv-heads", "2"], flags].concat();
        let out = xattn(&layer_args(&dir, &weights, prefix, c.num_heads, &flags));
        let err = stderr(&out);
        assert!(out.status.success(), "{flags:?}: xattn failed: {err}");
        err
    };

    let err = run(&["--dtype", "f16"]);
    assert_mentions(&err, &["xattn: mha B2", " f16 (hf names)"]);
    // read_npy::<f16> fails on any other dtype: the output is float16.
    let (got, dims) = read_npy::<half::f16>(&dir.path("out.npy"));
    assert_eq!(dims, [2, 5, c.embed_dim]);
    let got: Vec<f32> = got.into_iter().map(half::f16::to_f32).collect();
    let (want, tol) = expected(true);
    let out_max = want.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    let bound = tol + out_max / 2048.0;
    let e = assert_close("mha --dtype f16", &got, &want, bound);
    eprintln!("mha f16: max err {e:.2e} (bound {bound:.2e})");

    // The same values in float16 files: f16 without --dtype, the same output bit for bit.
    let dims = [[2, 5, c.embed_dim], [2, 7, c.kdim], [2, 7, c.vdim]];
    for ((name, x), d) in ["query.npy", "key.npy", "value.npy"]
        .iter()
        .zip(&inputs)
        .zip(dims)
    {
        let halves: Vec<half::f16> = x.iter().map(|&y| half::f16::from_f32(y)).collect();
        write_npy(&dir.path(name), &halves, &d);
    }
    run(&[]);
    let (again, _) = read_npy::<half::f16>(&dir.path("out.npy"));
    let again: Vec<f32> = again.into_iter().map(half::f16::to_f32).collect();
    assert!(
        again == got,
        "float16 files run as --dtype f16 on float32 files"
    );

    write_inputs(&dir, &c, 705); // float32 again
    let err = run(&["--dtype", "bf16", "--out-dtype", "f32"]);
    assert_mentions(&err, &[" bf16→f32 (hf names)"]);
    let (got, _) = read_npy::<f32>(&dir.path("out.npy"));
    let (want, tol) = expected(false);
    let e = assert_close("mha --dtype bf16 --out-dtype f32", &got, &want, tol);
    eprintln!("mha bf16 → f32: max err {e:.2e} (bound {tol:.2e})");
}

/// Inputs of different types are refused before the run, naming each file.
#[test]
fn mha_inputs_of_mixed_types_are_refused() {
    let dir = TempDir::new("halfmix");
    let c = MhaConfig::new(8, 2);
    let prefix = "model.decoder.layers.0.encoder_attn.";
    let weights = dir.path("layer.safetensors");
    write_safetensors(
        &weights,
        &layer_tensors("hf", prefix, &c, &random_weights(&c, 710)),
    );
    let (paths, values) = write_inputs(&dir, &c, 711);
    let halves: Vec<half::f16> = values[1].iter().map(|&y| half::f16::from_f32(y)).collect();
    write_npy(&paths[1], &halves, &[2, 7, c.kdim]);
    let err = fails(&dir, &layer_args(&dir, &weights, prefix, 2, &[]));
    assert_mentions(
        &err,
        &[
            "the inputs must share one type",
            "--key",
            "key.npy is float16 (<f2)",
            "--query",
            "pass --dtype f16",
        ],
    );
}

#[test]
fn mha_writes_statistics_and_heatmaps_as_the_library_computes_them() {
    use xattn::{Attention, MhaOptions, Stats};
    let Some(engine) = engine() else { return };
    let c = Case::load("weights_averaged");
    let dir = TempDir::new("mha_stats");
    let mut args = c.fixture_args(&dir);
    let maps = dir.path("maps");
    for (flag, file) in [
        ("--entropy", "h.npy"),
        ("--focus", "f.npy"),
        ("--coverage", "c.npy"),
    ] {
        args.extend([flag.into(), s(&dir.path(file))]);
    }
    args.extend(["--heatmap".into(), s(&maps)]);
    let out = xattn(&args);
    assert!(out.status.success(), "xattn failed: {}", stderr(&out));

    let (layer, q, k, v) = case_layer(engine, &c);
    let opts = MhaOptions::default()
        .with_attention(Attention::default().with_stats(Stats::ALL))
        .with_key_padding_mask(c.key_padding_mask.clone().expect("a key padding mask"))
        .with_need_weights(xattn::NeedWeights::Averaged);
    let want = layer.forward(&q, &k, &v, &opts).expect("forward");
    let want = want.stats.to_host().unwrap();
    for (file, want, dims) in [
        ("h.npy", want.entropy.unwrap(), [c.b, c.heads, c.m]),
        ("f.npy", want.focus.unwrap(), [c.b, c.heads, c.m]),
        ("c.npy", want.coverage.unwrap(), [c.b, c.heads, c.n]),
    ] {
        let (got, shape) = read_npy::<f32>(&dir.path(file));
        assert_eq!(shape, dims, "{file}");
        assert_eq!(got, want, "{file}: the binary and the library disagree");
    }
    let pngs = std::fs::read_dir(&maps).unwrap().count();
    assert_eq!(
        pngs,
        c.b * (c.heads + 1),
        "one map per head and one mean per batch entry"
    );
}
