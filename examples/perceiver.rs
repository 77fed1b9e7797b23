//! Perceiver-shaped latent bottleneck: 256 learned latents (E = 256, 8 heads of 32) read
//! 16384 input elements of 64 features each (PyTorch `kdim = vdim = 64`), so the attention is
//! short on the query side and long on the key side. Prints the plan the attention inside the
//! layer uses, times a cold and a warm `forward`, and checks the output against the f64 CPU
//! reference on a few latents (all with `--small`).
//!
//! `cargo run --release --example perceiver [-- --small]` (`--small`: tiny sizes, for CI)

use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use xattn::{Attention, Context, Engine, MhaConfig, MhaOptions, MultiHeadAttention, Tensor};

mod common;

use common::*;

fn main() {
    exit_on_error("perceiver", run);
}

fn run() -> AnyResult<()> {
    let small = small_flag("perceiver")?;
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
    let weights = random_weights(&config, &mut rng, true);
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
    check_rows(&config, &weights, (&latents, &inputs, &inputs), &rows, &out)?;
    Ok(())
}
