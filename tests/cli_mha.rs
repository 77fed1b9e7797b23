//! `xattn mha` end to end: the binary on the PyTorch fixtures of `tests/fixtures/mha/` (see
//! `tests/fixtures/generate_mha.py`), outputs and attention weights compared with PyTorch's
//! within a derived error bound; and the errors a user gets for a wrong prefix, head count,
//! mismatched inputs or flags (checked on the host before a device is opened, so they need no
//! GPU).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use npyz::WriterBuilder;

const EPS: f64 = f32::EPSILON as f64;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mha")
}

/// A fresh folder for one test's files, removed when the test passes.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("xattn-cli-mha-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temp folder");
        Self(dir)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> (Vec<T>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(npy.order(), npyz::Order::C, "{}", path.display());
    let shape = npy.shape().iter().map(|&d| d as usize).collect();
    let data = npy
        .into_vec()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (data, shape)
}

/// Writes `data` with shape `shape` as a C-ordered .npy of `T`'s default dtype.
fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, data: &[T], shape: &[usize]) {
    assert_eq!(data.len(), shape.iter().product::<usize>());
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&dims)
        .writer(std::io::BufWriter::new(
            std::fs::File::create(path).expect("create .npy"),
        ))
        .begin_nd()
        .expect("npy header");
    w.extend(data.iter().copied()).expect("npy data");
    w.finish().expect("npy finish");
}

/// A safetensors file of F32 tensors: name → values. Parsed by hand (8-byte little-endian
/// header length, JSON header, raw little-endian data), not with the loader under test.
fn read_safetensors(path: &Path) -> BTreeMap<String, Vec<f64>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let data = &bytes[8 + len..];
    let mut out = BTreeMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(info["dtype"], "F32", "{name}");
        let offs = info["data_offsets"].as_array().unwrap();
        let (a, b) = (
            offs[0].as_u64().unwrap() as usize,
            offs[1].as_u64().unwrap() as usize,
        );
        let values = data[a..b]
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
            .collect();
        out.insert(name.clone(), values);
    }
    out
}

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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Need {
    None,
    Averaged,
    PerHead,
}

/// One fixture: its case.txt and the files the CLI reads.
struct Case {
    name: String,
    dir: PathBuf,
    heads: usize,
    e: usize,
    kdim: usize,
    vdim: usize,
    bias: bool,
    prefix: String,
    need: Need,
    self_attention: bool,
    b: usize,
    m: usize,
    n: usize,
}

impl Case {
    fn load(name: &str) -> Case {
        let dir = fixture_dir().join(name);
        let text = std::fs::read_to_string(dir.join("case.txt"))
            .unwrap_or_else(|e| panic!("{name}/case.txt: {e}"));
        let kv: BTreeMap<&str, &str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.split_once('=').expect("key = value");
                (k.trim(), v.trim())
            })
            .collect();
        let get = |k: &str| *kv.get(k).unwrap_or_else(|| panic!("{name}: no {k}"));
        let int = |k: &str| get(k).parse::<usize>().unwrap();
        let need = match get("need_weights") {
            "none" => Need::None,
            "averaged" => Need::Averaged,
            "per_head" => Need::PerHead,
            v => panic!("{name}: need_weights = {v}"),
        };
        let (_, qs) = read_npy::<f32>(&dir.join("query.npy"));
        let (_, ks) = read_npy::<f32>(&dir.join("key.npy"));
        Case {
            name: name.to_string(),
            heads: int("heads"),
            e: int("embed_dim"),
            kdim: int("kdim"),
            vdim: int("vdim"),
            bias: get("bias") == "true",
            prefix: kv.get("prefix").unwrap_or(&"").to_string(),
            need,
            self_attention: get("self_attention") == "true",
            b: qs[0],
            m: qs[1],
            n: ks[1],
            dir,
        }
    }

    fn file(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    fn has_kpm(&self) -> bool {
        self.file("key_padding_mask.npy").exists()
    }

    fn weight_dims(&self) -> Vec<usize> {
        match self.need {
            Need::PerHead => vec![self.b, self.heads, self.m, self.n],
            _ => vec![self.b, self.m, self.n],
        }
    }

    /// `xattn mha` with this case's weights, heads, prefix, bias and weights options, on
    /// `query`, `key`, `value` (and `kpm`), writing `out.npy` (and `w.npy`) under `dir`.
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
        if !self.bias {
            a.push("--no-bias".into());
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
            self.has_kpm().then_some(&*kpm),
        )
    }
}

