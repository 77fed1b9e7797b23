//! Diffusion-shaped cross-attention: 4096 image latents (a 64×64 latent grid, E = 320 in
//! 8 heads of 40) read a 77-token text embedding of width 768 (like Stable Diffusion's CLIP
//! context, PyTorch `kdim = vdim = 768`). The prompt is projected into K/V once with
//! `project_source`; each of 5 denoising steps then uploads new latents and runs
//! `forward_cached`. The last step is checked against the f64 CPU reference on a few rows
//! (all rows with `--small`).
//!
//! `cargo run --release --example diffusion_layer [-- --small]` (`--small`: tiny sizes, for CI)

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xattn::cpu::reference;
use xattn::mask::Masking;
use xattn::mha::MhaWeights;
use xattn::{Attention, AttnShape, Context, Engine, MhaConfig, MhaOptions, MultiHeadAttention};

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
        eprintln!("diffusion_layer: {e}");
        std::process::exit(1);
    }
}

fn run() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let small = match args.as_slice() {
        [] => false,
        [a] if a == "--small" => true,
        _ => return Err("usage: diffusion_layer [--small]".into()),
    };
    // (latents, text tokens, E, heads, text width, denoising steps)
    let (m, n, e, heads, kdim, steps) = if small {
        (64, 7, 32, 4, 24, 5)
    } else {
        (4096, 77, 320, 8, 768, 5)
    };
    let ctx = Context::new()?;
    println!("device: {}", ctx.describe());
    let engine = Engine::new(&ctx);

    let config = MhaConfig::new(e, heads).with_kdim(kdim).with_vdim(kdim);
    let mut rng = StdRng::seed_from_u64(7);
    let weights = random_weights(&config, &mut rng);
    let layer = MultiHeadAttention::new(&engine, config, &weights)?;
    let text = uniform(&mut rng, n * kdim, 1.0);
    let text_t = engine.upload(&text, &[1, n, kdim])?;
    println!(
        "latents [1, {m}, {e}] read text [1, {n}, {kdim}]; {heads} heads of {}",
        config.head_dim()
    );

    let start = Instant::now();
    let cache = layer.project_source(&text_t, &text_t)?;
    ctx.check()?; // wait for the GPU
    println!(
        "source cache projected once: {:.2} ms (K, V {:?}; includes compiling its kernel)",
        start.elapsed().as_secs_f64() * 1e3,
        cache.k().dims()
    );

    let opts = MhaOptions::default();
    let latents_t = engine.upload(&vec![0.0; m * e], &[1, m, e])?;
    let (mut latents, mut out) = (Vec::new(), Vec::new());
    for step in 1..=steps {
        // New latents every step (a denoiser's previous output); the text K/V stay cached.
        latents = uniform(&mut rng, m * e, 1.0);
        let start = Instant::now();
        latents_t.write(&latents)?;
        out = layer
            .forward_cached(&latents_t, &cache, &opts)?
            .out
            .to_host()?;
        let note = if step == 1 {
            " (includes compiling the pipelines)"
        } else {
            ""
        };
        println!(
            "step {step}: upload + forward_cached + readback {:8.2} ms{note}",
            start.elapsed().as_secs_f64() * 1e3
        );
    }

    // A sanity check (the rigorous tolerances live in tests/): the last step against the f64
    // reference, within 1e-3 of the largest output, on 8 rows spread over the latents (all
    // rows with --small).
    let rows: Vec<usize> = if small {
        (0..m).collect()
    } else {
        (0..8).map(|i| i * (m - 1) / 7).collect()
    };
    let want = reference_rows(&config, &weights, (&latents, &text, &text), &rows);
    let got = rows.iter().flat_map(|&r| &out[r * e..][..e]);
    let err = (got.zip(&want))
        .map(|(&g, &r)| (f64::from(g) - r).abs())
        .fold(0.0, f64::max);
    let bound = 1e-3 * want.iter().fold(0.0, |acc: f64, x| acc.max(x.abs()));
    println!(
        "last step vs f64 reference on {} rows: max |err| = {err:.2e} (bound {bound:.2e})",
        rows.len()
    );
    if err > bound {
        return Err("the output differs from the CPU reference".into());
    }
    Ok(())
}
