//! Whisper-shaped cross-attention in a decoder loop: the encoder output (1500 frames × 384,
//! Whisper tiny) is projected into K/V once with `project_source`, then each of 32 decoder
//! steps attends to it with one new token (`forward_cached`, and a step prepared once with
//! `prepare_cached`, the query written into its input each step). The same steps are run again
//! with `forward`, which re-projects the 1500-row source every step, to show what the cache
//! saves. Both paths must give bit-identical outputs; the last step is also checked against the
//! f64 CPU reference.
//!
//! `cargo run --release --example whisper_decoder [-- --small]` (`--small`: tiny sizes, for CI)

use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use xattn::{Context, Engine, MhaConfig, MhaOptions, MultiHeadAttention};

mod common;

use common::*;

fn main() {
    exit_on_error("whisper_decoder", run);
}

fn run() -> AnyResult<()> {
    let small = small_flag("whisper_decoder")?;
    // (source frames, E, heads, decoder steps)
    let (n, e, heads, steps) = if small {
        (64, 32, 4, 4)
    } else {
        (1500, 384, 6, 32)
    };
    let ctx = Context::new()?;
    println!("device: {}", ctx.describe());
    let engine = Engine::new(&ctx);

    let config = MhaConfig::new(e, heads);
    let mut rng = StdRng::seed_from_u64(5);
    let weights = random_weights(&config, &mut rng, false);
    let layer = MultiHeadAttention::new(&engine, config, &weights)?;
    let encoder = uniform(&mut rng, n * e, 1.0);
    let queries_host: Vec<Vec<f32>> = (0..steps).map(|_| uniform(&mut rng, e, 1.0)).collect();
    let queries = (queries_host.iter())
        .map(|q| engine.upload(q, &[1, 1, e]))
        .collect::<xattn::Result<Vec<_>>>()?;
    let source = engine.upload(&encoder, &[1, n, e])?;
    println!(
        "encoder output [1, {n}, {e}], {heads} heads of {}; {steps} decoder steps, query [1, 1, {e}]",
        config.head_dim()
    );

    let opts = MhaOptions::default();
    let start = Instant::now();
    let cache = layer.project_source(&source, &source)?;
    ctx.check()?; // wait for the GPU
    let project_ms = start.elapsed().as_secs_f64() * 1e3;
    println!("project_source (K/V of the {n} frames, once; includes compiling its kernel): {project_ms:.2} ms");

    // One warm-up call of each path compiles the pipelines outside the timings.
    layer
        .forward_cached(&queries[0], &cache, &opts)?
        .out
        .to_host()?;
    layer
        .forward(&queries[0], &source, &source, &opts)?
        .out
        .to_host()?;

    // Each step's time runs from the call to the output on the host (a decoder needs it).
    // Device objects (buffers, bind groups) xattn creates per step after the first, the
    // output's readback staging buffer included.
    let per_step = |before: u64| (ctx.objects_created() - before) as f64 / (steps - 1) as f64;
    let timed = |cached: bool| -> AnyResult<(Vec<f64>, Vec<Vec<f32>>, f64)> {
        let (mut ms, mut outs, mut before) = (Vec::new(), Vec::new(), 0);
        for (i, q) in queries.iter().enumerate() {
            if i == 1 {
                before = ctx.objects_created();
            }
            let start = Instant::now();
            let out = if cached {
                layer.forward_cached(q, &cache, &opts)?
            } else {
                layer.forward(q, &source, &source, &opts)?
            };
            outs.push(out.out.to_host()?);
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok((ms, outs, per_step(before)))
    };
    let (cached_ms, cached_out, cached_objects) = timed(true)?;
    let (full_ms, full_out, full_objects) = timed(false)?;
    // The decoder's own loop: one prepared step, the next query written into its input.
    let q_step = engine.upload(&queries_host[0], &[1, 1, e])?;
    let step = layer.prepare_cached(&q_step, &cache, &opts)?;
    step.run()?;
    let (mut prepared_ms, mut prepared_out, mut before) = (Vec::new(), Vec::new(), 0);
    for (i, q) in queries_host.iter().enumerate() {
        if i == 1 {
            before = ctx.objects_created();
        }
        let start = Instant::now();
        q_step.write(q)?;
        step.run()?;
        prepared_out.push(step.output().out.to_host()?);
        prepared_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let prepared_objects = per_step(before);
    if prepared_out != cached_out {
        return Err("the prepared step and forward_cached differ".into());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (name, ms, objects) in [
        ("prepared, cached", &prepared_ms, prepared_objects),
        ("with source cache", &cached_ms, cached_objects),
        ("without (re-project)", &full_ms, full_objects),
    ] {
        println!(
            "per step {name:<21}: median {:8.3} ms, mean {:8.3} ms, {objects:.0} device objects \
             created (1: the readback)",
            median(ms),
            mean(ms)
        );
    }
    println!(
        "speedup of the cache (median): {:.1}×",
        median(&full_ms) / median(&cached_ms)
    );

    // Check 1: the cache changes nothing — same bits at every step.
    for (step, (a, b)) in cached_out.iter().zip(&full_out).enumerate() {
        if a.iter().zip(b).any(|(x, y)| x.to_bits() != y.to_bits()) {
            return Err(format!("step {step}: cached and uncached outputs differ").into());
        }
    }
    println!("cached and uncached outputs bit-identical at all {steps} steps");

    // Check 2 (a sanity check; the rigorous tolerances live in tests/): the last step against
    // the f64 reference, within 1e-3 of the largest output.
    let last = &queries_host[steps - 1];
    check_rows(
        &config,
        &weights,
        (last, &encoder, &encoder),
        &[0],
        &cached_out[steps - 1],
    )?;
    Ok(())
}
