//! The layer's backward (`MultiHeadAttention::backward`) against PyTorch autograd: the cases of
//! kind `layer` under `tests/fixtures/grad/` (`tests/fixtures/generate_grad.py`; see its
//! docstring for the files and how each reference was computed and cross-checked):
//! `nn.MultiheadAttention` packed and with kdim ≠ vdim ≠ E and a key padding mask, Hugging Face
//! BART's and Whisper's cross-attention (one source for key and value; Whisper's W^K without a
//! bias). The loss is L = Σ out·dy; the gradients are of the query, key and value inputs and of
//! every weight and bias, in f64.
//!
//! The cases load as the forward fixtures do (`tests/common/mha_fixture.rs`: case.txt, the
//! naming families, the key padding mask), and the gradients of the weights map onto W^Q, W^K,
//! W^V, W^O by the same names ([`projections`]: PyTorch's packed `in_proj_weight` gradient is
//! dW^Q, dW^K, dW^V one after the other, `in_proj_bias`'s db_q, db_k, db_v). For a shared
//! source, the fixture's `grad.key` and `grad.value` are the source's gradient through the key
//! projection and through the value projection — exactly the layer's `d_key` and `d_value`
//! when it is given the one source tensor as both — so each is compared on its own; the
//! source's gradient, their sum, is then within the sum of their budgets.
//!
//! Two tests:
//!   * without a GPU, the tests' own f64 forward pass reproduces `out.npy`, and the crate's f64
//!     layer backward (`xattn::mha::reference::layer_backward`) reproduces every gradient to
//!     f64 round-off: the files mean what this test takes them to mean (names, order, packing,
//!     mask polarity, the shared source's two gradients);
//!   * on the GPU, `from_safetensors` + `backward` (gradients poisoned with NaN first) within
//!     the normwise budget of `tests/mha_backward.rs` (`tests/common/layer_grad.rs`), whose
//!     bias gradients are budgeted by the magnitudes they sum, since b_k's cancels to 0 (the
//!     fixture holds autograd's round-off there, below 1e-14).

mod common;

use std::collections::BTreeMap;

use common::files::read_npy;
use common::layer_grad::{amax, backward_poisoned, compare};
use common::mha_fixture::{self as fx, Case, Tensors};
use common::*;
use xattn::mha::reference::{self as layer_ref, LayerGrads as RefGrads};
use xattn::mha::MhaWeights;
use xattn::{Attention, MhaOptions, MultiHeadAttention};

/// A `layer` case with PyTorch's gradients, in xattn's order.
struct GradCase {
    case: Case,
    /// The tests' own parse of weights.safetensors.
    weights: MhaWeights,
    dy: Vec<f32>,
    d_query: Vec<f64>,
    d_key: Vec<f64>,
    d_value: Vec<f64>,
    d_weights: [Vec<f64>; 4],
    /// `None` where the layer has no such bias.
    d_biases: [Option<Vec<f64>>; 4],
}

impl GradCase {
    fn load(name: &str) -> GradCase {
        let case = Case::load_from(&fx::grad_fixture_dir(), name);
        let f64s = |f: &str, want: &[usize]| {
            let (x, d) = read_npy::<f64>(&case.file(f));
            assert_eq!(d, want, "{name}: {f}");
            x
        };
        let (b, m, n) = (case.b, case.m, case.n);
        let (dy, dyd) = read_npy::<f32>(&case.file("dy.npy"));
        assert_eq!(dyd, [b, m, case.e], "{name}: dy.npy");
        // grad.<tensor>.npy for every tensor of the file, under the file's names.
        let mut params: Tensors = BTreeMap::new();
        for entry in std::fs::read_dir(&case.dir).expect("the case's folder") {
            let file = entry.expect("a directory entry").file_name();
            let file = file.to_string_lossy();
            let Some(tensor) = file
                .strip_prefix("grad.")
                .and_then(|f| f.strip_suffix(".npy"))
            else {
                continue;
            };
            if !["query", "key", "value"].contains(&tensor) {
                let (x, d) = read_npy::<f64>(&case.file(&file));
                params.insert(tensor.to_string(), (d, x));
            }
        }
        let (d_weights, d_biases) = fx::projections(&case, &params);
        let weights = fx::fixture_weights(&case);
        for (i, (g, w)) in d_biases.iter().zip(bias_refs(&weights)).enumerate() {
            assert_eq!(
                g.is_some(),
                w.is_some(),
                "{name}: bias {i} and its gradient"
            );
        }
        GradCase {
            d_query: f64s("grad.query.npy", &[b, m, case.e]),
            d_key: f64s("grad.key.npy", &[b, n, case.kdim]),
            d_value: f64s("grad.value.npy", &[b, n, case.vdim]),
            weights,
            dy,
            d_weights,
            d_biases,
            case,
        }
    }

