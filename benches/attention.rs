//! Criterion benchmark of the standard shapes on the planner's default path.
//!
//! `cargo bench --bench attention`. Uses the same shapes as `xattn bench --suite standard`
//! (the list is shared via `#[path]`), except `long`, which takes seconds per run on a
//! software device and would make a criterion sample last minutes. Inputs are uploaded and
//! outputs allocated once per shape; each iteration is one `Engine::run`, which waits until
//! the device is idle, so the host clock measures completion, not submission.
//! For per-path GPU-timestamp numbers use `xattn bench` instead.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xattn::{Attention, AttnShape, Context, Engine, MaskInputs, Output, Plan, Tensor};

#[allow(dead_code)] // the CLI uses parts of the suite this bench does not
#[path = "../src/bin/xattn/suite.rs"]
mod suite;

/// Device inputs, plan and preallocated outputs of one shape.
struct Prepared {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    masks: MaskInputs,
    plan: Plan,
    out: Output,
}

/// Uploads seeded inputs in [-1, 1], plans, allocates, and runs once untimed (compiling the
/// pipelines and proving that the plan runs on this device).
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
    let plan = engine.plan(&q, &k, &v, opts)?;
    let masks = engine.upload_masks(&plan, opts)?;
    let out = engine.alloc_output(&plan)?;
    engine.run(&plan, &q, &k, &v, &masks, &out, None)?;
    Ok(Prepared {
        q,
        k,
        v,
        masks,
        plan,
        out,
    })
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
        let Prepared {
            q,
            k,
            v,
            masks,
            plan,
            out,
        } = match prepare(&engine, &shape, index as u64, &opts) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("attention bench: skipping {} ({shape}): {e}", s.name);
                continue;
            }
        };
        // "elements" are floating-point operations, so criterion's elem/s reads as FLOP/s.
        group.throughput(Throughput::Elements(shape.flops() as u64));
        group.bench_function(format!("{} {shape} {}", s.name, plan.path.name()), |b| {
            b.iter(|| {
                engine
                    .run(&plan, &q, &k, &v, &masks, &out, None)
                    .expect("the same run succeeded before timing")
            })
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
