//! Shared test helpers: the test device, seeded inputs, poisoned runs, tolerances; temp folders
//! and .npy files in [`files`], the PyTorch MHA fixtures and their f64 reference in
//! [`mha_fixture`], random layers and their f64 reference in [`layer`].
#![allow(dead_code)]

pub mod files;
pub mod layer;
pub mod layer_grad;
pub mod linear_grad;
pub mod mha_fixture;
pub mod weight_stats;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use xattn::{cpu::reference, Attention, AttnShape, Engine, HostOutput, Tensor};

/// The repository root: the including crate's folder, or its parent for the CLI crate
/// (`cli/`), whose tests share these helpers through `#[path]`.
#[allow(dead_code)]
pub fn repo_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if dir.join("shaders").is_dir() {
        dir.to_path_buf()
    } else {
        dir.parent()
            .expect("the CLI crate lies in the repository")
            .to_path_buf()
    }
}

/// The `kind` of a gradient fixture's directory (case.txt's `kind = ...` line).
pub fn fixture_kind(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("case.txt")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "kind").then(|| v.trim().to_string())
    })
}

/// The engine on the test adapter, shared by the tests of one binary.
///
/// Without an adapter: a loud skip locally, a failure where `CI` or `XATTN_REQUIRE_GPU` is
/// set — a GPU test never passes silently without a device.
pub fn engine() -> Option<&'static Engine> {
    static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| match xattn::Context::new() {
            Ok(ctx) => {
                eprintln!("test device: {}", ctx.describe());
                Some(Engine::new(&ctx))
            }
            Err(e) => {
                let required = std::env::var_os("CI").is_some()
                    || std::env::var("XATTN_REQUIRE_GPU").is_ok_and(|v| v != "0");
                if required {
                    panic!("a GPU adapter is required (CI or XATTN_REQUIRE_GPU set): {e}");
                }
                eprintln!("\n*** SKIPPING GPU TEST: {e} ***\n");
                None
            }
        })
        .as_ref()
}

/// Limits of a lavapipe-like device, for planner tests that need no GPU.
pub const CAPS: xattn::plan::DeviceCaps = xattn::plan::DeviceCaps {
    max_binding: 128 << 20,
    max_buffer: 2 << 30,
    max_workgroups: 65535,
    max_workgroup_bytes: 32 << 10,
    loop_cap: Some(xattn::plan::LLVMPIPE_LOOP_CAP),
    native_f16: true,
    fill: xattn::plan::GPU_FILL,
    subgroup_lanes: Some(8),
    scalar_lane_loads: false,
    matrix_units: None,
};

/// V = key index / N in every dim: O is the softmax-weighted mean position, which moves by
/// the mass of any key a kernel drops.
pub fn positions(s: &AttnShape) -> Vec<f32> {
    let per_key = s.kv_heads * s.d_v;
    (0..s.batch * s.n * per_key)
        .map(|e| ((e / per_key) % s.n) as f32 / s.n as f32)
        .collect()
}

/// Uniform values in [-amp, amp), seeded.
pub fn random(len: usize, amp: f32, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-amp..amp)).collect()
}

/// Seeded Q, K, V for `s`, with values in [-amp, amp).
pub fn qkv(s: &AttnShape, amp: f32, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = |d: [usize; 4]| d.iter().product();
    (
        random(n(s.q_dims()), amp, seed),
        random(n(s.k_dims()), amp, seed + 1),
        random(n(s.v_dims()), amp, seed + 2),
    )
}

/// Runs attention with every output buffer poisoned with NaN first, so an element the
/// kernels never write fails any comparison.
pub fn run_poisoned(
    engine: &Engine,
    s: &AttnShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    opts: &Attention,
) -> xattn::Result<(xattn::Plan, HostOutput)> {
    let q = engine.upload(q, &s.q_dims())?;
    let k = engine.upload(k, &s.k_dims())?;
    let v = engine.upload(v, &s.v_dims())?;
    let call = engine.prepare(&q, &k, &v, opts)?;
    let out = call.output();
    poison(&out.o)?;
    poison(&out.lse)?;
    if let Some(w) = &out.weights {
        poison(w)?;
    }
    for (_, t) in out.stats.named() {
        if let Some(t) = t {
            poison(t)?;
        }
    }
    call.run()?;
    let plan = call.plan().clone();
    let out = call.into_output();
    let host = HostOutput {
        o: out.o.to_host()?,
        lse: out.lse.to_host()?,
        weights: out.weights.as_ref().map(Tensor::to_host).transpose()?,
        stats: out.stats.try_map(|t| t.to_host())?,
    };
    Ok((plan, host))
}

