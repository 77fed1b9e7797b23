//! The multi-head attention layer (`xattn::mha`) against PyTorch's `nn.MultiheadAttention`.
//!
//! The fixtures under `tests/fixtures/mha/` come from `tests/fixtures/generate_mha.py` (see its
//! docstring for the file layout and how each reference was computed). Every case is checked
//! twice:
//!   * without a GPU, an f64 forward pass written here from the saved weights must reproduce
//!     PyTorch's `out.npy` / `weights.npy` to their f32 rounding — this pins down the fixtures'
//!     meaning (tensor names, weight layout, head split, mask polarity) independently of the
//!     layer, and yields the per-element error bounds used below;
//!   * on the GPU, `MultiHeadAttention::from_safetensors` + `forward` must match PyTorch within
//!     a forward-error bound derived for an f32 implementation (see [`reference`]).
//!
//! Loading errors (wrong prefix, mis-shaped tensors, missing bias) must name the tensor and,
//! for a shape mismatch, the expected and found shapes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use xattn::mha::{MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights};

const EPS: f64 = f32::EPSILON as f64;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mha")
}

// ---------------------------------------------------------------------------------------------
// Fixture files

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

/// Writes F32 tensors (values 0.01·index) as a safetensors file.
fn write_safetensors(path: &Path, tensors: &[(&str, &[usize])]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape) in tensors {
        let start = data.len();
        for i in 0..shape.iter().product::<usize>() {
            data.extend_from_slice(&(0.01 * i as f32).to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Need {
    None,
    Averaged,
    PerHead,
}

struct Case {
    name: String,
    dir: PathBuf,
    heads: usize,
    e: usize,
    kdim: usize,
    vdim: usize,
    bias: bool,
    prefix: String,
    hf: bool,
    need: Need,
    self_attention: bool,
    b: usize,
    m: usize,
    n: usize,
    query: Vec<f32>,
    key: Vec<f32>,
    value: Vec<f32>,
    /// PyTorch polarity: true = ignore that key. [B, N]
    key_padding_mask: Option<Vec<bool>>,
    out: Vec<f32>,
    weights: Option<Vec<f32>>,
}

impl Case {
    fn load(dir: &Path) -> Case {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(dir.join("case.txt")).unwrap();
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
        let get = |k: &str| {
            kv.get(k)
                .unwrap_or_else(|| panic!("{name}: case.txt lacks {k}"))
                .clone()
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
        let hf = match get("naming").as_str() {
            "torch" => false,
            "hf" => true,
            v => panic!("{name}: naming = {v}"),
        };
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
        let (out, os) = read_npy::<f32>(&dir.join("out.npy"));
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
        let prefix = kv.get("prefix").cloned().unwrap_or_default();
        Case {
            name,
            dir: dir.to_path_buf(),
            heads,
            e,
            kdim,
            vdim,
            bias,
            prefix,
            hf,
            need,
            self_attention,
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

    fn config(&self) -> MhaConfig {
        MhaConfig::new(self.e, self.heads)
            .with_kdim(self.kdim)
            .with_vdim(self.vdim)
            .with_bias(self.bias)
    }

    fn weights_file(&self) -> PathBuf {
        self.dir.join("weights.safetensors")
    }
}

fn cases() -> Vec<Case> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("tests/fixtures/mha: run tests/fixtures/generate_mha.py")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.txt").exists())
        .collect();
    dirs.sort();
    let cases: Vec<Case> = dirs.iter().map(|d| Case::load(d)).collect();
    // Guard against an empty or partial fixture directory passing vacuously.
    assert!(cases.len() >= 12, "only {} MHA fixture cases", cases.len());
    let has = |f: &dyn Fn(&Case) -> bool| cases.iter().any(f);
    assert!(has(&|c| !c.hf && c.kdim == c.e && c.vdim == c.e && c.bias));
    assert!(has(&|c| c.kdim != c.e && c.vdim != c.e && c.kdim != c.vdim));
    assert!(has(&|c| !c.bias));
    assert!(has(&|c| c.key_padding_mask.is_some()));
    assert!(has(&|c| c.need == Need::Averaged) && has(&|c| c.need == Need::PerHead));
    assert!(has(&|c| c.self_attention));
    assert!(has(&|c| c.hf && !c.prefix.is_empty()));
    assert!(has(&|c| c.m == 1));
    cases
}

// ---------------------------------------------------------------------------------------------
// f64 reference with per-element error bounds

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
    /// Reads the case's safetensors file under the naming its case.txt states (not detected:
    /// the layer's own detection is what is under test).
    fn load(c: &Case) -> Params {
        let t = read_safetensors(&c.weights_file());
        let e = c.e;
        let get = |name: &str, shape: &[usize]| -> Vec<f64> {
            let full = format!("{}{name}", c.prefix);
            let (s, v) = t
                .get(&full)
                .unwrap_or_else(|| panic!("{}: no tensor {full}", c.name));
            assert_eq!(s, shape, "{}: {full}", c.name);
            v.iter().map(|&x| f64::from(x)).collect()
        };
        let zeros = || vec![0.0; e];
        let bias = |name: &str| if c.bias { get(name, &[e]) } else { zeros() };
        let (wq, wk, wv, bq, bk, bv, count) = if c.hf {
            let (bq, bk, bv) = (
                bias("q_proj.bias"),
                bias("k_proj.bias"),
                bias("v_proj.bias"),
            );
            let (wq, wk, wv) = (
                get("q_proj.weight", &[e, e]),
                get("k_proj.weight", &[e, c.kdim]),
                get("v_proj.weight", &[e, c.vdim]),
            );
            (wq, wk, wv, bq, bk, bv, if c.bias { 8 } else { 4 })
        } else {
            let (wq, wk, wv, count) = if c.kdim == e && c.vdim == e {
                let w = get("in_proj_weight", &[3 * e, e]);
                let (q, kv) = w.split_at(e * e);
                let (k, v) = kv.split_at(e * e);
                (q.to_vec(), k.to_vec(), v.to_vec(), 2)
            } else {
                let w = (
                    get("q_proj_weight", &[e, e]),
                    get("k_proj_weight", &[e, c.kdim]),
                    get("v_proj_weight", &[e, c.vdim]),
                );
                (w.0, w.1, w.2, 4)
            };
            let b = if c.bias {
                get("in_proj_bias", &[3 * e])
            } else {
                vec![0.0; 3 * e]
            };
            let (bq, bk, bv) = (b[..e].to_vec(), b[e..2 * e].to_vec(), b[2 * e..].to_vec());
            (wq, wk, wv, bq, bk, bv, count + if c.bias { 2 } else { 0 })
        };
        let (wo, bo) = (get("out_proj.weight", &[e, e]), bias("out_proj.bias"));
        assert_eq!(
            t.len(),
            count,
            "{}: unexpected tensors {:?}",
            c.name,
            t.keys().collect::<Vec<_>>()
        );
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
struct Reference {
    /// [B, M, E]
    out: Vec<f64>,
    out_tol: Vec<f64>,
    /// [B, H, M, N] (0 on masked keys)
    p: Vec<f64>,
    p_tol: Vec<f64>,
    /// largest |logit| over the case, for the report
    max_logit: f64,
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
/// 5. output projection out_e = Σ_f Wo_ef·o_f + bo_e:
///    |δout_e| ≤ Σ_f |Wo_ef|·|δo_f| + (E+1)·ε·(Σ_f |Wo_ef|·|o_f| + |bo_e|).
///
/// The bound is worst case (n·ε per sum where √n·ε is typical, and the |terms| sums rather than
/// the results), derived, not fitted, so it sits orders of magnitude above the errors a correct
/// layer shows; the test reports both. A wrong head split, weight layout or order, mask
/// polarity, scale or a missing bias gives errors of the order of the values themselves.
/// Comparisons with the f32-rounded PyTorch files add ε·|reference| for that rounding.
fn reference(c: &Case, w: &Params) -> Reference {
    let (b, m, n, e, h) = (c.b, c.m, c.n, c.e, c.heads);
    let dh = e / h;
    let scale = 1.0 / (dh as f64).sqrt();
    let (q, qa) = project(&c.query, e, &w.wq, &w.bq);
    let (k, ka) = project(&c.key, c.kdim, &w.wk, &w.bk);
    let (v, va) = project(&c.value, c.vdim, &w.wv, &w.bv);
    let mut p = vec![0.0; b * h * m * n];
    let mut p_tol = vec![0.0; b * h * m * n];
    let mut o = vec![0.0; b * m * e];
    let mut o_tol = vec![0.0; b * m * e];
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
                        let (pj, vi) = (p[prow + j], (bi * n + j) * e + hi * dh + f);
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
    let mut out_tol = vec![0.0; b * m * e];
    for r in 0..b * m {
        for oe in 0..e {
            let wr = &w.wo[oe * e..(oe + 1) * e];
            let (mut acc, mut prop, mut mag) = (w.bo[oe], 0.0, w.bo[oe].abs());
            for f in 0..e {
                acc += wr[f] * o[r * e + f];
                prop += wr[f].abs() * o_tol[r * e + f];
                mag += (wr[f] * o[r * e + f]).abs();
            }
            out[r * e + oe] = acc;
            out_tol[r * e + oe] = prop + EPS * ce * mag;
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
fn expected_weights(c: &Case, r: &Reference) -> (Vec<f64>, Vec<f64>) {
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

struct Stats {
    max_err: f64,
    max_tol: f64,
    /// largest err / tol
    worst_ratio: f64,
}

/// |got − want| ≤ tol + ε·|want| elementwise (the ε·|want| for the f32 rounding of the stored
/// reference). A NaN anywhere fails. The message names the element, got and want.
fn compare(
    what: &str,
    got: &[f32],
    want: &[f32],
    tol: &[f64],
    dims: &[usize],
) -> Result<Stats, String> {
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

fn weight_dims(c: &Case) -> Vec<usize> {
    match c.need {
        Need::PerHead => vec![c.b, c.heads, c.m, c.n],
        _ => vec![c.b, c.m, c.n],
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

/// No GPU needed: the f64 forward pass written here from the saved tensors reproduces PyTorch's
/// files to their f32 rounding, so the fixtures mean what case.txt says.
#[test]
fn fixtures_agree_with_an_f64_forward_pass() {
    for c in cases() {
        let r = reference(&c, &Params::load(&c));
        // f32 rounding of the stored reference, plus f64 summation-order noise.
        let tiny = |x: &[f64]| x.iter().map(|_| 1e-12).collect::<Vec<f64>>();
        let as_f32 = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        compare(
            &format!("{} out (f64 here vs PyTorch)", c.name),
            &as_f32(&r.out),
            &c.out,
            &tiny(&r.out),
            &[c.b, c.m, c.e],
        )
        .unwrap();
        if let Some(w) = &c.weights {
            let (want, _) = expected_weights(&c, &r);
            compare(
                &format!("{} weights (f64 here vs PyTorch)", c.name),
                &as_f32(&want),
                w,
                &tiny(&want),
                &weight_dims(&c),
            )
            .unwrap();
        }
        // Self-attention fixtures really are one tensor three times.
        if c.self_attention {
            assert!(c.query == c.key && c.key == c.value, "{}", c.name);
        }
    }
}

/// The GPU layer loaded from each fixture's safetensors file (its own naming detection, the
/// case's prefix) against PyTorch's output and attention weights.
#[test]
fn mha_layer_matches_pytorch() {
    let Some(engine) = engine() else { return };
    let mut failures = Vec::new();
    for c in cases() {
        let r = reference(&c, &Params::load(&c));
        let run = || -> Result<String, String> {
            let layer = MultiHeadAttention::from_safetensors(
                engine,
                c.config(),
                &c.weights_file(),
                &c.prefix,
            )
            .map_err(|e| format!("from_safetensors: {e}"))?;
            let q = engine
                .upload(&c.query, &[c.b, c.m, c.e])
                .map_err(|e| e.to_string())?;
            let (k, v) = if c.self_attention {
                (None, None)
            } else {
                (
                    Some(
                        engine
                            .upload(&c.key, &[c.b, c.n, c.kdim])
                            .map_err(|e| e.to_string())?,
                    ),
                    Some(
                        engine
                            .upload(&c.value, &[c.b, c.n, c.vdim])
                            .map_err(|e| e.to_string())?,
                    ),
                )
            };
            let mut opts = MhaOptions::default();
            if let Some(mask) = &c.key_padding_mask {
                opts = opts.with_key_padding_mask(mask.clone());
            }
            match c.need {
                Need::None => {}
                Need::Averaged => opts = opts.with_need_weights(NeedWeights::Averaged),
                Need::PerHead => opts = opts.with_need_weights(NeedWeights::PerHead),
            }
            // Self-attention passes the very same tensor as query, key and value.
            let out = layer
                .forward(
                    &q,
                    k.as_ref().unwrap_or(&q),
                    v.as_ref().unwrap_or(&q),
                    &opts,
                )
                .map_err(|e| format!("forward: {e}"))?;
            let o = out.out.to_host().map_err(|e| e.to_string())?;
            let st = compare("out", &o, &c.out, &r.out_tol, &[c.b, c.m, c.e])?;
            let mut line = format!(
                "out max err {:.2e} (bound {:.2e}, worst err/bound {:.1e})",
                st.max_err, st.max_tol, st.worst_ratio
            );
            match (&c.weights, &out.weights) {
                (None, None) => {}
                (None, Some(_)) => return Err("weights returned but not asked for".into()),
                (Some(_), None) => return Err("weights asked for but not returned".into()),
                (Some(want), Some(got)) => {
                    let got = got.to_host().map_err(|e| e.to_string())?;
                    let (_, tol) = expected_weights(&c, &r);
                    let st = compare("weights", &got, want, &tol, &weight_dims(&c))?;
                    line += &format!(
                        "; weights max err {:.2e} (bound {:.2e}, worst err/bound {:.1e})",
                        st.max_err, st.max_tol, st.worst_ratio
                    );
                }
            }
            Ok(line)
        };
        match run() {
            Ok(line) => eprintln!("{:20} max |logit| {:5.2}: {line}", c.name, r.max_logit),
            Err(msg) => {
                eprintln!("{:20} FAILED: {msg}", c.name);
                failures.push(format!("{}: {msg}", c.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Whether `msg` shows `shape` as `[a, b]`, `(a, b)` or `a×b` / `axb` (whitespace ignored).
fn mentions_shape(msg: &str, shape: &[usize]) -> bool {
    let msg: String = msg.chars().filter(|c| !c.is_whitespace()).collect();
    let list = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let join = |sep: &str| {
        shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(sep)
    };
    msg.contains(&format!("[{list}]"))
        || msg.contains(&format!("({list})"))
        || msg.contains(&join("×"))
        || msg.contains(&join("x"))
}

fn load_err(engine: &xattn::Engine, config: MhaConfig, path: &Path, prefix: &str) -> String {
    match MultiHeadAttention::from_safetensors(engine, config, path, prefix) {
        Ok(_) => panic!("{} with prefix {prefix:?} loaded", path.display()),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{} (prefix {prefix:?}): {msg}", path.display());
            msg
        }
    }
}

#[test]
fn loading_errors_name_the_tensor_and_both_shapes() {
    let Some(engine) = engine() else { return };
    let dir = std::env::temp_dir().join(format!("xattn-mha-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // A prefix the file does not use: the error names what it looked for under that prefix.
    let packed = fixture_dir().join("packed_bias/weights.safetensors");
    let msg = load_err(engine, MhaConfig::new(32, 4), &packed, "nope.");
    assert!(msg.contains("nope."), "`{msg}` should name the prefix");
    // The HF fixture without its prefix.
    let hf = fixture_dir().join("hf_prefix/weights.safetensors");
    let msg = load_err(engine, MhaConfig::new(32, 4), &hf, "");
    assert!(!msg.is_empty());

    let e = 32;
    let torch_packed = |w: Vec<usize>, b: Vec<usize>, ow: Vec<usize>| {
        vec![
            ("in_proj_weight", w),
            ("in_proj_bias", b),
            ("out_proj.weight", ow),
            ("out_proj.bias", vec![e]),
        ]
    };
    let hf = |qb: Vec<usize>, vw: Vec<usize>| {
        vec![
            ("q_proj.weight", vec![e, e]),
            ("q_proj.bias", qb),
            ("k_proj.weight", vec![e, e]),
            ("k_proj.bias", vec![e]),
            ("v_proj.weight", vw),
            ("v_proj.bias", vec![e]),
            ("out_proj.weight", vec![e, e]),
            ("out_proj.bias", vec![e]),
        ]
    };
    struct Bad {
        name: &'static str,
        prefix: &'static str,
        tensors: Vec<(&'static str, Vec<usize>)>,
        config: MhaConfig,
        tensor: &'static str,
        expected: Vec<usize>,
        found: Vec<usize>,
    }
    let bad = vec![
        Bad {
            name: "out_proj_weight_shape",
            prefix: "enc.",
            tensors: torch_packed(vec![3 * e, e], vec![3 * e], vec![e, e - 1]),
            config: MhaConfig::new(e, 4),
            tensor: "out_proj.weight",
            expected: vec![e, e],
            found: vec![e, e - 1],
        },
        Bad {
            name: "in_proj_weight_shape",
            prefix: "enc.",
            tensors: torch_packed(vec![3 * e - 1, e], vec![3 * e], vec![e, e]),
            config: MhaConfig::new(e, 4),
            tensor: "in_proj_weight",
            expected: vec![3 * e, e],
            found: vec![3 * e - 1, e],
        },
        Bad {
            name: "in_proj_bias_shape",
            prefix: "",
            tensors: torch_packed(vec![3 * e, e], vec![e], vec![e, e]),
            config: MhaConfig::new(e, 4),
            tensor: "in_proj_bias",
            expected: vec![3 * e],
            found: vec![e],
        },
        Bad {
            name: "k_proj_weight_kdim",
            prefix: "dec.0.",
            tensors: vec![
                ("q_proj_weight", vec![e, e]),
                ("k_proj_weight", vec![e, 20]),
                ("v_proj_weight", vec![e, 24]),
                ("in_proj_bias", vec![3 * e]),
                ("out_proj.weight", vec![e, e]),
                ("out_proj.bias", vec![e]),
            ],
            config: MhaConfig::new(e, 4).with_kdim(16).with_vdim(24),
            tensor: "k_proj_weight",
            expected: vec![e, 16],
            found: vec![e, 20],
        },
        Bad {
            name: "hf_v_proj_weight",
            prefix: "model.attn.",
            tensors: hf(vec![e], vec![e, 16]),
            config: MhaConfig::new(e, 4),
            tensor: "v_proj.weight",
            expected: vec![e, e],
            found: vec![e, 16],
        },
        Bad {
            name: "hf_q_proj_bias",
            prefix: "model.attn.",
            tensors: hf(vec![e + 3], vec![e, e]),
            config: MhaConfig::new(e, 4),
            tensor: "q_proj.bias",
            expected: vec![e],
            found: vec![e + 3],
        },
    ];
    for t in bad {
        let path = dir.join(format!("{}.safetensors", t.name));
        let names: Vec<String> = t
            .tensors
            .iter()
            .map(|(n, _)| format!("{}{n}", t.prefix))
            .collect();
        let refs: Vec<(&str, &[usize])> = names
            .iter()
            .zip(&t.tensors)
            .map(|(n, (_, s))| (n.as_str(), &s[..]))
            .collect();
        write_safetensors(&path, &refs);
        let msg = load_err(engine, t.config, &path, t.prefix);
        let name = t.name;
        assert!(
            msg.contains(t.tensor),
            "{name}: `{msg}` should name {}",
            t.tensor
        );
        assert!(
            mentions_shape(&msg, &t.expected),
            "{name}: `{msg}` should give the expected shape {:?}",
            t.expected
        );
        assert!(
            mentions_shape(&msg, &t.found),
            "{name}: `{msg}` should give the shape found, {:?}",
            t.found
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A configuration that disagrees with the file is an error too.
#[test]
fn config_and_file_disagreeing_is_an_error() {
    let Some(engine) = engine() else { return };
    // bias = true, but the file has no biases.
    let no_bias = fixture_dir().join("no_bias/weights.safetensors");
    let msg = load_err(engine, MhaConfig::new(32, 2), &no_bias, "");
    assert!(msg.contains("bias"), "`{msg}` should name the missing bias");
    // kdim = vdim = E assumed, but the file's key and value projections are 32×24 and 32×40.
    let sep = fixture_dir().join("separate_kdim_vdim/weights.safetensors");
    let msg = load_err(
        engine,
        MhaConfig::new(32, 4),
        &sep,
        "decoder.layers.0.encoder_attn.",
    );
    assert!(!msg.is_empty());
}
