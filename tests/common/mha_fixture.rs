//! The fixtures under `tests/fixtures/mha/` — PyTorch `nn.MultiheadAttention` and the
//! attention layers of Whisper, BART, T5 and diffusers models (written by
//! `tests/fixtures/generate_mha.py`; see its docstring for the file layout) — and an f64 forward
//! pass of the layer with a per-element error bound for an f32 implementation, shared by
//! `tests/mha_fixtures.rs` (the library) and `tests/cli_mha.rs` (the binary).
//!
//! The forward pass is written here from the saved tensors, parsed by hand: it shares neither
//! `xattn::cpu::reference` nor the crate's safetensors loader with the code under test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use xattn::mha::MhaConfig;

use super::files::read_npy;

pub const EPS: f64 = f32::EPSILON as f64;

pub fn fixture_dir() -> PathBuf {
    crate::common::repo_dir().join("tests/fixtures/mha")
}

/// The gradient fixtures (`tests/fixtures/generate_grad.py`); the cases of kind `layer` load
/// as [`Case`]s with [`Case::load_from`].
pub fn grad_fixture_dir() -> PathBuf {
    crate::common::repo_dir().join("tests/fixtures/grad")
}

/// A safetensors file, F32 tensors only: name → (shape, values). Parsed by hand (8-byte
/// little-endian header length, JSON header, raw little-endian data) so that the test does not
/// share a parser with the code under test.
fn read_safetensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
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
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let offs = info["data_offsets"].as_array().unwrap();
        let (a, b) = (
            offs[0].as_u64().unwrap() as usize,
            offs[1].as_u64().unwrap() as usize,
        );
        let values: Vec<f32> = data[a..b]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
        out.insert(name.clone(), (shape, values));
    }
    out
}

/// The tensor names of a fixture (case.txt `naming`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Naming {
    /// `nn.MultiheadAttention`'s state dict.
    Torch,
    /// One `Linear` per projection, with these module names for Q, K, V, O.
    Modules([&'static str; 4]),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Need {
    None,
    Averaged,
    PerHead,
}

/// One fixture: its case.txt, inputs and PyTorch's outputs.
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub heads: usize,
    pub e: usize,
    pub kdim: usize,
    pub vdim: usize,
    /// heads · head dim (case.txt `inner_dim`, E unless given).
    pub inner: usize,
    /// The logit scale the model uses, when not 1/√head_dim (T5: 1).
    pub scale: Option<f64>,
    pub bias: bool,
    pub prefix: String,
    pub naming: Naming,
    pub need: Need,
    pub self_attention: bool,
    /// Gradient fixtures: key and value are one source (a Hugging Face module's
    /// `key_value_states`), so `key == value`.
    pub shared_source: bool,
    pub b: usize,
    pub m: usize,
    pub n: usize,
    pub query: Vec<f32>,
    pub key: Vec<f32>,
    pub value: Vec<f32>,
    /// PyTorch polarity: true = ignore that key. [B, N]
    pub key_padding_mask: Option<Vec<bool>>,
    pub out: Vec<f32>,
    pub weights: Option<Vec<f32>>,
}

impl Case {
    /// The case in `tests/fixtures/mha/<name>/`.
    pub fn load(name: &str) -> Case {
        Case::load_from(&fixture_dir(), name)
    }