pub fn poison(t: &Tensor) -> xattn::Result<()> {
    t.fill(f32::NAN)
}

/// Error budget of an f32 attention against the f64 reference, from first principles:
/// a logit is a d_k-term f32 dot product, off by at most ~d_k·ε·Σ|q·k| (≤ `max_logit`);
/// exp/softmax turn an absolute logit error δ into a relative weight error ≈ δ; the weighted
/// sum over N keys adds up to N·ε relative (sequential f32 sums). So
/// `tol = ε·(c·(1 + max_logit) + N)`, scaled by max|v| for O. `max_logit` is the largest
/// |scale·Σ_d q_d k_d| bound, `scale·d_k·max|q|·max|k|`.
pub struct Budget {
    pub o: f64,
    pub lse: f64,
    pub weights: f64,
}

pub fn budget(s: &AttnShape, scale: f32, q: &[f32], k: &[f32], v: &[f32]) -> Budget {
    let amax = |x: &[f32]| x.iter().fold(0.0f64, |a, &y| a.max(f64::from(y.abs())));
    let eps = f64::from(f32::EPSILON);
    let max_logit = f64::from(scale.abs()) * s.d_k as f64 * amax(q) * amax(k);
    let base = eps * (4.0 * (1.0 + max_logit) + s.n as f64);
    Budget {
        o: base * amax(v).max(1e-3),
        lse: base,
        weights: base,
    }
}

/// |got − want|, with equal infinities (LSE −∞ of an empty row) 0 and NaN (an unwritten,
/// poisoned element) staying NaN so that any comparison with it fails.
pub fn elem_err(got: f32, want: f64) -> f64 {
    if got.is_finite() || want.is_finite() {
        (f64::from(got) - want).abs()
    } else if f64::from(got) == want {
        0.0
    } else {
        f64::INFINITY
    }
}

/// Asserts |got − want| ≤ tol for every element; reports the worst element on failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = elem_err(g, w);
        // NaN errors (an unwritten, poisoned element) must fail too.
        if err.is_nan() || err > tol {
            panic!("{what}: element {i} is {g}, reference {w} (error {err:e} > tolerance {tol:e})");
        }
        if err > worst.1 {
            worst = (i, err);
        }
    }
    worst.1
}

/// Compares a GPU result with the reference; returns the largest O error.
pub fn check_against_reference(
    what: &str,
    s: &AttnShape,
    scale: f32,
    (q, k, v): (&[f32], &[f32], &[f32]),
    got: &HostOutput,
) -> f64 {
    let want = reference::attention(s, q, k, v, f64::from(scale));
    let tol = budget(s, scale, q, k, v);
    let err = assert_close(&format!("{what} O"), &got.o, &want.o, tol.o);
    assert_close(
        &format!("{what} LSE"),
        &got.lse,
        &want.lse,
        tol.lse * (1.0 + want.lse.iter().fold(0.0f64, |a, x| a.max(x.abs()))),
    );
    if let Some(w) = &got.weights {
        assert_close(&format!("{what} weights"), w, &want.weights, tol.weights);
        for (r, row) in w.chunks(s.n).enumerate() {
            let sum: f64 = row.iter().map(|&x| f64::from(x)).sum();
            assert!(
                (sum - 1.0).abs() <= tol.weights * 4.0,
                "{what}: weight row {r} sums to {sum}"
            );
        }
    }
    err
}

/// The merge's f32 bound on top of the single-device budget: (O, LSE) extra for R shards and
/// the largest finite |LSE|. Each merge weight exp(LSE_i − LSE) is off by at most
/// ≈ 2ε·(1 + max|LSE|) relative (the exponent's own rounding), and the weighted sum of up to R
/// terms adds R·ε; the rings chain R − 1 two-way merges, so in all at most
/// 4ε·R·(1 + max|LSE|), times max|V| for O.
pub fn merge_bound(r: usize, max_lse: f64, amax_v: f64) -> (f64, f64) {
    let eps = f64::from(f32::EPSILON);
    let rel = 4.0 * eps * r as f64 * (1.0 + max_lse);
    (rel * amax_v.max(1e-3), rel)
}