/// The layer's parameters in f64, nn.Linear layout [out, in]; zero biases where the file has
/// none. Read under the names the file uses (packed or separate PyTorch, Hugging Face).
struct Params {
    wq: Vec<f64>,
    wk: Vec<f64>,
    wv: Vec<f64>,
    bq: Vec<f64>,
    bk: Vec<f64>,
    bv: Vec<f64>,
    wo: Vec<f64>,
    bo: Vec<f64>,
}

impl Params {
    fn load(c: &Case) -> Params {
        let t = read_safetensors(&c.file("weights.safetensors"));
        let e = c.e;
        let get = |name: &str| t.get(&format!("{}{name}", c.prefix)).cloned();
        let need = |name: &str| get(name).unwrap_or_else(|| panic!("{}: no {name}", c.name));
        let zeros = |len| vec![0.0; len];
        let (wq, wk, wv, b) = if let Some(w) = get("in_proj_weight") {
            let (q, kv) = w.split_at(e * e);
            let (k, v) = kv.split_at(e * e);
            (q.to_vec(), k.to_vec(), v.to_vec(), get("in_proj_bias"))
        } else if let Some(wq) = get("q_proj_weight") {
            let (wk, wv) = (need("k_proj_weight"), need("v_proj_weight"));
            (wq, wk, wv, get("in_proj_bias"))
        } else {
            let (wq, wk, wv) = (
                need("q_proj.weight"),
                need("k_proj.weight"),
                need("v_proj.weight"),
            );
            let bias = |name: &str| get(name).unwrap_or_else(|| zeros(e));
            let b = [
                bias("q_proj.bias"),
                bias("k_proj.bias"),
                bias("v_proj.bias"),
            ]
            .concat();
            (wq, wk, wv, Some(b))
        };
        let b = b.unwrap_or_else(|| zeros(3 * e));
        Params {
            wq,
            wk,
            wv,
            bq: b[..e].to_vec(),
            bk: b[e..2 * e].to_vec(),
            bv: b[2 * e..].to_vec(),
            wo: need("out_proj.weight"),
            bo: get("out_proj.bias").unwrap_or_else(|| zeros(e)),
        }
    }
}

/// `x·Wᵀ + b` for rows of `din` features, in f64, and its absolute-value twin `|x|·|W|ᵀ + |b|`.
fn project(x: &[f32], din: usize, w: &[f64], b: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let dout = b.len();
    let rows = x.len() / din;
    let (mut val, mut abs) = (vec![0.0; rows * dout], vec![0.0; rows * dout]);
    for r in 0..rows {
        let xr = &x[r * din..(r + 1) * din];
        for o in 0..dout {
            let wr = &w[o * din..(o + 1) * din];
            let (mut s, mut a) = (b[o], b[o].abs());
            for (&xi, &wi) in xr.iter().zip(wr) {
                s += f64::from(xi) * wi;
                a += (f64::from(xi) * wi).abs();
            }
            val[r * dout + o] = s;
            abs[r * dout + o] = a;
        }
    }
    (val, abs)
}

/// Per-element bounds on how far the CLI's outputs may be from PyTorch's files:
/// `out` [B, M, E] and `weights` in the case's layout ([B, M, N] averaged, [B, H, M, N] per
/// head; empty without weights).
struct Bounds {
    out: Vec<f64>,
    weights: Vec<f64>,
}