    /// The case in `<fixtures>/<name>/`: the forward fixtures of `tests/fixtures/mha` or a
    /// `kind = layer` case of `tests/fixtures/grad`, whose case.txt has no `need_weights`
    /// (none returned), no `self_attention` (false) and a `shared_source` flag, and whose
    /// out.npy is float64 (rounded to f32 here, as the forward fixtures store it).
    pub fn load_from(fixtures: &Path, name: &str) -> Case {
        let dir = fixtures.join(name);
        let text = std::fs::read_to_string(dir.join("case.txt"))
            .unwrap_or_else(|e| panic!("{name}/case.txt: {e}"));
        let mut kv = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{name}: bad line {line:?}"));
            kv.insert(k.trim().to_string(), v.trim().to_string());
        }
        // The gradient fixtures (kind = layer) leave out what they never vary; only they have
        // a shared source.
        let grad_kind = kv.get("kind").map(String::as_str) == Some("layer");
        let get = |k: &str| {
            let default = match k {
                "need_weights" if grad_kind => Some("none"),
                "self_attention" if grad_kind => Some("false"),
                "shared_source" => Some("false"),
                _ => None,
            };
            kv.get(k)
                .map(String::as_str)
                .or(default)
                .unwrap_or_else(|| panic!("{name}: case.txt lacks {k}"))
                .to_string()
        };
        let int = |k: &str| get(k).parse::<usize>().unwrap();
        let flag = |k: &str| match get(k).as_str() {
            "true" => true,
            "false" => false,
            v => panic!("{name}: {k} = {v}"),
        };
        let (heads, e, kdim, vdim) = (int("heads"), int("embed_dim"), int("kdim"), int("vdim"));
        let need = match get("need_weights").as_str() {
            "none" => Need::None,
            "averaged" => Need::Averaged,
            "per_head" => Need::PerHead,
            v => panic!("{name}: need_weights = {v}"),
        };
        let naming = match get("naming").as_str() {
            "torch" => Naming::Torch,
            "hf" => Naming::Modules(["q_proj", "k_proj", "v_proj", "out_proj"]),
            "diffusers" => Naming::Modules(["to_q", "to_k", "to_v", "to_out.0"]),
            "t5" => Naming::Modules(["q", "k", "v", "o"]),
            v => panic!("{name}: naming = {v}"),
        };
        let inner = kv.get("inner_dim").map_or(e, |v| v.parse().unwrap());
        let scale = kv.get("scale").map(|v| v.parse::<f64>().unwrap());
        let (query, qs) = read_npy::<f32>(&dir.join("query.npy"));
        let (key, ks) = read_npy::<f32>(&dir.join("key.npy"));
        let (value, vs) = read_npy::<f32>(&dir.join("value.npy"));
        let (b, m, n) = (qs[0], qs[1], ks[1]);
        assert_eq!(qs, [b, m, e], "{name}: query");
        assert_eq!(ks, [b, n, kdim], "{name}: key");
        assert_eq!(vs, [b, n, vdim], "{name}: value");
        let mask_path = dir.join("key_padding_mask.npy");
        let key_padding_mask = mask_path.exists().then(|| {
            let (mask, shape) = read_npy::<bool>(&mask_path);
            assert_eq!(shape, [b, n], "{name}: key_padding_mask");
            mask
        });
        let (out, os) = read_floats(&dir.join("out.npy"));
        assert_eq!(os, [b, m, e], "{name}: out");
        let weights_path = dir.join("weights.npy");
        let weights = (need != Need::None).then(|| {
            let (w, shape) = read_npy::<f32>(&weights_path);
            let want: &[usize] = match need {
                Need::Averaged => &[b, m, n],
                _ => &[b, heads, m, n],
            };
            assert_eq!(shape, want, "{name}: weights");
            w
        });
        assert_eq!(weights.is_none(), !weights_path.exists(), "{name}");
        let (bias, self_attention) = (flag("bias"), flag("self_attention"));
        let shared_source = flag("shared_source");
        if shared_source {
            assert!(key == value, "{name}: a shared source with key ≠ value");
        }
        let prefix = kv.get("prefix").cloned().unwrap_or_default();
        Case {
            name: name.to_string(),
            dir,
            heads,
            e,
            kdim,
            vdim,
            inner,
            scale,
            bias,
            prefix,
            naming,
            need,
            self_attention,
            shared_source,
            b,
            m,
            n,
            query,
            key,
            value,
            key_padding_mask,
            out,
            weights,
        }
    }

    pub fn config(&self) -> MhaConfig {
        MhaConfig::new(self.e, self.heads)
            .with_inner_dim(self.inner)
            .with_kdim(self.kdim)
            .with_vdim(self.vdim)
            .with_bias(self.bias)
    }

    /// A file of the case's directory.
    pub fn file(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// The dimensions of `weights`: [B, M, N] averaged, [B, H, M, N] per head.
    pub fn weight_dims(&self) -> Vec<usize> {
        match self.need {
            Need::PerHead => vec![self.b, self.heads, self.m, self.n],
            _ => vec![self.b, self.m, self.n],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// f64 reference with per-element error bounds

/// Tensors by name (the case's prefix left out): shape and values in f64.
pub type Tensors = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// An f32 or float64 .npy file as f32 (float64 rounded to nearest) and its shape.
fn read_floats(path: &Path) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if matches!(npy.dtype(), npyz::DType::Plain(t) if t.size_field() == 8) {
        let (x, shape) = read_npy::<f64>(path);
        (x.iter().map(|&v| v as f32).collect(), shape)
    } else {
        read_npy::<f32>(path)
    }
}

/// The tensors of the case's safetensors file in f64, with the prefix left out.
fn file_tensors(c: &Case) -> Tensors {
    read_safetensors(&c.file("weights.safetensors"))
        .into_iter()
        .map(|(name, (shape, v))| {
            let short = name
                .strip_prefix(&c.prefix)
                .unwrap_or_else(|| panic!("{}: {name} lacks the prefix {:?}", c.name, c.prefix));
            let v = v.iter().map(|&x| f64::from(x)).collect();
            (short.to_string(), (shape, v))
        })
        .collect()
}

/// W^Q, W^K, W^V, W^O (`[out, in]`) and their biases (`None` where `t` has none) from tensors
/// named under the naming family case.txt states (not detected: the layer's own detection is
/// what is under test): PyTorch's packed `in_proj_weight` and `in_proj_bias` are cut in three.
/// `t` holds the layer's weights or, under the same names, their gradients; every tensor of
/// `t` must be used.
pub fn projections(c: &Case, t: &Tensors) -> ([Vec<f64>; 4], [Option<Vec<f64>>; 4]) {
    let (e, inner) = (c.e, c.inner);
    let mut used = 0;
    let mut get = |name: &str, shape: &[usize]| -> Option<Vec<f64>> {
        let (s, v) = t.get(name)?;
        assert_eq!(s, shape, "{}: {name}", c.name);
        used += 1;
        Some(v.clone())
    };
    let shapes = [[inner, e], [inner, c.kdim], [inner, c.vdim], [e, inner]];
    let missing = |name: &str| -> Vec<f64> { panic!("{}: no tensor {name}", c.name) };
    let (w, b) = match c.naming {
        Naming::Modules(modules) => {
            let w = std::array::from_fn(|i| {
                let name = format!("{}.weight", modules[i]);
                get(&name, &shapes[i]).unwrap_or_else(|| missing(&name))
            });
            let b = std::array::from_fn(|i| get(&format!("{}.bias", modules[i]), &[shapes[i][0]]));
            (w, b)
        }
        Naming::Torch => {
            let [wq, wk, wv] = if c.kdim == e && c.vdim == e {
                let w =
                    get("in_proj_weight", &[3 * e, e]).unwrap_or_else(|| missing("in_proj_weight"));
                [0, 1, 2].map(|i| w[i * e * e..(i + 1) * e * e].to_vec())
            } else {
                let names = ["q_proj_weight", "k_proj_weight", "v_proj_weight"];
                std::array::from_fn(|i| {
                    get(names[i], &shapes[i]).unwrap_or_else(|| missing(names[i]))
                })
            };
            let wo = get("out_proj.weight", &[e, e]).unwrap_or_else(|| missing("out_proj.weight"));
            // nn.MultiheadAttention has all four biases or none.
            let mut bias = |name: &str, len: usize| {
                let b = get(name, &[len]);
                assert_eq!(
                    b.is_some(),
                    c.bias,
                    "{}: {name} with bias = {}",
                    c.name,
                    c.bias
                );
                b
            };
            let [bq, bk, bv] = match bias("in_proj_bias", 3 * e) {
                Some(b) => [0, 1, 2].map(|i| Some(b[i * e..(i + 1) * e].to_vec())),
                None => [None, None, None],
            };
            ([wq, wk, wv, wo], [bq, bk, bv, bias("out_proj.bias", e)])
        }
    };
    assert_eq!(
        used,
        t.len(),
        "{}: unexpected tensors {:?}",
        c.name,
        t.keys().collect::<Vec<_>>()
    );
    (w, b)
}

/// The layer's parameters in f64, nn.Linear layout [out, in]; zero biases without bias.
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
    /// The case's safetensors file ([`projections`]); without a bias file (`bias = false`)
    /// no bias may be there.
    fn load(c: &Case) -> Params {
        let (w, b) = projections(c, &file_tensors(c));
        if !c.bias {
            assert!(
                b.iter().all(Option::is_none),
                "{}: biases with bias = false",
                c.name
            );
        }
        let [wq, wk, wv, wo] = w;
        let [bq, bk, bv, bo] = std::array::from_fn(|i| {
            b[i].clone()
                .unwrap_or_else(|| vec![0.0; [c.inner, c.inner, c.inner, c.e][i]])
        });
        Params {
            wq,
            wk,
            wv,
            bq,
            bk,
            bv,
            wo,
            bo,
        }
    }
}

/// The layer's weights as the case's file holds them (f32), parsed by the tests' own reader.
pub fn fixture_weights(c: &Case) -> xattn::mha::MhaWeights {
    let (w, b) = projections(c, &file_tensors(c));
    let f32s = |x: &Vec<f64>| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let [q, k, v, o] = w.each_ref().map(f32s);
    let [q_bias, k_bias, v_bias, o_bias] = b.each_ref().map(|x| x.as_ref().map(f32s));
    xattn::mha::MhaWeights {
        q,
        k,
        v,
        o,
        q_bias,
        k_bias,
        v_bias,
        o_bias,
    }
}

/// `x·Wᵀ + b` for `rows` rows of `din` features, in f64, and its absolute-value twin
/// `|x|·|W|ᵀ + |b|` (the magnitude that bounds the rounding error of any f32 evaluation).
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

/// The layer in f64, with an error bound for an f32 implementation on every output element.
pub struct Reference {
    /// [B, M, E]
    pub out: Vec<f64>,
    pub out_tol: Vec<f64>,
    /// [B, H, M, N] (0 on masked keys)
    pub p: Vec<f64>,
    pub p_tol: Vec<f64>,
    /// largest |logit| over the case, for the report
    pub max_logit: f64,
}

/// Forward error bound of an f32 implementation, per element, first order in ε = 2⁻²³.
///
/// Tool: an n-term f32 dot product or sum is off by at most γ_n·Σ|terms|, γ_n = n·ε, in any
/// summation order, with or without FMA (Higham, Accuracy and Stability of Numerical
/// Algorithms, §3.1). x̄ = |x|·|W|ᵀ + |b| is a projection's absolute-value twin (see
/// [`project`]); q, k, v, s, p, o below are the exact (f64) values.
///
/// 1. projections: |δq| ≤ (E+1)·ε·q̄, |δk| ≤ (kdim+1)·ε·k̄, |δv| ≤ (vdim+1)·ε·v̄ (E, kdim,
///    vdim products plus the bias).
/// 2. logits s_ij = scale·Σ_d q_d·k_d over the head's d_h features:
///    |δs_ij| ≤ ε·scale·Σ_d [(E+1)·q̄_d·|k_d| + (kdim+1)·|q_d|·k̄_d + (d_h+1)·|q_d·k_d|]
///    (the projection errors carried through the product, the d_h-term dot product, the
///    multiplication by the scale); Δ_i = the largest over the kept keys j of row i.
/// 3. softmax, A_i = max_j |s_ij| over the kept keys: perturbing every logit by ≤ Δ_i changes
///    each p_j by a factor within e^{±2Δ_i}; the f32 evaluation adds, relative to p_j:
///    ε·2A_i for s_j − max (|s_j − max| ≤ 2A_i), (3 + 4A_i)·ε for exp (WGSL's exp is accurate
///    to 3 + 2|x| ULP), as much again for an online-softmax rescale exp(m_old − m_new), N·ε for
///    the denominator and ε for the division. So |δp_j| ≤ p_j·ρ_i with
///    ρ_i = 2Δ_i + ε·(10·A_i + N + 7), plus an absolute f32::MIN_POSITIVE for underflow.
/// 4. head output o_f = Σ_j p_j·v_jf:
///    |δo_f| ≤ (ρ_i + N·ε)·Σ_j p_j·|v_jf| + (vdim+1)·ε·Σ_j p_j·v̄_jf
///    (weight errors, the N-term sum, the V projection error).
/// 5. output projection out_e = Σ_f Wo_ef·o_f + bo_e over the I = heads · d_h inner features:
///    |δout_e| ≤ Σ_f |Wo_ef|·|δo_f| + (I+1)·ε·(Σ_f |Wo_ef|·|o_f| + |bo_e|).
///
/// The bound is worst case (n·ε per sum where √n·ε is typical, and the |terms| sums rather than
/// the results), derived, not fitted, so it sits orders of magnitude above the errors a correct
/// layer shows; the test reports both. A wrong head split, weight layout or order, mask
/// polarity, scale or a missing bias gives errors of the order of the values themselves.
/// Comparisons with the f32-rounded PyTorch files add ε·|reference| for that rounding.
pub fn reference(c: &Case) -> Reference {
    let w = &Params::load(c);
    let (b, m, n, e, h, inner) = (c.b, c.m, c.n, c.e, c.heads, c.inner);
    let dh = inner / h;
    let scale = c.scale.unwrap_or(1.0 / (dh as f64).sqrt());
    let (q, qa) = project(&c.query, e, &w.wq, &w.bq);
    let (k, ka) = project(&c.key, c.kdim, &w.wk, &w.bk);
    let (v, va) = project(&c.value, c.vdim, &w.wv, &w.bv);
    let mut p = vec![0.0; b * h * m * n];
    let mut p_tol = vec![0.0; b * h * m * n];
    let mut o = vec![0.0; b * m * inner];
    let mut o_tol = vec![0.0; b * m * inner];
    let mut max_logit = 0.0f64;
    let nf = n as f64;
    let (ce, ck, cd) = ((e + 1) as f64, (c.kdim + 1) as f64, (dh + 1) as f64);
    for bi in 0..b {
        let kept = |j: usize| {
            c.key_padding_mask
                .as_ref()
                .is_none_or(|mask| !mask[bi * n + j])
        };
        for hi in 0..h {
            for i in 0..m {
                let qrow = (bi * m + i) * inner + hi * dh;
                let mut s = vec![f64::NEG_INFINITY; n];
                let (mut big_a, mut delta) = (0.0f64, 0.0f64);
                for j in (0..n).filter(|&j| kept(j)) {
                    let krow = (bi * n + j) * inner + hi * dh;
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
                max_logit = max_logit.max(big_a);
                let rho = 2.0 * delta + EPS * (10.0 * big_a + nf + 7.0);
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                assert!(mx.is_finite(), "{}: a fully masked row", c.name);
                let ex: Vec<f64> = s.iter().map(|&x| (x - mx).exp()).collect();
                let sum: f64 = ex.iter().sum();
                let prow = ((bi * h + hi) * m + i) * n;
                for j in 0..n {
                    p[prow + j] = ex[j] / sum;
                    p_tol[prow + j] = p[prow + j] * rho + f64::from(f32::MIN_POSITIVE);
                }
                for f in 0..dh {
                    let (mut acc, mut mag, mut bar) = (0.0, 0.0, 0.0);
                    for j in 0..n {
                        let (pj, vi) = (p[prow + j], (bi * n + j) * inner + hi * dh + f);
                        acc += pj * v[vi];
                        mag += pj * v[vi].abs();
                        bar += pj * va[vi];
                    }
                    let oi = (bi * m + i) * inner + hi * dh + f;
                    o[oi] = acc;
                    o_tol[oi] = (rho + EPS * nf) * mag + EPS * (c.vdim + 1) as f64 * bar;
                }
            }
        }
    }
    let mut out = vec![0.0; b * m * e];
    let mut out_tol = vec![0.0; b * m * e];
    let ci = (inner + 1) as f64;
    for r in 0..b * m {
        let orow = &o[r * inner..(r + 1) * inner];
        let tol_row = &o_tol[r * inner..(r + 1) * inner];
        for oe in 0..e {
            let wr = &w.wo[oe * inner..(oe + 1) * inner];
            let (mut acc, mut prop, mut mag) = (w.bo[oe], 0.0, w.bo[oe].abs());
            for f in 0..inner {
                acc += wr[f] * orow[f];
                prop += wr[f].abs() * tol_row[f];
                mag += (wr[f] * orow[f]).abs();
            }
            out[r * e + oe] = acc;
            out_tol[r * e + oe] = prop + EPS * ci * mag;
        }
    }
    Reference {
        out,
        out_tol,
        p,
        p_tol,
        max_logit,
    }
}

/// The weights PyTorch returns for the case's need_weights: per head [B, H, M, N] as is, or the
/// mean over heads [B, M, N]; with their error bounds (the averaging adds H·ε relative).
pub fn expected_weights(c: &Case, r: &Reference) -> (Vec<f64>, Vec<f64>) {
    match c.need {
        Need::None => (Vec::new(), Vec::new()),
        Need::PerHead => (r.p.clone(), r.p_tol.clone()),
        Need::Averaged => {
            let (mn, h) = (c.m * c.n, c.heads);
            let mut w = vec![0.0; c.b * mn];
            let mut tol = vec![0.0; c.b * mn];
            for bi in 0..c.b {
                for x in 0..mn {
                    let (mut s, mut t) = (0.0, 0.0);
                    for hi in 0..h {
                        s += r.p[(bi * h + hi) * mn + x];
                        t += r.p_tol[(bi * h + hi) * mn + x];
                    }
                    w[bi * mn + x] = s / h as f64;
                    tol[bi * mn + x] = t / h as f64 + EPS * (h + 1) as f64 * s / h as f64;
                }
            }
            (w, tol)
        }
    }
}

/// Row-major multi-index of flat index `i` in `dims`.
fn index(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (slot, &d) in idx.iter_mut().zip(dims).rev() {
        *slot = i % d;
        i /= d;
    }
    idx
}

pub struct Stats {
    pub max_err: f64,
    pub max_tol: f64,
    /// largest err / tol
    pub worst_ratio: f64,
}

/// |got − want| ≤ tol + ε·|want| elementwise (the ε·|want| for the f32 rounding of the stored
/// reference). A NaN anywhere fails. The message names the element, got and want.
pub fn compare(
    what: &str,
    got: &[f32],
    want: &[f32],
    tol: &[f64],
    dims: &[usize],
) -> Result<Stats, String> {
    assert_eq!(tol.len(), want.len(), "{what}: bounds");
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} elements, expected {} for {dims:?}",
            got.len(),
            want.len()
        ));
    }
    let mut st = Stats {
        max_err: 0.0,
        max_tol: 0.0,
        worst_ratio: 0.0,
    };
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        let err = (f64::from(g) - f64::from(w)).abs();
        let t = t + EPS * f64::from(w).abs();
        // Written so that a NaN error fails too.
        if err.is_nan() || err > t {
            return Err(format!(
                "{what}: element {:?} of {dims:?} is {g:e}, PyTorch {w:e} (error {err:e} > \
                 tolerance {t:e})",
                index(i, dims)
            ));
        }
        st.max_err = st.max_err.max(err);
        st.max_tol = st.max_tol.max(t);
        st.worst_ratio = st.worst_ratio.max(err / t);
    }
    Ok(st)
}
