//! Perceiver-shaped latent bottleneck: 256 learned latents (E = 256, 8 heads of 32) read
//! 16384 input elements of 64 features each (PyTorch `kdim = vdim = 64`), so the attention is
//! short on the query side and long on the key side. Prints the plan the attention inside the
//! layer uses, times a cold and a warm `forward`, and checks the output against the f64 CPU
//! reference on a few latents (all with `--small`).
//!
//! `cargo run --release --example perceiver [-- --small]` (`--small`: tiny sizes, for CI)

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xattn::cpu::reference;
use xattn::mask::Masking;
use xattn::mha::MhaWeights;
use xattn::{
    Attention, AttnShape, Context, Engine, MhaConfig, MhaOptions, MultiHeadAttention, Tensor,
};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn uniform(rng: &mut StdRng, len: usize, a: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-a..a)).collect()
}

/// Seeded Xavier-like weights (±√(3/fan_in)) and small biases.
fn random_weights(c: &MhaConfig, rng: &mut StdRng) -> MhaWeights {
    let (e, kv) = (c.embed_dim, c.kv_dim());
    let mut mat = |out: usize, inp: usize| uniform(rng, out * inp, (3.0 / inp as f32).sqrt());
    let (q, k, v, o) = (mat(e, e), mat(kv, c.kdim), mat(kv, c.vdim), mat(e, e));
    MhaWeights {
        q,
        k,
        v,
        o,
        q_bias: Some(uniform(rng, e, 0.1)),
        k_bias: Some(uniform(rng, kv, 0.1)),
        v_bias: Some(uniform(rng, kv, 0.1)),
        o_bias: Some(uniform(rng, e, 0.1)),
    }
}

/// f64 reference of the layer (batch 1) for the query rows `rows` only.
fn reference_rows(
    c: &MhaConfig,
    w: &MhaWeights,
    (query, key, value): (&[f32], &[f32], &[f32]),
    rows: &[usize],
) -> Vec<f64> {
    let e = c.embed_dim;
    let picked: Vec<f32> = rows
        .iter()
        .flat_map(|&r| &query[r * e..][..e])
        .copied()
        .collect();
    let q = reference::linear(&picked, &w.q, w.q_bias.as_deref(), e);
    let k = reference::linear(key, &w.k, w.k_bias.as_deref(), c.kdim);
    let v = reference::linear(value, &w.v, w.v_bias.as_deref(), c.vdim);
    let (n, d) = (key.len() / c.kdim, c.head_dim());
    let shape = AttnShape {
        batch: 1,
        m: rows.len(),
        n,
        q_heads: c.num_heads,
        kv_heads: c.kv_heads,
        d_k: d,
        d_v: d,
    };
    let scale = f64::from(Attention::default().scale_for(d));
    let att = reference::attention_masked(&shape, &q, &k, &v, scale, &Masking::default());
    reference::linear(&att.o, &w.o, w.o_bias.as_deref(), e)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("perceiver: {e}");
        std::process::exit(1);
    }
}

fn run() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let small = match args.as_slice() {
        [] => false,
        [a] if a == "--small" => true,
        _ => return Err("usage: perceiver [--small]".into()),
    };
    // (latents, inputs, E, heads, input features)
    let (m, n, e, heads, feat) = if small {
        (16, 300, 32, 4, 16)
    } else {
        (256, 16384, 256, 8, 64)
    };
    let ctx = Context::new()?;
    println!("device: {}", ctx.describe());
    let engine = Engine::new(&ctx);

    let config = MhaConfig::new(e, heads).with_kdim(feat).with_vdim(feat);
    let d = config.head_dim();
    let mut rng = StdRng::seed_from_u64(11);
    let weights = random_weights(&config, &mut rng);
    let layer = MultiHeadAttention::new(&engine, config, &weights)?;
    let latents = uniform(&mut rng, m * e, 1.0);
    let inputs = uniform(&mut rng, n * feat, 1.0);
    let latents_t = engine.upload(&latents, &[1, m, e])?;
    let inputs_t = engine.upload(&inputs, &[1, n, feat])?;
    println!("latents [1, {m}, {e}] read inputs [1, {n}, {feat}]; {heads} heads of {d}");

    // The layer plans its attention from the same request as `Engine::attention` on the
    // projected Q [1, M, heads, d] and K/V [1, N, heads, d]; empty tensors of those shapes
    // show that plan (the layer adds the Q/K/V/O projections around it).
    let q_shape = Tensor::empty(&ctx, "q_shape", &[1, m, heads, d])?;
    let kv_shape = Tensor::empty(&ctx, "kv_shape", &[1, n, heads, d])?;
    println!(
        "{}",
        engine.plan(&q_shape, &kv_shape, &kv_shape, &Attention::default())?
    );
    drop((q_shape, kv_shape));

    let opts = MhaOptions::default();
    let mut out = Vec::new();
    for run in ["cold (compiles the pipelines)", "warm"] {
        let start = Instant::now();
        out = layer
            .forward(&latents_t, &inputs_t, &inputs_t, &opts)?
            .out
            .to_host()?;
        println!(
            "forward + readback, {run}: {:.2} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
    }

    // A sanity check (the rigorous tolerances live in tests/): against the f64 reference,
    // within 1e-3 of the largest output, on 8 latents (all with --small).
    let rows: Vec<usize> = if small {
        (0..m).collect()
    } else {
        (0..8).map(|i| i * (m - 1) / 7).collect()
    };
    let want = reference_rows(&config, &weights, (&latents, &inputs, &inputs), &rows);
    let got = rows.iter().flat_map(|&r| &out[r * e..][..e]);
    let err = (got.zip(&want))
        .map(|(&g, &r)| (f64::from(g) - r).abs())
        .fold(0.0, f64::max);
    let bound = 1e-3 * want.iter().fold(0.0, |acc: f64, x| acc.max(x.abs()));
    println!(
        "vs f64 reference on {} latents: max |err| = {err:.2e} (bound {bound:.2e})",
        rows.len()
    );
    if err > bound {
        return Err("the output differs from the CPU reference".into());
    }
    Ok(())
}
