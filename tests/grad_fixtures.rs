//! Attention gradients against PyTorch autograd: fixtures computed in float64 by
//! `tests/fixtures/generate_grad.py` (see its docstring for the files and how each reference
//! was computed and cross-checked), one directory per case under `tests/fixtures/grad/`. This
//! file checks the cases of kind `sdpa`: Q, K, V, dO and the masks and logit controls of
//! case.txt in, PyTorch's dQ, dK, dV (and dBias, where the case asks for it) out. The `layer`
//! cases are for the layer backward's test.
//!
//! Three tests:
//!   * without a GPU, this file's own f64 backward (FlashAttention-2's formulas from the
//!     crate's f64 reference P) reproduces the fixtures to f64 round-off: the files mean what
//!     case.txt says in xattn's semantics (layouts, GQA sums, dBias reduced to the bias's own
//!     dims, softcap and segment factors in the chain rule, zero gradient on rows with no key).
//!     The same pass yields the per-element error bounds of the GPU test;
//!   * without a GPU, a naive f32 backward (sequential sums) stays within those bounds, so
//!     they leave an f32 implementation its room;
//!   * on the GPU, `Engine::attention` then `Engine::attention_backward` must match PyTorch
//!     within a bound derived for an f32 backward (see [`Bounds`]); rows with no key must give
//!     exactly zero, never NaN.

mod common;

use std::fs;
use std::path::{Path as FsPath, PathBuf};

use common::files::read_npy;
use common::*;
use xattn::{cpu::reference, Alignment, Attention, AttnShape};

const EPS: f64 = f32::EPSILON as f64;

fn fixtures_dir() -> PathBuf {
    repo_dir().join("tests/fixtures/grad")
}

/// One `sdpa` fixture case.
struct Case {
    name: String,
    shape: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    opts: Attention,
    /// case.txt `bias_grad = true`: dBias asked for (and in the fixture).
    bias_grad: bool,
    bias_dims: Option<[usize; 4]>,
    /// PyTorch's results, f64.
    o: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dbias: Option<Vec<f64>>,
}

fn dims4(what: &str, shape: &[usize]) -> [usize; 4] {
    shape
        .try_into()
        .unwrap_or_else(|_| panic!("{what}: expected 4 dims, got {shape:?}"))
}

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> T {
    s.parse()
        .unwrap_or_else(|_| panic!("cannot parse `{s}` as {what}"))
}

fn read_lens(path: &FsPath, batch: usize) -> Option<Vec<u32>> {
    if !path.exists() {
        return None;
    }
    let (lens, shape) = read_npy::<i32>(path);
    assert_eq!(shape, [batch], "{}", path.display());
    Some(
        lens.into_iter()
            .map(|l| u32::try_from(l).unwrap())
            .collect(),
    )
}

