//! Helpers shared by the layer examples: seeded weights and inputs, the `--small` flag, and a
//! sanity check against the f64 reference (the rigorous tolerances live in `tests/`).
#![allow(dead_code)] // each example uses a subset

use rand::rngs::StdRng;
use rand::Rng;
use xattn::mask::Masking;
use xattn::mha::reference;
use xattn::mha::MhaWeights;
use xattn::{Attention, MhaConfig};

pub type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// max |got − want|; a NaN (an element never written) makes it NaN, never hides.
pub fn max_abs_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).abs())
        .fold(0.0, |a: f64, e| {
            if a.is_nan() || e.is_nan() {
                f64::NAN
            } else {
                a.max(e)
            }
        })
}

/// Runs an example's body; an error prints `<name>: <error>` and exits with 1.
pub fn exit_on_error(name: &str, run: fn() -> AnyResult<()>) {
    if let Err(e) = run() {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

/// Whether `--small` (tiny sizes, for CI) was given; anything else is a usage error.
pub fn small_flag(name: &str) -> AnyResult<bool> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(false),
        [a] if a == "--small" => Ok(true),
        _ => Err(format!("usage: {name} [--small]").into()),
    }
}

/// Seeded values in [-a, a).
pub fn uniform(rng: &mut StdRng, len: usize, a: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-a..a)).collect()
}

/// Seeded Xavier-like weights (±√(3/fan_in)) and small biases; `k_bias: false` leaves W^K
/// without one, as in Whisper.
pub fn random_weights(c: &MhaConfig, rng: &mut StdRng, k_bias: bool) -> MhaWeights {
    let (e, kv) = (c.embed_dim, c.kv_dim());
    let mut mat = |out: usize, inp: usize| uniform(rng, out * inp, (3.0 / inp as f32).sqrt());
    let (q, k, v, o) = (mat(e, e), mat(kv, c.kdim), mat(kv, c.vdim), mat(e, e));
    MhaWeights {
        q,
        k,
        v,
        o,
        q_bias: Some(uniform(rng, e, 0.1)),
        k_bias: k_bias.then(|| uniform(rng, kv, 0.1)),
        v_bias: Some(uniform(rng, kv, 0.1)),
        o_bias: Some(uniform(rng, e, 0.1)),
    }
}

/// Median of a few timings.
pub fn median(ms: &[f64]) -> f64 {
    let mut s = ms.to_vec();
    s.sort_by(f64::total_cmp);
    let h = s.len() / 2;
    if s.len().is_multiple_of(2) {
        (s[h - 1] + s[h]) / 2.0
    } else {
        s[h]
    }
}

/// Compares query rows `rows` of a batch-1 layer output `got [M, E]` with the f64 reference
/// and fails if any element is off by more than 1e-3 of the largest reference output.
pub fn check_rows(
    c: &MhaConfig,
    w: &MhaWeights,
    (query, key, value): (&[f32], &[f32], &[f32]),
    rows: &[usize],
    got: &[f32],
) -> AnyResult<()> {
    let e = c.embed_dim;
    let pick = |x: &[f32]| -> Vec<f32> {
        rows.iter()
            .flat_map(|&r| &x[r * e..][..e])
            .copied()
            .collect()
    };
    let scale = f64::from(Attention::default().scale_for(c.head_dim()));
    let want = reference::layer(
        c,
        w,
        (&pick(query), key, value),
        1,
        scale,
        &Masking::default(),
    )
    .o;
    let err = max_abs_err(&pick(got), &want);
    let bound = 1e-3 * want.iter().fold(0.0, |m: f64, x| m.max(x.abs()));
    println!(
        "vs f64 reference on {} row(s): max |err| = {err:.2e} (bound {bound:.2e})",
        rows.len()
    );
    if err.is_nan() || err > bound {
        return Err("the output differs from the CPU reference".into());
    }
    Ok(())
}

/// Adam (Kingma & Ba) over one parameter tensor.
pub struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    const B1: f32 = 0.9;
    const B2: f32 = 0.999;
    const EPS: f32 = 1e-8;

    pub fn new(len: usize) -> Self {
        Self {
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    /// One step `t` (from 1) of size `lr` on `x` with gradient `g`.
    pub fn step(&mut self, x: &mut [f32], g: &[f32], lr: f32, t: i32) {
        let (c1, c2) = (1.0 - Self::B1.powi(t), 1.0 - Self::B2.powi(t));
        for (((x, &g), m), v) in x.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            *m = Self::B1 * *m + (1.0 - Self::B1) * g;
            *v = Self::B2 * *v + (1.0 - Self::B2) * g * g;
            *x -= lr * (*m / c1) / ((*v / c2).sqrt() + Self::EPS);
        }
    }
}

/// A layer's parameters as a list: W^Q, W^K, W^V, W^O, then the biases (each projection
/// has one).
pub fn params(w: &mut MhaWeights) -> [&mut Vec<f32>; 8] {
    fn bias(b: &mut Option<Vec<f32>>) -> &mut Vec<f32> {
        b.as_mut().expect("every projection has a bias")
    }
    let MhaWeights {
        q,
        k,
        v,
        o,
        q_bias,
        k_bias,
        v_bias,
        o_bias,
    } = w;
    [
        q,
        k,
        v,
        o,
        bias(q_bias),
        bias(k_bias),
        bias(v_bias),
        bias(o_bias),
    ]
}
