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
use rand::SeedableRng;
use xattn::{Context, Engine, MhaConfig, MhaOptions, MultiHeadAttention};

mod common;

use common::*;

fn main() {
    exit_on_error("diffusion_layer", run);
}

fn run() -> AnyResult<()> {
    let small = small_flag("diffusion_layer")?;
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
    let weights = random_weights(&config, &mut rng, true);
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
    check_rows(&config, &weights, (&latents, &text, &text), &rows, &out)?;
    Ok(())
}