impl Case {
    fn load(dir: &FsPath) -> Case {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let file = |f: &str| dir.join(f);
        let f32s = |f: &str| read_npy::<f32>(&file(f));
        let f64s = |f: &str, want: &[usize]| {
            let (x, d) = read_npy::<f64>(&file(f));
            assert_eq!(d, want, "{name}: {f} dims");
            x
        };
        let ((q, qd), (k, kd), (v, vd)) = (f32s("q.npy"), f32s("k.npy"), f32s("v.npy"));
        let shape = AttnShape::from_qkv(
            dims4("q.npy", &qd),
            dims4("k.npy", &kd),
            dims4("v.npy", &vd),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (d_o, dod) = f32s("do.npy");
        assert_eq!(dod, shape.o_dims(), "{name}: do.npy dims");

        let mut opts = Attention::default();
        let mut bias_grad = false;
        let text = fs::read_to_string(file("case.txt")).expect("case.txt");
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{name}: case.txt line `{line}` is not `key = value`"));
            let words: Vec<&str> = value.split_whitespace().collect();
            opts = match (key.trim(), words.as_slice()) {
                ("kind", ["sdpa"]) => opts,
                ("scale", [s]) => opts.with_scale(parse("scale", s)),
                ("causal", [a]) => opts.with_causal(parse::<Alignment>("alignment", a)),
                ("window", [a, l, r]) => opts.with_window(
                    parse::<Alignment>("alignment", a),
                    parse("window left", l),
                    parse("window right", r),
                ),
                ("softcap", [c]) => opts.with_softcap(parse("softcap", c)),
                ("segment", [s, e, f]) => opts.with_key_segment(
                    parse("segment start", s),
                    parse("segment end", e),
                    parse("segment factor", f),
                ),
                ("bias_grad", ["true"]) => {
                    bias_grad = true;
                    opts
                }
                _ => panic!("{name}: unknown case.txt line `{line}`"),
            };
        }
        if let Some(l) = read_lens(&file("q_lens.npy"), shape.batch) {
            opts = opts.with_q_lens(l);
        }
        if let Some(l) = read_lens(&file("kv_lens.npy"), shape.batch) {
            opts = opts.with_kv_lens(l);
        }
        if file("mask.npy").exists() {
            let (m, d) = read_npy::<bool>(&file("mask.npy"));
            opts = opts.with_mask(dims4("mask.npy", &d), m);
        }
        let mut bias_dims = None;
        if file("bias.npy").exists() {
            let (b, d) = read_npy::<f32>(&file("bias.npy"));
            bias_dims = Some(dims4("bias.npy", &d));
            opts = opts.with_bias(dims4("bias.npy", &d), b);
        }
        if bias_grad {
            opts = opts.with_bias_grad();
        }
        let dbias = file("dbias.npy")
            .exists()
            .then(|| f64s("dbias.npy", &bias_dims.expect("dbias without a bias")));
        assert_eq!(
            dbias.is_some(),
            bias_grad,
            "{name}: dbias.npy iff bias_grad"
        );
        Case {
            o: f64s("o.npy", &shape.o_dims()),
            lse: f64s("lse.npy", &shape.lse_dims()),
            dq: f64s("dq.npy", &shape.q_dims()),
            dk: f64s("dk.npy", &shape.k_dims()),
            dv: f64s("dv.npy", &shape.v_dims()),
            dbias,
            name,
            shape,
            q,
            k,
            v,
            d_o,
            opts,
            bias_grad,
            bias_dims,
        }
    }

    /// Bound on |final logit| of a kept key, as tests/fixtures.rs has it:
    /// `scale·d_k·max|q|·max|k|` times the largest segment factor above 1, clamped to the
    /// softcap, plus the largest finite |bias|.
    fn logit_bound(&self) -> f64 {
        let m = self.opts.masking();
        let scale = f64::from(self.opts.scale_for(self.shape.d_k)).abs();
        let factor = m
            .segments
            .iter()
            .fold(1.0f64, |a, g| a.max(f64::from(g.factor)));
        let mut bound = scale * self.shape.d_k as f64 * amax(&self.q) * amax(&self.k) * factor;
        if let Some(cap) = m.softcap {
            bound = bound.min(f64::from(cap));
        }
        let bias = m.bias.as_ref().map_or(0.0, |b| {
            b.data
                .iter()
                .filter(|x| x.is_finite())
                .fold(0.0f64, |a, &x| a.max(f64::from(x.abs())))
        });
        bound + bias
    }

    /// The forward's f32 budget (tests/fixtures.rs, `common::budget`): `ε·(4·(1 + L) + N)`,
    /// the absolute error of a logit and of LSE per unit of |LSE|, the relative error of a
    /// weight.
    fn base(&self) -> f64 {
        EPS * (4.0 * (1.0 + self.logit_bound()) + self.shape.n as f64)
    }
}

fn amax(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |a, &y| a.max(f64::from(y.abs())))
}