/// The forward-error bound of an f32 implementation derived step by step in
/// `tests/mha_fixtures.rs` (`reference`; first order in ε, γ_n = n·ε per n-term sum, Higham
/// §3.1), evaluated here from an f64 forward pass on the fixture's weights and inputs:
///
/// 1. projections: |δq| ≤ (E+1)·ε·q̄, |δk| ≤ (kdim+1)·ε·k̄, |δv| ≤ (vdim+1)·ε·v̄, where
///    x̄ = |x|·|W|ᵀ + |b|;
/// 2. logits: |δs_ij| ≤ ε·scale·Σ_d [(E+1)·q̄_d·|k_d| + (kdim+1)·|q_d|·k̄_d + (d_h+1)·|q_d·k_d|],
///    Δ_i its largest value over the kept keys of row i, A_i the largest |s_ij|;
/// 3. softmax: |δp_j| ≤ p_j·ρ_i + f32::MIN_POSITIVE, ρ_i = 2Δ_i + ε·(10·A_i + N + 7); the mean
///    over heads adds ε·(H+1)·p;
/// 4. head outputs: |δo_f| ≤ (ρ_i + N·ε)·Σ_j p_j·|v_jf| + (vdim+1)·ε·Σ_j p_j·v̄_jf;
/// 5. output projection: |δout_e| ≤ Σ_f |Wo_ef|·|δo_f| + (E+1)·ε·(Σ_f |Wo_ef·o_f| + |bo_e|).
///
/// PyTorch's f32 result obeys the same bound, so the two may differ by twice it; [`check`] adds
/// ε·|reference| for the rounding of the stored file.
fn bounds(c: &Case) -> Bounds {
    let w = Params::load(c);
    let read = |f: &str| read_npy::<f32>(&c.file(f)).0;
    let (query, key, value) = (read("query.npy"), read("key.npy"), read("value.npy"));
    let kpm = c
        .has_kpm()
        .then(|| read_npy::<bool>(&c.file("key_padding_mask.npy")).0);
    let (b, m, n, e, h) = (c.b, c.m, c.n, c.e, c.heads);
    let dh = e / h;
    let scale = 1.0 / (dh as f64).sqrt();
    let (q, qa) = project(&query, e, &w.wq, &w.bq);
    let (k, ka) = project(&key, c.kdim, &w.wk, &w.bk);
    let (v, va) = project(&value, c.vdim, &w.wv, &w.bv);
    let mut p_tol = vec![0.0; b * h * m * n];
    let mut p_all = vec![0.0; b * h * m * n];
    let mut o = vec![0.0; b * m * e];
    let mut o_tol = vec![0.0; b * m * e];
    let nf = n as f64;
    let (ce, ck, cd) = ((e + 1) as f64, (c.kdim + 1) as f64, (dh + 1) as f64);
    for bi in 0..b {
        let kept = |j: usize| kpm.as_ref().is_none_or(|mask| !mask[bi * n + j]);
        for hi in 0..h {
            for i in 0..m {
                let qrow = (bi * m + i) * e + hi * dh;
                let mut s = vec![f64::NEG_INFINITY; n];
                let (mut big_a, mut delta) = (0.0f64, 0.0f64);
                for j in (0..n).filter(|&j| kept(j)) {
                    let krow = (bi * n + j) * e + hi * dh;
                    let (mut dot, mut err) = (0.0, 0.0);
                    for d in 0..dh {
                        let (qd, kd) = (q[qrow + d], k[krow + d]);
                        dot += qd * kd;
                        err += ce * qa[qrow + d] * kd.abs()
                            + ck * qd.abs() * ka[krow + d]
                            + cd * (qd * kd).abs();
                    }
                    s[j] = scale * dot;
                    big_a = big_a.max(s[j].abs());
                    delta = delta.max(EPS * scale * err);
                }
                let rho = 2.0 * delta + EPS * (10.0 * big_a + nf + 7.0);
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                assert!(mx.is_finite(), "{}: a fully masked row", c.name);
                let ex: Vec<f64> = s.iter().map(|&x| (x - mx).exp()).collect();
                let sum: f64 = ex.iter().sum();
                let prow = ((bi * h + hi) * m + i) * n;
                let p = &mut p_all[prow..prow + n];
                for j in 0..n {
                    p[j] = ex[j] / sum;
                    p_tol[prow + j] = p[j] * rho + f64::from(f32::MIN_POSITIVE);
                }
                for f in 0..dh {
                    let (mut acc, mut mag, mut bar) = (0.0, 0.0, 0.0);
                    for (j, &pj) in p.iter().enumerate() {
                        let vi = (bi * n + j) * e + hi * dh + f;
                        acc += pj * v[vi];
                        mag += pj * v[vi].abs();
                        bar += pj * va[vi];
                    }
                    let oi = (bi * m + i) * e + hi * dh + f;
                    o[oi] = acc;
                    o_tol[oi] = (rho + EPS * nf) * mag + EPS * (c.vdim + 1) as f64 * bar;
                }
            }
        }
    }
    let mut out = vec![0.0; b * m * e];
    for r in 0..b * m {
        for oe in 0..e {
            let wr = &w.wo[oe * e..(oe + 1) * e];
            let (mut prop, mut mag) = (0.0, w.bo[oe].abs());
            for f in 0..e {
                prop += wr[f].abs() * o_tol[r * e + f];
                mag += (wr[f] * o[r * e + f]).abs();
            }
            out[r * e + oe] = 2.0 * (prop + EPS * ce * mag);
        }
    }
    let weights = match c.need {
        Need::None => Vec::new(),
        Need::PerHead => p_tol.iter().map(|t| 2.0 * t).collect(),
        Need::Averaged => {
            let mn = m * n;
            let mut avg = vec![0.0; b * mn];
            for bi in 0..b {
                for x in 0..mn {
                    let (mut s, mut t) = (0.0, 0.0);
                    for hi in 0..h {
                        s += p_all[(bi * h + hi) * mn + x];
                        t += p_tol[(bi * h + hi) * mn + x];
                    }
                    let hf = h as f64;
                    avg[bi * mn + x] = 2.0 * (t / hf + EPS * (hf + 1.0) * s / hf);
                }
            }
            avg
        }
    };
    Bounds { out, weights }
}

