//! The multi-head attention layer (`xattn::mha`) against PyTorch's `nn.MultiheadAttention` and
//! the attention layers of Whisper, BART, T5 and diffusers models.
//!
//! The fixtures under `tests/fixtures/mha/` come from `tests/fixtures/generate_mha.py` (see its
//! docstring for the file layout and how each reference was computed). Every case is checked
//! twice:
//!   * without a GPU, an f64 forward pass from the saved weights (`tests/common/mha_fixture.rs`,
//!     shared with `tests/cli_mha.rs`) must reproduce
//!     PyTorch's `out.npy` / `weights.npy` to their f32 rounding — this pins down the fixtures'
//!     meaning (tensor names, weight layout, head split, mask polarity) independently of the
//!     layer, and yields the per-element error bounds used below;
//!   * on the GPU, `MultiHeadAttention::from_safetensors` + `forward` must match PyTorch within
//!     a forward-error bound derived for an f32 implementation (see `reference` there).
//!
//! Loading errors (wrong prefix, mis-shaped tensors) must name the tensor and, for a shape
//! mismatch, the expected and found shapes.

mod common;

use std::path::Path;

use common::files::{write_safetensors, NamedTensor, TempDir};
use common::mha_fixture::*;
use common::*;
use xattn::mha::{MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights};

fn cases() -> Vec<Case> {
    let mut names: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("tests/fixtures/mha: run tests/fixtures/generate_mha.py")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.txt").exists())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let cases: Vec<Case> = names.iter().map(|n| Case::load(n)).collect();
    // Guard against an empty or partial fixture directory passing vacuously.
    assert!(cases.len() >= 17, "only {} MHA fixture cases", cases.len());
    let has = |f: &dyn Fn(&Case) -> bool| cases.iter().any(f);
    let torch = |c: &Case| c.naming == Naming::Torch;
    // Module names whose query projection is `q`.
    let module = |c: &Case, q: &str| matches!(c.naming, Naming::Modules([m, ..]) if m == q);
    assert!(has(&|c| torch(c)
        && c.kdim == c.e
        && c.vdim == c.e
        && c.bias));
    assert!(has(&|c| c.kdim != c.e && c.vdim != c.e && c.kdim != c.vdim));
    assert!(has(&|c| !c.bias));
    assert!(has(&|c| c.key_padding_mask.is_some()));
    assert!(has(&|c| c.need == Need::Averaged) && has(&|c| c.need == Need::PerHead));
    assert!(has(&|c| c.self_attention));
    assert!(has(&|c| module(c, "q_proj") && !c.prefix.is_empty()));
    // The model layers: Whisper, BART, T5 (inner width ≠ E, scale 1) and diffusers.
    assert!(has(&|c| module(c, "to_q") && c.inner != c.e));
    assert!(has(&|c| module(c, "q")
        && c.inner != c.e
        && c.scale == Some(1.0)));
    assert!(has(&|c| c.m == 1));
    cases
}

// ---------------------------------------------------------------------------------------------
// Tests

/// No GPU needed: the tests' own f64 forward pass from the saved tensors reproduces PyTorch's
/// files to their f32 rounding, so the fixtures mean what case.txt says.
#[test]
fn fixtures_agree_with_an_f64_forward_pass() {
    for c in cases() {
        let r = reference(&c);
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
                &c.weight_dims(),
            )
            .unwrap();
        }
        // Self-attention fixtures really are one tensor three times.
        if c.self_attention {
            assert!(c.query == c.key && c.key == c.value, "{}", c.name);
        }
    }
}

/// No GPU needed: every fixture's file (PyTorch's packed and separate projections, Hugging
/// Face's `k_proj` without bias, diffusers' `to_out.0`, T5's `q, k, v, o`) holds nothing its
/// layer leaves unread, and loads.
#[test]
fn every_fixture_loads_with_no_tensor_unread() {
    for c in cases() {
        let bytes = std::fs::read(c.file("weights.safetensors")).unwrap();
        let file = xattn::mha::weights::LayerFile::open(&bytes, &c.prefix, None)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(file.unread(), [], "{}", c.name);
        file.weights(&c.config())
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    }
}

/// The GPU layer loaded from each fixture's safetensors file (its own naming detection, the
/// case's prefix) against PyTorch's output and attention weights.
#[test]
fn mha_layer_matches_pytorch() {
    let Some(engine) = engine() else { return };
    let mut failures = Vec::new();
    for c in cases() {
        let r = reference(&c);
        let run = || -> Result<String, String> {
            let layer = MultiHeadAttention::from_safetensors(
                engine,
                c.config(),
                &c.file("weights.safetensors"),
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
            if let Some(scale) = c.scale {
                opts = opts.with_attention(xattn::Attention::default().with_scale(scale as f32));
            }
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
                    let st = compare("weights", &got, want, &tol, &c.weight_dims())?;
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
    let dir = TempDir::new("loading");

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
        let path = dir.path(&format!("{}.safetensors", t.name));
        // Values 0.01·index: only the shapes matter here.
        let tensors: Vec<NamedTensor> = t
            .tensors
            .iter()
            .map(|(n, shape)| {
                let values = (0..shape.iter().product()).map(|i| 0.01 * i as f32);
                (format!("{}{n}", t.prefix), shape.clone(), values.collect())
            })
            .collect();
        write_safetensors(&path, &tensors);
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
}

/// A file without biases loads as a layer without them (bias = true means "add those the
/// file holds"); a configuration whose sizes disagree with the file is an error.
#[test]
fn config_and_file_disagreeing_is_an_error() {
    let no_bias = std::fs::read(fixture_dir().join("no_bias/weights.safetensors")).unwrap();
    let w = xattn::mha::MhaWeights::from_safetensors(&no_bias, "", &MhaConfig::new(32, 2))
        .expect("a layer without biases");
    assert!([w.q_bias, w.k_bias, w.v_bias, w.o_bias]
        .iter()
        .all(Option::is_none));
    let Some(engine) = engine() else { return };
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
