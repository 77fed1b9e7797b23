//! Whisper-shaped cross-attention in a decoder loop: the encoder output (1500 frames × 384,
//! Whisper tiny) is projected into K/V once with `project_source`, then each of 32 decoder
//! steps attends to it with one new token (`forward_cached`). The same steps are run again
//! with `forward`, which re-projects the 1500-row source every step, to show what the cache
//! saves. Both paths must give bit-identical outputs; the last step is also checked against the
//! f64 CPU reference.
//!
//! `cargo run --release --example whisper_decoder [-- --small]` (`--small`: tiny sizes, for CI)

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

/// Seeded Xavier-like weights (±√(3/fan_in)); like Whisper, `k_proj` has no bias.
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
        k_bias: None,
        v_bias: Some(uniform(rng, kv, 0.1)),
        o_bias: Some(uniform(rng, e, 0.1)),
    }
}

fn median(ms: &[f64]) -> f64 {
    let mut s = ms.to_vec();
    s.sort_by(f64::total_cmp);
    let h = s.len() / 2;
    if s.len() % 2 == 0 {
        (s[h - 1] + s[h]) / 2.0
    } else {
        s[h]
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("whisper_decoder: {e}");
        std::process::exit(1);
    }
}

fn run() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let small = match args.as_slice() {
        [] => false,
        [a] if a == "--small" => true,
        _ => return Err("usage: whisper_decoder [--small]".into()),
    };
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
    let weights = random_weights(&config, &mut rng);
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
    let timed = |cached: bool| -> AnyResult<(Vec<f64>, Vec<Vec<f32>>)> {
        let (mut ms, mut outs) = (Vec::new(), Vec::new());
        for q in &queries {
            let start = Instant::now();
            let out = if cached {
                layer.forward_cached(q, &cache, &opts)?
            } else {
                layer.forward(q, &source, &source, &opts)?
            };
            outs.push(out.out.to_host()?);
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok((ms, outs))
    };
    let (cached_ms, cached_out) = timed(true)?;
    let (full_ms, full_out) = timed(false)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (name, ms) in [
        ("with source cache", &cached_ms),
        ("without (re-project)", &full_ms),
    ] {
        println!(
            "per step {name:<21}: median {:8.3} ms, mean {:8.3} ms",
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
    let w = &weights;
    let q = reference::linear(&queries_host[steps - 1], &w.q, w.q_bias.as_deref(), e);
    let k = reference::linear(&encoder, &w.k, w.k_bias.as_deref(), e);
    let v = reference::linear(&encoder, &w.v, w.v_bias.as_deref(), e);
    let d = config.head_dim();
    let shape = AttnShape {
        batch: 1,
        m: 1,
        n,
        q_heads: heads,
        kv_heads: heads,
        d_k: d,
        d_v: d,
    };
    let scale = f64::from(Attention::default().scale_for(d));
    let att = reference::attention_masked(&shape, &q, &k, &v, scale, &Masking::default());
    let want = reference::linear(&att.o, &w.o, w.o_bias.as_deref(), e);
    let got = &cached_out[steps - 1];
    let err = (got.iter().zip(&want))
        .map(|(&g, &r)| (f64::from(g) - r).abs())
        .fold(0.0, f64::max);
    let bound = 1e-3 * want.iter().fold(0.0, |m: f64, x| m.max(x.abs()));
    println!("last step vs f64 reference: max |err| = {err:.2e} (bound {bound:.2e})");
    if err > bound {
        return Err("the output differs from the CPU reference".into());
    }
    Ok(())
}