fn load_all() -> Vec<Case> {
    let dir = fixtures_dir();
    let mut dirs: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run `python tests/fixtures/generate_grad.py`)",
                dir.display()
            )
        })
        .map(|e| e.expect("directory entry").path())
        .filter(|p| fixture_kind(p).as_deref() == Some("sdpa"))
        .collect();
    dirs.sort();
    let cases: Vec<Case> = dirs.iter().map(|d| Case::load(d)).collect();
    // Guard against an empty or partial fixture directory passing vacuously.
    assert!(
        cases.len() >= 19,
        "only {} sdpa gradient cases",
        cases.len()
    );
    let has = |f: &dyn Fn(&Case) -> bool| cases.iter().any(f);
    let m = |c: &Case| c.opts.masking().clone();
    assert!(has(&|c| c.shape.d_v != c.shape.d_k));
    assert!(has(
        &|c| c.shape.q_heads > c.shape.kv_heads && c.shape.kv_heads > 1
    ));
    assert!(has(&|c| c.shape.kv_heads == 1 && c.shape.q_heads > 1));
    assert!(has(&|c| m(c).softcap.is_some()));
    assert!(has(&|c| !m(c).segments.is_empty()));
    assert!(has(
        &|c| c.bias_grad && c.bias_dims.unwrap()[..3] == [1, 1, 1]
    ));
    assert!(has(&|c| c.bias_grad && c.bias_dims.unwrap()[1] > 1));
    assert!(has(&|c| c.bias_dims.is_some() && !c.bias_grad));
    assert!(has(&|c| c.lse.contains(&f64::NEG_INFINITY)));
    for a in [Alignment::TopLeft, Alignment::BottomRight] {
        for m_gt_n in [false, true] {
            assert!(
                has(&|c| m(c)
                    .window
                    .is_some_and(|w| w.align == a && w.left.is_none())
                    && (c.shape.m > c.shape.n) == m_gt_n),
                "a causal {a:?} case with M > N = {m_gt_n}"
            );
        }
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// The f64 backward and its error bounds

/// The f64 backward of a case, and per-element bounds on the error of an f32 backward.
///
/// Values: FlashAttention-2's formulas from the f64 reference's P, O and LSE
/// (`xattn::cpu::reference::attention_masked`): with the final logit
/// `s_ij = t(x_ij) + bias_ij`, `x_ij = scale·f_j·q_i·k_j` (f_j the key's segment factor,
/// t the softcap, t' its derivative `1 − tanh²(x/cap)`),
/// `D_i = Σ_c dO_ic·O_ic`, `dP_ij = dO_i·v_j`, `dS_ij = P_ij·(dP_ij − D_i)` (= dL/ds_ij, so
/// dBias sums it over the bias's broadcast dims), `dQ_i = scale·Σ_j f_j·t'_ij·dS_ij·k_j`,
/// `dK_j = scale·f_j·Σ_(h,i) t'·dS·q_i`, `dV_j = Σ_(h,i) P_hij·dO_hi`, the (h, i) sums running
/// over the M rows of every query head that reads the kv head.
///
/// Bounds, the classical running error analysis of those formulas evaluated in f32 (ε =
/// f32::EPSILON, n-term sums off by at most n·ε·Σ|terms| in any order), with what the
/// backward receives from the forward taken at the forward's own budget (`base`, see
/// [`Case::base`]):
///   * a recomputed `P_ij = exp(s_ij − LSE_i)`: relative error `ρ_i = base·(2 + |LSE_i|) + 2ε`
///     (logit error `base`, LSE error `base·(1 + |LSE_i|)`, exp and its argument);
///   * `D_i` from the forward's O (error `base·max|v| + ε|O|` per element):
///     `e_D = ε(d_v + 1)·Σ|dO·O| + Σ_c |dO_ic|·(base·max|v| + ε|O_ic|)`;
///   * `dP_ij − D_i`: `e_g = ε·d_v·Σ_c|dO_ic·v_jc| + e_D + ε|dP − D|`;
///   * `dS_ij`: `P·(ρ|dP − D| + e_g) + ε|dS|`; through the softcap, times t' plus
///     `|dS|·(base/cap + 3ε)` (|d t'/d(x/cap)| ≤ 0.77, logit error `base`) plus ε|t'·dS|;
///   * dQ, dK, dV, dBias: the sum of their terms' propagated errors (|k|·e_dS and so on, ρ·P·|dO|
///     for dV) plus `ε·(terms + 2)·Σ|terms|` for the summation and the scale products, plus
///     `ε·|value|` for the rounding of the f32 result.
///
/// A row with no key has no terms: its dQ bound is 0, and it adds nothing to dK, dV, dBias.
struct Bounds {
    dq: (Vec<f64>, Vec<f64>),
    dk: (Vec<f64>, Vec<f64>),
    dv: (Vec<f64>, Vec<f64>),
    dbias: Option<(Vec<f64>, Vec<f64>)>,
}

/// Accumulates a value, the propagated error of its terms and Σ|terms|.
#[derive(Clone, Copy, Default)]
struct Acc {
    value: f64,
    err: f64,
    abs: f64,
    terms: usize,
}

impl Acc {
    fn add(&mut self, term: f64, err: f64) {
        self.value += term;
        self.err += err;
        self.abs += term.abs();
        self.terms += 1;
    }

    /// (value, bound on an f32 evaluation's error).
    fn finish(&self) -> (f64, f64) {
        let tol = self.err + EPS * (self.terms as f64 + 2.0) * self.abs + EPS * self.value.abs();
        (self.value, tol)
    }
}

fn finish(acc: &[Acc]) -> (Vec<f64>, Vec<f64>) {
    acc.iter().map(Acc::finish).unzip()
}

fn f64_backward(c: &Case) -> Bounds {
    let s = &c.shape;
    let (bn, mn, nn, hq, hk, dk, dv) = (s.batch, s.m, s.n, s.q_heads, s.kv_heads, s.d_k, s.d_v);
    let group = hq / hk;
    let masking = c.opts.masking();
    let scale = f64::from(c.opts.scale_for(dk));
    let r = reference::attention_masked(s, &c.q, &c.k, &c.v, scale, masking);
    let base = c.base();
    let max_v = amax(&c.v).max(1e-3);
    let factor = |j: usize| {
        masking
            .segments
            .iter()
            .find(|g| (g.start..g.end).contains(&j))
            .map_or(1.0, |g| f64::from(g.factor))
    };
    let cap = masking.softcap.map(f64::from);
    let bias_dims = c.bias_dims.filter(|_| c.bias_grad);

    let mut aq = vec![Acc::default(); s.q_dims().iter().product()];
    let mut ak = vec![Acc::default(); s.k_dims().iter().product()];
    let mut av = vec![Acc::default(); s.v_dims().iter().product()];
    let mut ab = vec![Acc::default(); bias_dims.map_or(0, |d| d.iter().product())];
    let f = |x: f32| f64::from(x);
    for b in 0..bn {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..mn {
                let lse = r.lse[(b * hq + h) * mn + i];
                if lse == f64::NEG_INFINITY {
                    continue; // no key: no terms
                }
                let rho = base * (2.0 + lse.abs()) + 2.0 * EPS;
                let qi = ((b * mn + i) * hq + h) * dk;
                let oi = ((b * mn + i) * hq + h) * dv;
                let d_o = &c.d_o[oi..oi + dv];
                let o = &r.o[oi..oi + dv];
                let d: f64 = d_o.iter().zip(o).map(|(&x, &y)| f(x) * y).sum();
                let e_d = EPS
                    * (dv as f64 + 1.0)
                    * d_o
                        .iter()
                        .zip(o)
                        .map(|(&x, &y)| (f(x) * y).abs())
                        .sum::<f64>()
                    + d_o
                        .iter()
                        .zip(o)
                        .map(|(&x, &y)| f(x).abs() * (base * max_v + EPS * y.abs()))
                        .sum::<f64>();
                for j in 0..nn {
                    let p = r.weights[((b * hq + h) * mn + i) * nn + j];
                    if p == 0.0 {
                        continue;
                    }
                    let kj = ((b * nn + j) * hk + kh) * dk;
                    let vj = ((b * nn + j) * hk + kh) * dv;
                    let vrow = &c.v[vj..vj + dv];
                    let dp: f64 = d_o.iter().zip(vrow).map(|(&x, &y)| f(x) * f(y)).sum();
                    let dp_abs: f64 = d_o
                        .iter()
                        .zip(vrow)
                        .map(|(&x, &y)| (f(x) * f(y)).abs())
                        .sum();
                    let g = dp - d;
                    let e_g = EPS * dv as f64 * dp_abs + e_d + EPS * g.abs();
                    // dL/d(final logit), and its error.
                    let ds = p * g;
                    let e_ds = p * (rho * g.abs() + e_g) + EPS * ds.abs();
                    if let Some(dims) = bias_dims {
                        let pick = |x: usize, n: usize| if n == 1 { 0 } else { x };
                        let at = ((pick(b, dims[0]) * dims[1] + pick(h, dims[1])) * dims[2]
                            + pick(i, dims[2]))
                            * dims[3]
                            + j;
                        ab[at].add(ds, e_ds);
                    }
                    // dL/d(scale·f_j·q·k).
                    let fj = factor(j);
                    let (dx, e_dx) = match cap {
                        None => (ds, e_ds),
                        Some(cap) => {
                            let x: f64 = scale
                                * fj
                                * c.q[qi..qi + dk]
                                    .iter()
                                    .zip(&c.k[kj..kj + dk])
                                    .map(|(&a, &b)| f(a) * f(b))
                                    .sum::<f64>();
                            let tp = 1.0 - (x / cap).tanh().powi(2);
                            let dx = ds * tp;
                            let e =
                                e_ds * tp + ds.abs() * (base / cap + 3.0 * EPS) + EPS * dx.abs();
                            (dx, e)
                        }
                    };
                    let sf = scale * fj;
                    for e in 0..dk {
                        let (qv, kv) = (f(c.q[qi + e]), f(c.k[kj + e]));
                        aq[qi + e].add(sf * dx * kv, (sf * kv).abs() * e_dx);
                        ak[kj + e].add(sf * dx * qv, (sf * qv).abs() * e_dx);
                    }
                    for (e, &x) in d_o.iter().enumerate() {
                        let t = p * f(x);
                        av[vj + e].add(t, rho * t.abs());
                    }
                }
            }
        }
    }
    Bounds {
        dq: finish(&aq),
        dk: finish(&ak),
        dv: finish(&av),
        dbias: bias_dims.map(|_| finish(&ab)),
    }
}