/// [`budget`] with the logit bound widened by the masking: segment factors multiply it, a
/// softcap bounds it by the cap, a bias adds its largest finite magnitude.
pub fn budget_masked(
    s: &AttnShape,
    scale: f32,
    (q, k, v): (&[f32], &[f32], &[f32]),
    m: &xattn::mask::Masking,
) -> Budget {
    let amax = |x: &[f32]| x.iter().fold(0.0f64, |a, &y| a.max(f64::from(y.abs())));
    let eps = f64::from(f32::EPSILON);
    let max_logit = xattn::cpu::budget::max_logit(s, scale, q, k, m);
    let base = eps * (4.0 * (1.0 + max_logit) + s.n as f64);
    Budget {
        o: base * amax(v).max(1e-3),
        lse: base,
        weights: base,
    }
}

/// Unmasked shapes for the matrix-unit kernel: a decode row over many keys, head dims and key
/// counts off its 8- and 16-wide tiles with GQA, a diffusion-like block, a long GQA source
/// at a wide head.
pub fn matrix_unit_shapes() -> Vec<AttnShape> {
    vec![
        shape(1, 1, 1500, 2, 2, 64),
        AttnShape {
            batch: 2,
            m: 19,
            n: 45,
            q_heads: 4,
            kv_heads: 2,
            d_k: 3,
            d_v: 21,
        },
        shape(1, 300, 77, 8, 8, 40),
        shape(1, 33, 700, 2, 1, 128),
    ]
}

/// What the matrix-unit kernel's rounding of each weight P to f16 (with f16 inputs) may add to
/// the f32 budget: O moves by at most 2⁻¹¹·2·max|v| (each weight off by a factor 1 + δ,
/// |δ| ≤ 2⁻¹¹, the sum rounded alike), the LSE by ln(1 + 2⁻¹¹); nothing with f32 inputs.
/// Returns (extra O, extra LSE).
pub fn weight_rounding(half_inputs: bool, v: &[f32]) -> (f64, f64) {
    if !half_inputs {
        return (0.0, 0.0);
    }
    let delta = 2f64.powi(-11);
    let amax_v = v.iter().fold(0.0f64, |a, &x| a.max(f64::from(x.abs())));
    (delta * 2.0 * amax_v, delta.ln_1p())
}

/// A shape with `d_k = d_v = d`.
pub fn shape(batch: usize, m: usize, n: usize, hq: usize, hkv: usize, d: usize) -> AttnShape {
    AttnShape {
        batch,
        m,
        n,
        q_heads: hq,
        kv_heads: hkv,
        d_k: d,
        d_v: d,
    }
}

/// Seeded bools, `true` with probability `p`.
pub fn random_bools(len: usize, p: f64, seed: u64) -> Vec<bool> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_bool(p)).collect()
}