    fn opts(&self) -> MhaOptions {
        let c = &self.case;
        let mut opts = MhaOptions::default();
        if let Some(scale) = c.scale {
            opts = opts.with_attention(Attention::default().with_scale(scale as f32));
        }
        if let Some(mask) = &c.key_padding_mask {
            opts = opts.with_key_padding_mask(mask.clone());
        }
        opts
    }

    fn scale(&self) -> f64 {
        let c = &self.case;
        let attention = self.opts().attention_for(c.b, c.n).unwrap().into_owned();
        f64::from(attention.scale_for(c.config().head_dim()))
    }

    /// The crate's f64 layer backward on the fixture's tensors.
    fn f64_backward(&self) -> RefGrads {
        let c = &self.case;
        let attention = self.opts().attention_for(c.b, c.n).unwrap().into_owned();
        layer_ref::layer_backward(
            &c.config(),
            &self.weights,
            (&c.query, &c.key, &c.value),
            &self.dy,
            c.b,
            self.scale(),
            attention.masking(),
        )
    }

    /// PyTorch's gradients as the reference's type, with the gradients at the projections'
    /// outputs (which PyTorch's files do not hold; they only size the bias budgets) from the
    /// crate's f64 backward.
    fn pytorch(&self) -> RefGrads {
        RefGrads {
            d_query: self.d_query.clone(),
            d_key: self.d_key.clone(),
            d_value: self.d_value.clone(),
            d_weights: self.d_weights.clone(),
            d_biases: self.d_biases.clone().map(Option::unwrap_or_default),
            d_projected: self.f64_backward().d_projected,
        }
    }
}

fn bias_refs(w: &MhaWeights) -> [&Option<Vec<f32>>; 4] {
    [&w.q_bias, &w.k_bias, &w.v_bias, &w.o_bias]
}

fn cases() -> Vec<GradCase> {
    let dir = fx::grad_fixture_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run `python tests/fixtures/generate_grad.py`)",
                dir.display()
            )
        })
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| fixture_kind(p).as_deref() == Some("layer"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let cases: Vec<GradCase> = names.iter().map(|n| GradCase::load(n)).collect();
    // Guard against an empty or partial fixture directory passing vacuously.
    assert!(
        cases.len() >= 4,
        "only {} layer gradient cases",
        cases.len()
    );
    let has = |f: &dyn Fn(&GradCase) -> bool| cases.iter().any(f);
    let packed = |g: &GradCase| g.case.naming == fx::Naming::Torch && g.case.kdim == g.case.e;
    assert!(has(&packed));
    assert!(has(
        &|g| g.case.kdim != g.case.vdim && g.case.key_padding_mask.is_some()
    ));
    assert!(has(
        &|g| g.case.shared_source && g.case.key_padding_mask.is_some()
    ));
    assert!(has(&|g| g.case.shared_source && g.d_biases[1].is_none()));
    cases
}

/// |got − want| ≤ 1e-10·scale for every element, `scale` the largest |want| (or, for a bias,
/// the largest sum of magnitudes it adds up: b_k's gradient is round-off in both).
fn assert_f64_close(what: &str, got: &[f64], want: &[f64], scale: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tol = 1e-10 * scale;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol,
            "{what}: element {i} is {g:e}, PyTorch {w:e} (error {err:e} > {tol:e})"
        );
    }
}