// ---------------------------------------------------------------------------------------------
// Comparisons

/// |got − want| ≤ tol for every element, NaN failing. Returns the largest error and its ratio
/// to the tolerance, or the first failing element.
fn compare(what: &str, got: &[f32], want: &[f64], tol: &[f64]) -> Result<(f64, f64), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} elements, expected {}",
            got.len(),
            want.len()
        ));
    }
    let mut worst = (0.0f64, 0.0f64);
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        let err = elem_err(g, w);
        if err.is_nan() || err > t {
            return Err(format!(
                "{what}: element {i} is {g:e}, PyTorch {w:e} (error {err:e} > tolerance {t:e})"
            ));
        }
        worst = (
            worst.0.max(err),
            if t > 0.0 {
                worst.1.max(err / t)
            } else {
                worst.1
            },
        );
    }
    Ok(worst)
}

/// No GPU needed: this file's f64 backward reproduces every fixture to f64 round-off, so the
/// files mean what case.txt says in xattn's semantics (and the bounds below are computed for
/// the right quantities).
#[test]
fn fixtures_agree_with_an_f64_backward() {
    for c in load_all() {
        let b = f64_backward(&c);
        // f64 summation-order noise on values of order 1.
        let close = |what: &str, got: &[f64], want: &[f64]| {
            assert_eq!(got.len(), want.len(), "{} {what}", c.name);
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                assert!(
                    g == w || (g - w).abs() <= 1e-12 * (1.0 + w.abs()),
                    "{} {what}: element {i}: fixture {w:e}, f64 here {g:e}",
                    c.name
                );
            }
        };
        close("dq", &b.dq.0, &c.dq);
        close("dk", &b.dk.0, &c.dk);
        close("dv", &b.dv.0, &c.dv);
        match (&b.dbias, &c.dbias) {
            (Some(got), Some(want)) => close("dbias", &got.0, want),
            (None, None) => {}
            _ => panic!("{}: dbias on one side only", c.name),
        }
        let scale = f64::from(c.opts.scale_for(c.shape.d_k));
        let r = reference::attention_masked(&c.shape, &c.q, &c.k, &c.v, scale, c.opts.masking());
        close("o", &r.o, &c.o);
        close("lse", &r.lse, &c.lse);
        // Rows with no key: exactly zero gradient in the fixture.
        let s = &c.shape;
        for (row, &l) in c.lse.iter().enumerate() {
            if l == f64::NEG_INFINITY {
                let (bh, i) = (row / s.m, row % s.m);
                let (b, h) = (bh / s.q_heads, bh % s.q_heads);
                let at = ((b * s.m + i) * s.q_heads + h) * s.d_k;
                assert!(c.dq[at..at + s.d_k].iter().all(|&x| x == 0.0), "{}", c.name);
            }
        }
    }
}