/// |got − want| ≤ tol + ε·|want| elementwise (NaN fails); returns the largest error and the
/// largest tolerance.
fn check(what: &str, got: &[f32], want: &[f32], tol: &[f64]) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "{what}: element count");
    assert_eq!(tol.len(), want.len(), "{what}: bounds");
    let (mut worst, mut widest) = (0.0f64, 0.0f64);
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        let err = (f64::from(g) - f64::from(w)).abs();
        let t = t + EPS * f64::from(w).abs();
        assert!(
            err <= t,
            "{what}: element {i} is {g:e}, PyTorch {w:e} (error {err:e} > bound {t:e})"
        );
        worst = worst.max(err);
        widest = widest.max(t);
    }
    (worst, widest)
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
    let (out_err, out_tol) = check(&format!("{name} out"), &o, want_o, tol);
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
            (w_err, w_tol) = check(&format!("{name} weights"), &w, want_w, tol);
        }
    }
    eprintln!(
        "{name:20} out max err {out_err:.2e} (bound ≤ {out_tol:.2e}); weights max err \
         {w_err:.2e} (bound ≤ {w_tol:.2e})"
    );
    (out_err, w_err, err)
}

const CASES: [&str; 12] = [
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
];

/// Every fixture through the binary: packed and separate PyTorch names, prefixes, kdim ≠ vdim,
/// no bias, key padding, averaged and per-head weights, Hugging Face names, M = 1.
#[test]
fn mha_matches_pytorch_on_every_fixture() {
    let Some(_) = engine() else { return };
    let (mut worst_out, mut worst_w) = (0.0f64, 0.0f64);
    for name in CASES {
        let c = Case::load(name);
        let dir = TempDir::new(name);
        let bounds = bounds(&c);
        let (want_out, _) = read_npy::<f32>(&c.file("out.npy"));
        let want_w = (c.need != Need::None).then(|| read_npy::<f32>(&c.file("weights.npy")).0);
        let wd = c.weight_dims();
        let want = Expected {
            out: (&want_out, &[c.b, c.m, c.e], &bounds.out),
            weights: want_w.as_deref().map(|w| (w, &wd[..], &bounds.weights[..])),
        };
        let (o, w, err) = run_and_compare(name, &dir, &c.fixture_args(&dir), want);
        assert!(err.contains("xattn: mha B"), "{name}: summary line: {err}");
        if c.has_kpm() {
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
        let bounds = bounds(&c);
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
        if c.has_kpm() {
            let (mask, shape) = read_npy::<bool>(&c.file("key_padding_mask.npy"));
            let (mask, shape) = entry(&mask, &shape, bi);
            write_npy(&kpm, &mask, &shape);
        }
        let files = ["query.npy", "key.npy", "value.npy"].map(|f| dir.path(f));
        let args = c.args(
            &dir,
            [&files[0], &files[1], &files[2]].map(PathBuf::as_path),
            c.has_kpm().then_some(&*kpm),
        );
        let (out, out_dims) = slice("out.npy");
        let (w, w_dims) = slice("weights.npy");
        let (out_tol, _) = entry(&bounds.out, &[c.b, c.m, c.e], bi);
        let (w_tol, _) = entry(&bounds.weights, &c.weight_dims(), bi);
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

/// `args` with the value after `flag` replaced by `value` (the flag added if absent).
fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.to_string(),
        None => args.extend([flag.to_string(), value.to_string()]),
    }
    args
}

#[test]
fn a_wrong_prefix_names_the_tensors_looked_for() {
    let c = Case::load("packed_bias");
    let dir = TempDir::new("prefix");
    let err = fails(&dir, &with(c.fixture_args(&dir), "--prefix", "nope."));
    assert_mentions(
        &err,
        &["--weights", "weights.safetensors", "nope.in_proj_weight"],
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
fn heads_not_dividing_e_is_rejected() {
    let c = Case::load("packed_bias");
    let dir = TempDir::new("heads");
    let err = fails(&dir, &with(c.fixture_args(&dir), "--heads", "5"));
    assert_mentions(&err, &["--heads 5", "E = 32", "query.npy"]);
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
fn bias_setting_and_file_must_agree() {
    let dir = TempDir::new("bias");
    let c = Case::load("no_bias");
    let args: Vec<String> = c
        .fixture_args(&dir)
        .into_iter()
        .filter(|a| a != "--no-bias")
        .collect();
    let err = fails(&dir, &args);
    assert_mentions(&err, &["in_proj_bias", "add --no-bias"]);
    let c = Case::load("packed_bias");
    let mut args = c.fixture_args(&dir);
    args.push("--no-bias".into());
    let err = fails(&dir, &args);
    assert_mentions(&err, &["in_proj_bias", "drop --no-bias"]);
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

/// The masks and logit controls of `run` reach the attention inside the layer: the binary with
/// --causal, --softcap and a key padding mask gives what the library gives in this process for
/// the same options (same kernels, same device), and something else than without them.
#[test]
fn run_masks_reach_the_layer() {
    use xattn::{Alignment, Attention, MhaConfig, MhaOptions, MultiHeadAttention};
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

    let layer = MultiHeadAttention::from_safetensors(
        engine,
        MhaConfig::new(c.e, c.heads),
        &c.file("weights.safetensors"),
        &c.prefix,
    )
    .expect("load the layer");
    let read = |f: &str| read_npy::<f32>(&c.file(f)).0;
    let q = engine.upload(&read("query.npy"), &[c.b, c.m, c.e]).unwrap();
    let k = engine
        .upload(&read("key.npy"), &[c.b, c.n, c.kdim])
        .unwrap();
    let v = engine
        .upload(&read("value.npy"), &[c.b, c.n, c.vdim])
        .unwrap();
    let (kpm, _) = read_npy::<bool>(&c.file("key_padding_mask.npy"));
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
    let (plain, _) = read_npy::<f32>(&c.file("out.npy"));
    let moved = got
        .iter()
        .zip(&plain)
        .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        moved > 1e-2,
        "the masks changed nothing (max change {moved:e})"
    );
}
