//! Masks, sequence lengths and logit controls against an independent implementation:
//! fixtures computed by PyTorch (`tests/fixtures/generate.py`, float64, cross-checked there
//! against `scaled_dot_product_attention` and `flex_attention`), one directory per case under
//! `tests/fixtures/masks/`. Every GPU path and the crate's f64 reference must reproduce each
//! case's O and LSE.

mod common;

use std::fs;
use std::path::{Path as FsPath, PathBuf};

use common::*;
use xattn::{cpu::reference, Alignment, Attention, AttnShape, Path};

const EPS: f64 = f32::EPSILON as f64;
/// Labels of got and want in a failure message.
const GPU: (&str, &str) = ("GPU", "PyTorch");
const REF: (&str, &str) = ("PyTorch (f32)", "reference");

/// One fixture case: inputs, options, and PyTorch's O and LSE.
struct Case {
    name: String,
    shape: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    opts: Attention,
    o: Vec<f32>,
    lse: Vec<f32>,
    /// Bound on |final logit| of a kept key (see [`Case::logit_bound`]).
    max_logit: f64,
    /// max |v|.
    max_v: f64,
}

fn fixtures_dir() -> PathBuf {
    FsPath::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/masks")
}

fn npy_file(path: &FsPath) -> npyz::NpyFile<std::io::Cursor<Vec<u8>>> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    npyz::NpyFile::new(std::io::Cursor::new(bytes))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Reads an `.npy` of element type `T`; returns its shape and elements.
fn read_npy<T: npyz::Deserialize>(path: &FsPath) -> (Vec<usize>, Vec<T>) {
    let file = npy_file(path);
    assert_eq!(
        file.order(),
        npyz::Order::C,
        "{}: must be row-major",
        path.display()
    );
    let shape = file.shape().iter().map(|&d| d as usize).collect();
    let data = file
        .into_vec::<T>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (shape, data)
}

fn dims4(path: &FsPath, shape: &[usize]) -> [usize; 4] {
    shape
        .try_into()
        .unwrap_or_else(|_| panic!("{}: expected 4 dims, got {shape:?}", path.display()))
}

fn parse<T: std::str::FromStr>(what: &str, s: &str) -> T {
    s.parse()
        .unwrap_or_else(|_| panic!("cannot parse `{s}` as {what}"))
}

fn read_lens(path: &FsPath, batch: usize) -> Option<Vec<u32>> {
    if !path.exists() {
        return None;
    }
    let (shape, lens) = read_npy::<i32>(path);
    assert_eq!(shape, [batch], "{}", path.display());
    Some(
        lens.into_iter()
            .map(|l| u32::try_from(l).expect("lengths are ≥ 0"))
            .collect(),
    )
}

impl Case {
    fn load(dir: &FsPath) -> Case {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let file = |f: &str| dir.join(f);
        let (qd, q) = read_npy::<f32>(&file("q.npy"));
        let (kd, k) = read_npy::<f32>(&file("k.npy"));
        let (vd, v) = read_npy::<f32>(&file("v.npy"));
        let shape = AttnShape::from_qkv(
            dims4(&file("q.npy"), &qd),
            dims4(&file("k.npy"), &kd),
            dims4(&file("v.npy"), &vd),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (od, o) = read_npy::<f32>(&file("o.npy"));
        let (ld, lse) = read_npy::<f32>(&file("lse.npy"));
        assert_eq!(od, shape.o_dims(), "{name}: o.npy dims");
        assert_eq!(ld, shape.lse_dims(), "{name}: lse.npy dims");

        let mut opts = Attention::default();
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
            let (d, m) = read_npy::<bool>(&file("mask.npy"));
            opts = opts.with_mask(dims4(&file("mask.npy"), &d), m);
        }
        if file("bias.npy").exists() {
            let (d, b) = read_npy::<f32>(&file("bias.npy"));
            opts = opts.with_bias(dims4(&file("bias.npy"), &d), b);
        }
        let mut case = Case {
            name,
            shape,
            q,
            k,
            v,
            opts,
            o,
            lse,
            max_logit: 0.0,
            max_v: 0.0,
        };
        case.max_logit = case.logit_bound();
        case.max_v = amax(&case.v);
        case
    }

    /// Bound on |final logit| of a kept key: `scale·d_k·max|q|·max|k|` (as in
    /// `common::budget`), times the largest segment factor above 1, clamped to the softcap,
    /// plus the largest finite |bias|.
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

    /// The f32 error budget of `common::budget` with this case's logit bound:
    /// `ε·(4·(1 + L) + N)`.
    fn base(&self) -> f64 {
        EPS * (4.0 * (1.0 + self.max_logit) + self.shape.n as f64)
    }