/// A naive f32 evaluation of the forward and of the same backward formulas (sequential sums,
/// P recomputed from its own f32 LSE, D from its own f32 O).
fn f32_backward(c: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let s = &c.shape;
    let (bn, mn, nn, hq, hk, dk, dv) = (s.batch, s.m, s.n, s.q_heads, s.kv_heads, s.d_k, s.d_v);
    let group = hq / hk;
    let masking = c.opts.masking();
    let scale = c.opts.scale_for(dk);
    // Which keys a row keeps: the f64 reference's nonzero weights (no weight underflows in
    // these fixtures' small logits).
    let r = reference::attention_masked(s, &c.q, &c.k, &c.v, f64::from(scale), masking);
    let factor = |j: usize| {
        masking
            .segments
            .iter()
            .find(|g| (g.start..g.end).contains(&j))
            .map_or(1.0, |g| g.factor)
    };
    let bias_dims = c.bias_dims;
    let bias_at = |b: usize, h: usize, i: usize, j: usize| {
        bias_dims.map(|d| {
            let pick = |x: usize, n: usize| if n == 1 { 0 } else { x };
            ((pick(b, d[0]) * d[1] + pick(h, d[1])) * d[2] + pick(i, d[2])) * d[3] + j
        })
    };
    let bias = masking.bias.as_ref().map(|b| b.data.clone());
    let mut dq = vec![0f32; c.q.len()];
    let mut dkk = vec![0f32; c.k.len()];
    let mut dvv = vec![0f32; c.v.len()];
    let mut db = c
        .bias_grad
        .then(|| vec![0f32; bias.as_ref().unwrap().len()]);
    for b in 0..bn {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..mn {
                let qi = ((b * mn + i) * hq + h) * dk;
                let oi = ((b * mn + i) * hq + h) * dv;
                let kept: Vec<usize> = (0..nn)
                    .filter(|&j| r.weights[((b * hq + h) * mn + i) * nn + j] > 0.0)
                    .collect();
                if kept.is_empty() {
                    continue;
                }
                // (raw logit scale·f·q·k, final logit) per kept key.
                let logits: Vec<(f32, f32)> = kept
                    .iter()
                    .map(|&j| {
                        let kj = ((b * nn + j) * hk + kh) * dk;
                        let mut dot = 0f32;
                        for e in 0..dk {
                            dot += c.q[qi + e] * c.k[kj + e];
                        }
                        let raw = dot * scale * factor(j);
                        let mut x = masking.softcap.map_or(raw, |cap| cap * (raw / cap).tanh());
                        if let (Some(bias), Some(at)) = (&bias, bias_at(b, h, i, j)) {
                            x += bias[at];
                        }
                        (raw, x)
                    })
                    .collect();
                let max = logits.iter().fold(f32::NEG_INFINITY, |a, &(_, x)| a.max(x));
                let sum: f32 = logits.iter().map(|&(_, x)| (x - max).exp()).sum();
                let lse = max + sum.ln();
                let mut o = vec![0f32; dv];
                for (&j, &(_, x)) in kept.iter().zip(&logits) {
                    let p = (x - lse).exp();
                    let vj = ((b * nn + j) * hk + kh) * dv;
                    for (acc, &x) in o.iter_mut().zip(&c.v[vj..vj + dv]) {
                        *acc += p * x;
                    }
                }
                let d_o = &c.d_o[oi..oi + dv];
                let dot =
                    |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |s, (&x, &y)| s + x * y);
                let d = dot(d_o, &o);
                for (&j, &(raw, x)) in kept.iter().zip(&logits) {
                    let p = (x - lse).exp();
                    let kj = ((b * nn + j) * hk + kh) * dk;
                    let vj = ((b * nn + j) * hk + kh) * dv;
                    let dp = dot(d_o, &c.v[vj..vj + dv]);
                    let ds = p * (dp - d);
                    if let (Some(db), Some(at)) = (&mut db, bias_at(b, h, i, j)) {
                        db[at] += ds;
                    }
                    let dx = masking
                        .softcap
                        .map_or(ds, |cap| ds * (1.0 - (raw / cap).tanh().powi(2)));
                    let sf = scale * factor(j);
                    for e in 0..dk {
                        dq[qi + e] += sf * dx * c.k[kj + e];
                        dkk[kj + e] += sf * dx * c.q[qi + e];
                    }
                    for (acc, &x) in dvv[vj..vj + dv].iter_mut().zip(d_o) {
                        *acc += p * x;
                    }
                }
            }
        }
    }
    (dq, dkk, dvv, db)
}