/// The largest column sum of |x| over rows of `cols` elements.
fn column_magnitude(x: &[f64], cols: usize) -> f64 {
    let mut sums = vec![0.0f64; cols];
    for (e, v) in x.iter().enumerate() {
        sums[e % cols] += v.abs();
    }
    amax(&sums)
}

// ---------------------------------------------------------------------------------------------
// Tests

/// No GPU needed: the tests' own f64 forward pass gives `out.npy`, and the crate's f64 layer
/// backward gives every gradient of the files, under the mapping this test uses.
#[test]
fn fixtures_agree_with_the_f64_layer() {
    for g in cases() {
        let c = &g.case;
        let r = fx::reference(c);
        let as_f32 = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        let tiny = vec![1e-12; r.out.len()];
        fx::compare(
            &format!("{} out (f64 here vs PyTorch)", c.name),
            &as_f32(&r.out),
            &c.out,
            &tiny,
            &[c.b, c.m, c.e],
        )
        .unwrap();
        let ours = g.f64_backward();
        let name = &c.name;
        let pairs = [
            ("d_query", &ours.d_query, &g.d_query),
            ("d_key", &ours.d_key, &g.d_key),
            ("d_value", &ours.d_value, &g.d_value),
        ];
        for (what, got, want) in pairs {
            assert_f64_close(&format!("{name} {what}"), got, want, amax(want));
        }
        for (i, p) in ["W^Q", "W^K", "W^V", "W^O"].iter().enumerate() {
            let want = &g.d_weights[i];
            assert_f64_close(
                &format!("{name} d{p}"),
                &ours.d_weights[i],
                want,
                amax(want),
            );
            match &g.d_biases[i] {
                Some(want) => {
                    let scale = column_magnitude(&ours.d_projected[i], want.len());
                    assert_f64_close(
                        &format!("{name} d bias of {p}"),
                        &ours.d_biases[i],
                        want,
                        scale,
                    );
                }
                None => assert!(ours.d_biases[i].is_empty(), "{name}: bias of {p}"),
            }
        }
        // b_k's gradient is round-off in PyTorch's file too (the docstring's < 1e-14).
        if let Some(db_k) = &g.d_biases[1] {
            assert!(amax(db_k) < 1e-12, "{name}: b_k's gradient {}", amax(db_k));
        }
    }
}

/// The GPU backward of the layer loaded from each fixture's file against PyTorch.
#[test]
fn layer_backward_matches_pytorch() {
    let Some(engine) = engine() else { return };
    let mut failures = Vec::new();
    for g in cases() {
        let c = &g.case;
        let run = || -> Result<f64, String> {
            let layer = MultiHeadAttention::from_safetensors(
                engine,
                c.config(),
                &c.file("weights.safetensors"),
                &c.prefix,
            )
            .map_err(|e| format!("from_safetensors: {e}"))?;
            let up = |x: &[f32], d: usize| {
                engine
                    .upload(x, &[c.b, x.len() / (c.b * d), d])
                    .map_err(|e| e.to_string())
            };
            let query = up(&c.query, c.e)?;
            let key = up(&c.key, c.kdim)?;
            // One source: the very same tensor as key and value, as a decoder passes it.
            let value = if c.shared_source {
                None
            } else {
                Some(up(&c.value, c.vdim)?)
            };
            let dy = up(&g.dy, c.e)?;
            let got = backward_poisoned(
                &layer,
                (&query, &key, value.as_ref().unwrap_or(&key), &dy),
                &g.opts(),
            );
            let max_in = |x: &[f32]| x.iter().fold(0.0f64, |a, &v| a.max(f64::from(v.abs())));
            // `compare` panics with the worst element; catch it to report every case.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                compare(
                    &c.name,
                    &c.config(),
                    (c.b, c.m, c.n),
                    g.scale(),
                    &g.weights,
                    [max_in(&c.query), max_in(&c.key)],
                    &got,
                    &g.pytorch(),
                )
            }))
            .map_err(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "a comparison failed".into())
            })
        };
        match run() {
            Ok(worst) => eprintln!("{:24} worst error {worst:.4} of budget", c.name),
            Err(msg) => {
                eprintln!("{:24} FAILED: {msg}", c.name);
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
