//! `xattn run`: attention on `.npy` files (or one safetensors file, `--qkv`).
//!
//! Everything that can be checked on the host (files, dtypes, ranks, shapes, logits f32
//! cannot hold (`logits`), output folders, the `--expect` reference) is checked before a
//! device is opened, so a typo fails in milliseconds rather than after a long run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use xattn::{Context, Engine, Path};

use crate::analytics::AnalyticsArgs;
use crate::distributed::{self, DistArgs, RunInputs};
use crate::expect::ExpectArgs;
use crate::inputs::{out_dims, CallArgs, QkvArgs};
use crate::masks::MaskArgs;
use crate::outputs::Outputs;
use crate::precision::PrecisionArgs;
use crate::{three_pass_limit, CliError, CliResult};

/// Options of `xattn run` (layouts in the subcommand's help in `main.rs`).
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    qkv: QkvArgs,
    /// Output O, [batch, M, heads, d_v] (bhsd: [batch, heads, M, d_v]), 3-D for 3-D inputs.
    /// Optional with --expect.
    #[arg(long, value_name = "FILE", required_unless_present = "expect")]
    out: Option<PathBuf>,
    /// Also write the attention weights P, [batch, heads, M, N] (needs the three-pass path).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Also write the log-sum-exp of each row's scaled logits, [batch, heads, M].
    #[arg(long)]
    lse: Option<PathBuf>,
    #[command(flatten)]
    call: CallArgs,
    #[command(flatten)]
    masks: MaskArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
    #[command(flatten)]
    analytics: AnalyticsArgs,
    #[command(flatten)]
    expect: ExpectArgs,
    #[command(flatten)]
    dist: DistArgs,
}

/// Reads the inputs, runs the plan on the default adapter, writes the outputs; with
/// `--expect`, the exit status says whether O matches.
pub fn run(args: &RunArgs) -> CliResult<ExitCode> {
    if args.dist.distributed {
        if args.weights.is_some() || args.analytics.asked() || args.expect.expect.is_some() {
            return Err(CliError::usage(
                "--distributed writes O and LSE only (--out, --lse): weights, statistics, \
                 heatmaps and --expect need the whole source on one device",
            ));
        }
        let inputs = RunInputs {
            qkv: &args.qkv,
            call: &args.call,
            masks: &args.masks,
            precision: &args.precision,
            out: args.out.as_ref(),
            lse: args.lse.as_ref(),
        };
        return distributed::run(&inputs, &args.dist);
    }
    let mut input = args
        .qkv
        .load(&args.call, &args.masks, &args.precision, &[])?;
    let (shape, dtype, squeeze) = (input.shape, input.dtype, input.squeeze);
    let o_dims = input.file_dims(shape.o_dims());
    let (other_o_dims, other) = input.other_o_dims();
    let expect = args.expect.read(&o_dims, (&other_o_dims, other))?;
    let mut opts = std::mem::take(&mut input.opts);
    if args.weights.is_some() {
        opts = opts.with_weights();
    }
    let opts = args.analytics.apply(opts);
    let mut targets = vec![
        ("--out", args.out.as_ref()),
        ("--lse", args.lse.as_ref()),
        ("--weights", args.weights.as_ref()),
    ];
    targets.extend(args.analytics.targets());
    let mut outputs = Outputs::create(&targets)?;
    let heatmaps = args.analytics.heatmaps(&shape, &mut outputs)?;

    let ctx = Context::new()?;
    let engine = Engine::new(&ctx);
    let t0 = Instant::now();
    let qt = input.upload(&ctx, "q", &input.q, shape.q_dims())?;
    let kt = input.upload(&ctx, "k", &input.k, shape.k_dims())?;
    let vt = input.upload(&ctx, "v", &input.v, shape.v_dims())?;
    // The host copies are no longer needed.
    (input.q, input.k, input.v) = Default::default();
    let call = engine.prepare(&qt, &kt, &vt, &opts).map_err(|e| {
        let forced_by: Vec<&str> = [
            (args.call.path.0 == Some(Path::ThreePass)).then_some("--path three-pass"),
            args.weights.is_some().then_some("--weights"),
        ]
        .into_iter()
        .flatten()
        .collect();
        three_pass_limit(
            e,
            &forced_by,
            || opts.request_typed(shape, dtype),
            engine.caps(),
        )
    })?;
    if args.call.plan {
        eprintln!("{}", call.plan());
        for lack in engine.context().degradations() {
            eprintln!("  device {lack}");
        }
    }
    let t_run = Instant::now();
    call.run()?;
    let run_ms = t_run.elapsed().as_secs_f64() * 1e3;
    let plan = call.plan().clone();
    let out = call.into_output();

    // Widened to f32 (exactly); an f16 O is written back as float16.
    let o = input.layout.data(out.o.to_host()?, shape.o_dims());
    let o_dtype = out.o.dtype();
    if let Some(path) = &args.out {
        outputs.write_as(path, &o, &o_dims, o_dtype)?;
    }
    if let Some(path) = &args.lse {
        outputs.write(
            path,
            &out.lse.to_host()?,
            &out_dims(&shape.lse_dims(), squeeze),
        )?;
    }
    if let Some(path) = &args.weights {
        let w = out.weights.as_ref().ok_or_else(|| {
            CliError::new(format!(
                "the {} plan returned no weights",
                plan.path().name()
            ))
        })?;
        outputs.write(
            path,
            &w.to_host()?,
            &out_dims(&shape.weights_dims(), squeeze),
        )?;
    }
    args.analytics
        .write(&mut outputs, &out.stats, &shape, squeeze)?;
    let maps = match (&heatmaps, &out.stats.pooled) {
        (Some(maps), Some(pooled)) => Some((maps, maps.write(&mut outputs, &shape, pooled, None)?)),
        (Some(_), None) => return Err(CliError::new("the plan computed no heatmap")),
        (None, _) => None,
    };
    outputs.commit()?;
    if let Some((maps, count)) = maps {
        eprintln!(
            "xattn: wrote {count} heatmap(s) to {}",
            maps.dir().display()
        );
    }
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let masks = if plan.masks().is_empty() {
        String::new()
    } else {
        format!(" (masks: {})", plan.masks())
    };
    // The shape shows GQA as `H8/2` (query heads / K/V heads).
    let types = if o_dtype == dtype {
        format!("{dtype}")
    } else {
        format!("{dtype}→{o_dtype}")
    };
    eprintln!(
        "xattn: {shape} {types}{masks} on {} via {}: attention {run_ms:.1} ms, with transfers and writes {total_ms:.1} ms",
        ctx.describe(),
        plan.path().name(),
    );
    Ok(expect.map_or(ExitCode::SUCCESS, |e| e.check(&o)))
}
