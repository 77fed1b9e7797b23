//! Shared test helpers: the test device, seeded inputs, poisoned runs, tolerances.
#![allow(dead_code)]

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use xattn::{cpu::reference, Attention, AttnShape, Engine, HostOutput, Tensor};

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
    uniform_align: 256,
};

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
    let plan = engine.plan(&q, &k, &v, opts)?;
    let out = engine.alloc_output(&plan)?;
    poison(&out.o)?;
    poison(&out.lse)?;
    if let Some(w) = &out.weights {
        poison(w)?;
    }
    engine.run(&plan, &q, &k, &v, &out, None)?;
    let host = HostOutput {
        o: out.o.to_host()?,
        lse: out.lse.to_host()?,
        weights: out.weights.as_ref().map(Tensor::to_host).transpose()?,
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

/// Asserts |got − want| ≤ tol for every element; reports the worst element on failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = if g.is_finite() || w.is_finite() {
            (f64::from(g) - w).abs()
        } else if f64::from(g) == w {
            0.0
        } else {
            f64::INFINITY
        };
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
