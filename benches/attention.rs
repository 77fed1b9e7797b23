//! Criterion benchmark of the standard shapes on the planner's default path.
//!
//! `cargo bench --bench attention`. Uses the same shapes as `xattn bench --suite standard`
//! (the list is shared via `#[path]`), except `long`, which takes seconds per run on a
//! software device and would make a criterion sample last minutes. Inputs are uploaded and
//! outputs allocated once per shape; each iteration is one `Prepared::run`, which waits until
//! the device is idle, so the host clock measures completion, not submission.
//! For per-path GPU-timestamp numbers use `xattn bench` instead.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xattn::{Attention, AttnShape, Context, Engine, Prepared};

#[allow(dead_code)] // the CLI uses parts of the suite this bench does not
#[path = "../cli/src/suite.rs"]
mod suite;

/// Uploads seeded inputs in [-1, 1], prepares the call (plan, outputs, bindings), and runs it
/// once untimed (compiling the pipelines and proving that the plan runs on this device).
fn prepare(
    engine: &Engine,
    shape: &AttnShape,
    seed: u64,
    opts: &Attention,
) -> xattn::Result<Prepared> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut upload = |dims: [usize; 4]| {
        let host: Vec<f32> = (0..dims.iter().product())
            .map(|_| rng.random_range(-1.0f32..=1.0))
            .collect();
        engine.upload(&host, &dims)
    };
    let (q, k, v) = (
        upload(shape.q_dims())?,
        upload(shape.k_dims())?,
        upload(shape.v_dims())?,
    );
    // The call reads the inputs at each run; it keeps them alive through its bindings.
    let call = engine.prepare(&q, &k, &v, opts)?;
    call.run()?;
    Ok(call)
}

fn attention(c: &mut Criterion) {
    // No adapter is a normal state of a CI box or a laptop without Vulkan: say so, don't panic.
    let ctx = match Context::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("attention bench skipped: {e}");
            return;
        }
    };
    let engine = Engine::new(&ctx);
    eprintln!("attention bench on {}", ctx.describe());
    let mut group = c.benchmark_group("attention");
    // Flat sampling: runs of hundreds of ms (software devices) would make criterion's default
    // linear sampling take 55 iterations per shape.
    group.sampling_mode(SamplingMode::Flat);
    let opts = Attention::default();
    for (index, s) in suite::standard().into_iter().enumerate() {
        let shape = s.shape;
        let call = match prepare(&engine, &shape, index as u64, &opts) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("attention bench: skipping {} ({shape}): {e}", s.name);
                continue;
            }
        };
        // "elements" are floating-point operations, so criterion's elem/s reads as FLOP/s.
        group.throughput(Throughput::Elements(shape.flops() as u64));
        let name = format!("{} {shape} {}", s.name, call.plan().path().name());
        group.bench_function(name, |b| {
            b.iter(|| call.run().expect("the same run succeeded before timing"))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Each run on a software device takes milliseconds to seconds; keep the bench short.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(6));
    targets = attention
}
criterion_main!(benches);