/// Masking cases over shapes that are not tile multiples, with several row blocks (64 rows)
/// and key tiles, M ≠ N both ways: (name, shape, options).
pub fn mask_cases() -> Vec<(String, AttnShape, Attention)> {
    use xattn::Alignment::{BottomRight, TopLeft};
    let a = Attention::default;
    let mut cases = Vec::new();
    let mut add = |name: &str, s: AttnShape, o: Attention| cases.push((name.to_string(), s, o));
    let wide = shape(1, 70, 300, 2, 1, 16); // M < N
    let tall = shape(1, 150, 45, 2, 2, 8); // M > N: bottom-right rows before the diagonal see nothing
    for (sn, s) in [("M<N", wide), ("M>N", tall)] {
        add(
            &format!("causal top-left {sn}"),
            s,
            a().with_causal(TopLeft),
        );
        add(
            &format!("causal bottom-right {sn}"),
            s,
            a().with_causal(BottomRight),
        );
        add(
            &format!("window top-left {sn}"),
            s,
            a().with_window(TopLeft, 5, 3),
        );
        add(
            &format!("window bottom-right {sn}"),
            s,
            a().with_window(BottomRight, 40, 0),
        );
        add(
            &format!("causal+window bottom-right {sn}"),
            s,
            a().with_causal(BottomRight).with_window(BottomRight, 7, 2),
        );
    }
    let lens = shape(3, 67, 130, 4, 2, 12);
    add(
        "lengths 0, 1 and full",
        lens,
        a().with_q_lens(vec![67, 1, 0])
            .with_kv_lens(vec![1, 130, 0]),
    );
    add(
        "lengths with causal bottom-right",
        lens,
        a().with_q_lens(vec![30, 67, 5])
            .with_kv_lens(vec![100, 20, 130])
            .with_causal(BottomRight),
    );
    let ms = shape(2, 66, 97, 4, 4, 8);
    let full = [2, 4, 66, 97];
    let mut rows_off = random_bools(full.iter().product(), 0.6, 91);
    for j in 0..97 {
        rows_off[(66 + 5) * 97 + j] = false; // b0 h1 row 5: fully masked
    }
    add("mask full", ms, a().with_mask(full, rows_off));
    add(
        "mask [1,1,M,N]",
        ms,
        a().with_mask([1, 1, 66, 97], random_bools(66 * 97, 0.3, 92)),
    );
    let mut pad = vec![true; 2 * 97];
    pad[80..97].iter_mut().for_each(|x| *x = false);
    pad[97..97 + 64].iter_mut().for_each(|x| *x = false); // whole 64-key tiles removed
    add(
        "mask [B,1,1,N] padding",
        ms,
        a().with_mask([2, 1, 1, 97], pad),
    );
    let alibi: Vec<f32> = (0..4 * 66 * 97usize)
        .map(|e| {
            let (h, i, j) = (e / (66 * 97), (e / 97) % 66, e % 97);
            -(0.5f32.powi(h as i32 + 1)) * (i as f32 - j as f32).abs()
        })
        .collect();
    add(
        "bias ALiBi [1,H,M,N]",
        ms,
        a().with_bias([1, 4, 66, 97], alibi),
    );
    let mut kb = random(2 * 97, 2.0, 93);
    kb[3] = f32::NEG_INFINITY;
    kb[97 + 50] = f32::NEG_INFINITY;
    add(
        "bias [B,1,1,N] with −∞",
        ms,
        a().with_bias([2, 1, 1, 97], kb),
    );
    // Finite values ≤ −1e30 count as −∞ on every path; row 3 has nothing else.
    let mut huge = random(66 * 97, 1.0, 96);
    huge[3 * 97..4 * 97].iter_mut().for_each(|x| *x = -2.0e30);
    huge[10 * 97 + 7] = -1.0e30;
    huge[20 * 97 + 9] = f32::MIN;
    add(
        "bias ≤ −1e30 as −∞",
        ms,
        a().with_bias([1, 1, 66, 97], huge),
    );
    add("softcap", ms, a().with_softcap(0.7).with_scale(2.0));
    add(
        "key segments",
        shape(1, 77, 120, 2, 2, 40),
        a().with_key_segment(0, 20, 2.5)
            .with_key_segment(60, 64, 0.5),
    );
    for (g, hkv) in [(2, 4), (4, 2), (8, 1)] {
        add(
            &format!("GQA ×{g} causal top-left"),
            shape(1, 40, 90, 8, hkv, 16),
            a().with_causal(TopLeft),
        );
    }
    let mix = shape(2, 70, 200, 4, 1, 16);
    add(
        "MQA bottom-right + kv_lens + mask + bias + softcap + segment",
        mix,
        a().with_causal(BottomRight)
            .with_kv_lens(vec![200, 150])
            .with_q_lens(vec![70, 64])
            .with_mask([2, 1, 1, 200], random_bools(400, 0.8, 94))
            .with_bias([1, 4, 70, 200], random(4 * 70 * 200, 1.0, 95))
            .with_softcap(3.0)
            .with_key_segment(100, 150, 1.5),
    );
    cases
}

/// Whether the tests run on wgpu's GL backend, where llvmpipe compiles each shader
/// specialization slowly (seconds, cold): sweeps whose cases only multiply specializations
/// (every R, every storage, every mask case) run a rotating spread of them there, so that every
/// variant still runs on GL, and in full on Vulkan.
pub fn on_gl(engine: &Engine) -> bool {
    engine.context().info.backend == wgpu::Backend::Gl
}

/// The configurations the planner may pick for the head dims of `s` on `engine`'s device:
/// R·(d_k + d_v) ≤ FUSED_ROW_FLOATS (forcing larger R would only time llvmpipe compiling
/// shaders no plan runs; naga still validates them all in tests/shaders.rs), subgroup lanes
/// and broadcast loads where the device has subgroups.
pub fn configs_for(engine: &Engine, s: &AttnShape) -> Vec<xattn::FusedConfig> {
    let row = (s.d_k.next_multiple_of(4) + s.d_v.next_multiple_of(4)) as u32;
    let lanes = engine.caps().subgroup_lanes.is_some();
    xattn::FusedConfig::ALL
        .into_iter()
        .filter(|c| {
            c.rows_per_invocation == 1
                || c.rows_per_invocation * row <= xattn::plan::FUSED_ROW_FLOATS
        })
        .filter(|c| lanes || !(c.subgroup_lanes || c.broadcast_loads))
        .collect()
}