/// No GPU needed: the bounds of [`f64_backward`] hold for the naive f32 backward above, so
/// they leave room for an f32 implementation (and they are not loose: the ratios printed show
/// how much of each bound it uses).
#[test]
fn a_naive_f32_backward_stays_within_the_bounds() {
    let mut worst = [0.0f64; 4];
    let mut failures = Vec::new();
    for c in load_all() {
        let bounds = f64_backward(&c);
        let (dq, dk, dv, db) = f32_backward(&c);
        let mut w = [0.0f64; 4];
        let mut check = |i: usize, name: &str, got: &[f32], want: &[f64], tol: &[f64]| match compare(
            &format!("{} naive f32 {name}", c.name),
            got,
            want,
            tol,
        ) {
            Ok((_, ratio)) => w[i] = ratio,
            Err(msg) => failures.push(msg),
        };
        check(0, "dq", &dq, &c.dq, &bounds.dq.1);
        check(1, "dk", &dk, &c.dk, &bounds.dk.1);
        check(2, "dv", &dv, &c.dv, &bounds.dv.1);
        if let (Some(db), Some(want), Some((_, tol))) = (&db, &c.dbias, &bounds.dbias) {
            check(3, "dbias", db, want, tol);
        }
        for (a, b) in worst.iter_mut().zip(w) {
            *a = a.max(b);
        }
    }
    eprintln!(
        "naive f32 backward, largest error / bound: dq {:.3}, dk {:.3}, dv {:.3}, dbias {:.3}",
        worst[0], worst[1], worst[2], worst[3]
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `Engine::attention` then `Engine::attention_backward` on the GPU against PyTorch, within
/// the bounds of [`f64_backward`].
#[test]
fn backward_matches_pytorch() {
    let Some(engine) = engine() else { return };
    let mut failures = Vec::new();
    let mut worst = [(0.0f64, 0.0f64); 4];
    for (i, c) in load_all().into_iter().enumerate() {
        // On GL, where llvmpipe compiles each specialization slowly, every third case and
        // the one that combines softcap, GQA, causal and a bias with its gradient.
        if on_gl(engine) && i % 3 != 0 && c.name != "softcap_gqa_bias" {
            continue;
        }
        let s = &c.shape;
        let what = format!("{} {s}", c.name);
        let bounds = f64_backward(&c);
        let run = || -> Result<[(f64, f64); 4], String> {
            let e = |e: xattn::Error| format!("{what}: {e}");
            let q = engine.upload(&c.q, &s.q_dims()).map_err(e)?;
            let k = engine.upload(&c.k, &s.k_dims()).map_err(e)?;
            let v = engine.upload(&c.v, &s.v_dims()).map_err(e)?;
            let d_o = engine.upload(&c.d_o, &s.o_dims()).map_err(e)?;
            let out = engine.attention(&q, &k, &v, &c.opts).map_err(e)?;
            // The forward first, within the forward's budget (tests/fixtures.rs), so that a
            // forward error is not reported as a backward one.
            let base = c.base();
            let max_v = amax(&c.v).max(1e-3);
            let o = out.o.to_host().map_err(e)?;
            let tol_o: Vec<f64> = c.o.iter().map(|w| base * max_v + EPS * w.abs()).collect();
            compare(&format!("{what} O (forward)"), &o, &c.o, &tol_o)?;
            let lse = out.lse.to_host().map_err(e)?;
            let tol_lse: Vec<f64> = c
                .lse
                .iter()
                .map(|w| base * (1.0 + w.abs()) + EPS * w.abs())
                .collect();
            compare(&format!("{what} LSE (forward)"), &lse, &c.lse, &tol_lse)?;

            // Every gradient poisoned with NaN first: an element the kernels never write
            // (a row with no key included) fails.
            let call = engine
                .prepare_backward((&q, &k, &v), (&out.o, &out.lse), &d_o, &c.opts)
                .map_err(e)?;
            let g: &xattn::Grads = call.output();
            for t in [&g.dq, &g.dk, &g.dv].into_iter().chain(g.dbias.as_ref()) {
                poison(t).map_err(e)?;
            }
            call.run().map_err(e)?;
            let grads = call.into_output();
            let dims = |t: &xattn::Tensor, want: &[usize], name: &str| {
                if t.dims() == want {
                    Ok(())
                } else {
                    Err(format!(
                        "{what}: {name} dims {:?}, expected {want:?}",
                        t.dims()
                    ))
                }
            };
            dims(&grads.dq, &s.q_dims(), "dq")?;
            dims(&grads.dk, &s.k_dims(), "dk")?;
            dims(&grads.dv, &s.v_dims(), "dv")?;
            let mut w = [(0.0, 0.0); 4];
            let mut cmp = |i: usize, name: &str, t: &xattn::Tensor, want: &[f64], tol: &[f64]| {
                let got = t.to_host().map_err(|err| format!("{what}: {err}"))?;
                w[i] = compare(&format!("{what} {name}"), &got, want, tol)?;
                Ok::<(), String>(())
            };
            cmp(0, "dq", &grads.dq, &c.dq, &bounds.dq.1)?;
            cmp(1, "dk", &grads.dk, &c.dk, &bounds.dk.1)?;
            cmp(2, "dv", &grads.dv, &c.dv, &bounds.dv.1)?;
            match (&grads.dbias, &c.dbias, &bounds.dbias) {
                (Some(t), Some(want), Some((_, tol))) => {
                    dims(t, &c.bias_dims.unwrap(), "dbias")?;
                    cmp(3, "dbias", t, want, tol)?;
                }
                (None, None, _) => {}
                (got, _, _) => {
                    return Err(format!(
                        "{what}: dbias {} but {}asked for",
                        if got.is_some() { "returned" } else { "missing" },
                        if c.bias_grad { "" } else { "not " }
                    ))
                }
            }
            Ok(w)
        };
        match run() {
            Ok(w) => {
                eprintln!(
                    "{what}: largest error (ratio to the bound): dq {:.2e} ({:.3}), dk {:.2e} \
                     ({:.3}), dv {:.2e} ({:.3}){}",
                    w[0].0,
                    w[0].1,
                    w[1].0,
                    w[1].1,
                    w[2].0,
                    w[2].1,
                    if c.bias_grad {
                        format!(", dbias {:.2e} ({:.3})", w[3].0, w[3].1)
                    } else {
                        String::new()
                    }
                );
                for (a, b) in worst.iter_mut().zip(w) {
                    *a = (a.0.max(b.0), a.1.max(b.1));
                }
            }
            Err(msg) => failures.push(msg),
        }
    }
    eprintln!(
        "largest error vs PyTorch over all cases (ratio to the bound): dq {:.2e} ({:.3}), \
         dk {:.2e} ({:.3}), dv {:.2e} ({:.3}), dbias {:.2e} ({:.3})",
        worst[0].0,
        worst[0].1,
        worst[1].0,
        worst[1].1,
        worst[2].0,
        worst[2].1,
        worst[3].0,
        worst[3].1
    );
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