    fn want_o(&self) -> Vec<f64> {
        self.o.iter().map(|&x| f64::from(x)).collect()
    }

    fn want_lse(&self) -> Vec<f64> {
        self.lse.iter().map(|&x| f64::from(x)).collect()
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
                "{}: {e} (run `python tests/fixtures/generate.py`)",
                dir.display()
            )
        })
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 30,
        "only {} fixture cases under {}",
        dirs.len(),
        dir.display()
    );
    dirs.iter().map(|d| Case::load(d)).collect()
}

/// Like `common::assert_close` with a tolerance per element (from the wanted value):
/// matching infinities are equal, NaN fails. `names` label got and want in a failure.
/// Returns the largest error and its ratio to the tolerance.
fn check(
    what: &str,
    names: (&str, &str),
    got: &[f32],
    want: &[f64],
    tol: impl Fn(f64) -> f64,
) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = elem_err(g, w);
        let t = tol(w);
        if err.is_nan() || err > t {
            let (gn, wn) = names;
            panic!("{what}: element {i}: {gn} {g}, {wn} {w} (error {err:e} > tolerance {t:e})");
        }
        worst = (worst.0.max(err), worst.1.max(err / t));
    }
    worst
}

/// Every case on `path` against PyTorch.
fn check_path(path: Path) {
    let Some(engine) = engine() else { return };
    let (mut worst_o, mut worst_lse, mut worst_ratio) = (0.0f64, 0.0f64, 0.0f64);
    for c in load_all() {
        let what = format!("{} {} {}", c.name, path.name(), c.shape);
        let opts = c.opts.clone().with_path(path);
        let (plan, got) = run_poisoned(engine, &c.shape, (&c.q, &c.k, &c.v), &opts)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(plan.path(), path, "{what}");
        if path == Path::SplitK && c.shape.n > 256 {
            eprintln!("{what}: {}", plan.tiling());
        }
        // The f32 budget, plus the fixture's own rounding to f32 (half an ulp, ≤ ε·|value|).
        let base = c.base();
        let max_v = c.max_v.max(1e-3);
        let (eo, ro) = check(&format!("{what} O"), GPU, &got.o, &c.want_o(), |w| {
            base * max_v + EPS * w.abs()
        });
        let (el, rl) = check(&format!("{what} LSE"), GPU, &got.lse, &c.want_lse(), |w| {
            base * (1.0 + w.abs()) + EPS * w.abs()
        });
        worst_o = worst_o.max(eo);
        worst_lse = worst_lse.max(el);
        worst_ratio = worst_ratio.max(ro).max(rl);
    }
    eprintln!(
        "{}: largest error vs PyTorch: O {worst_o:e}, LSE {worst_lse:e} \
         (at most {worst_ratio:.3} of the tolerance)",
        path.name()
    );
}

#[test]
fn three_pass_matches_pytorch() {
    check_path(Path::ThreePass);
}

#[test]
fn fused_matches_pytorch() {
    check_path(Path::Fused);
}

#[test]
fn split_k_matches_pytorch() {
    check_path(Path::SplitK);
}

/// The f64 reference against PyTorch's f64 results: only the fixture's rounding to f32
/// (ε·|value|) and f64 summation noise separate them.
#[test]
fn reference_matches_pytorch() {
    let (mut worst_o, mut worst_lse, mut worst_ratio) = (0.0f64, 0.0f64, 0.0f64);
    for c in load_all() {
        let s = &c.shape;
        let scale = f64::from(c.opts.scale_for(s.d_k));
        let r = reference::attention_masked(s, &c.q, &c.k, &c.v, scale, c.opts.masking());
        // f64 noise: a few hundred ulps of the logit and sum magnitudes.
        let noise = 1e3 * f64::EPSILON * (1.0 + c.max_logit + s.n as f64);
        let max_v = c.max_v.max(1e-3);
        // The fixture is the got side here: it was rounded to f32, the reference was not.
        let (eo, ro) = check(&format!("{} reference O", c.name), REF, &c.o, &r.o, |w| {
            EPS * w.abs() + noise * max_v
        });
        let (el, rl) = check(
            &format!("{} reference LSE", c.name),
            REF,
            &c.lse,
            &r.lse,
            |w| EPS * w.abs() + noise * (1.0 + w.abs()),
        );
        worst_o = worst_o.max(eo);
        worst_lse = worst_lse.max(el);
        worst_ratio = worst_ratio.max(ro).max(rl);
    }
    eprintln!(
        "reference: largest error vs PyTorch: O {worst_o:e}, LSE {worst_lse:e} \
         (at most {worst_ratio:.3} of the tolerance)"
    );
}
