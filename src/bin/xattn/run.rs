//! `xattn run`: attention on `.npy` files.
//!
//! Everything that can be checked on the host (files, dtypes, ranks, shapes, output folders)
//! is checked before a device is opened, so a typo fails in milliseconds rather than after
//! a long run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use xattn::{Attention, AttnShape, Context, Engine, Path};

use crate::masks::MaskArgs;
use crate::npy::{read_f32, Array};
use crate::outputs::Outputs;
use crate::{
    parse_finite_f32, parse_path_choice, three_pass_limit, CliError, CliResult, PathChoice,
};

/// Options of `xattn run` (layouts in the subcommand's help in `main.rs`).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Queries, [batch, M, heads, d_k] or [M, heads, d_k].
    #[arg(long)]
    q: PathBuf,
    /// Keys, [batch, N, kv_heads, d_k] or [N, kv_heads, d_k].
    #[arg(long)]
    k: PathBuf,
    /// Values, [batch, N, kv_heads, d_v] or [N, kv_heads, d_v].
    #[arg(long)]
    v: PathBuf,
    /// Output O, [batch, M, heads, d_v] ([M, heads, d_v] for 3-D inputs).
    #[arg(long)]
    out: PathBuf,
    /// Also write the attention weights P, [batch, heads, M, N] (needs the three-pass path).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Also write the log-sum-exp of each row's scaled logits, [batch, heads, M].
    #[arg(long)]
    lse: Option<PathBuf>,
    /// Logit scale; default 1/sqrt(d_k).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_finite_f32)]
    scale: Option<f32>,
    /// Kernel path: auto (the planner's choice), three-pass, fused or split-k.
    #[arg(long, default_value = "auto", value_parser = parse_path_choice)]
    path: PathChoice,
    /// Print the plan (path, tiles, splits, buffers) to stderr before running.
    #[arg(long)]
    plan: bool,
    #[command(flatten)]
    masks: MaskArgs,
}

/// Q, K or V as `[batch, seq, heads, dim]`, and whether the file had no batch axis.
fn as_4d(name: &str, a: &Array) -> CliResult<([usize; 4], bool)> {
    match *a.shape.as_slice() {
        [s, h, d] => Ok(([1, s, h, d], true)),
        [b, s, h, d] => Ok(([b, s, h, d], false)),
        ref other => Err(CliError::new(format!(
            "{name} must have 3 dims [seq, heads, d] or 4 dims [batch, seq, heads, d], got shape {other:?}"
        ))),
    }
}

/// Drops the leading batch axis of `dims` (which is 1) when the inputs had none.
pub fn out_dims(dims: &[usize], squeeze: bool) -> Vec<usize> {
    if squeeze {
        dims[1..].to_vec()
    } else {
        dims.to_vec()
    }
}

/// Reads the inputs, runs the plan on the default adapter, writes the outputs.
pub fn run(args: &RunArgs) -> CliResult<ExitCode> {
    let q = read_f32(&args.q)?;
    let k = read_f32(&args.k)?;
    let v = read_f32(&args.v)?;
    let (q_dims, q3) = as_4d("q", &q)?;
    let (k_dims, k3) = as_4d("k", &k)?;
    let (v_dims, v3) = as_4d("v", &v)?;
    if q3 != k3 || q3 != v3 {
        return Err(CliError::new(format!(
            "q, k and v must all be 3-D or all 4-D, got shapes {:?}, {:?}, {:?}",
            q.shape, k.shape, v.shape
        )));
    }
    let squeeze = q3;
    let shape = AttnShape::from_qkv(q_dims, k_dims, v_dims)?;
    let mut opts = Attention::default().with_path_choice(args.path.0);
    if let Some(s) = args.scale {
        opts = opts.with_scale(s);
    }
    if args.weights.is_some() {
        opts = opts.with_weights();
    }
    let opts = args.masks.apply(opts, &shape)?;
    let mut outputs = Outputs::create(&[
        ("--out", Some(&args.out)),
        ("--lse", args.lse.as_ref()),
        ("--weights", args.weights.as_ref()),
    ])?;

    let ctx = Context::new()?;
    let engine = Engine::new(&ctx);
    let t0 = Instant::now();
    let qt = engine.upload(&q.data, &q_dims)?;
    let kt = engine.upload(&k.data, &k_dims)?;
    let vt = engine.upload(&v.data, &v_dims)?;
    drop((q, k, v));
    let plan = engine.plan(&qt, &kt, &vt, &opts).map_err(|e| {
        let forced_by: Vec<&str> = [
            (args.path.0 == Some(Path::ThreePass)).then_some("--path three-pass"),
            args.weights.is_some().then_some("--weights"),
        ]
        .into_iter()
        .flatten()
        .collect();
        three_pass_limit(e, &forced_by, || opts.request(shape), engine.caps())
    })?;
    if args.plan {
        eprintln!("{plan}");
    }
    let masks = engine.upload_masks(&plan, &opts)?;
    let out = engine.alloc_output(&plan)?;
    let t_run = Instant::now();
    engine.run(&plan, &qt, &kt, &vt, &masks, &out, None)?;
    let run_ms = t_run.elapsed().as_secs_f64() * 1e3;

    outputs.write(
        &args.out,
        &out.o.to_host()?,
        &out_dims(&shape.o_dims(), squeeze),
    )?;
    if let Some(path) = &args.lse {
        outputs.write(
            path,
            &out.lse.to_host()?,
            &out_dims(&shape.lse_dims(), squeeze),
        )?;
    }
    if let Some(path) = &args.weights {
        let w = out.weights.as_ref().ok_or_else(|| {
            CliError::new(format!("the {} plan returned no weights", plan.path.name()))
        })?;
        outputs.write(
            path,
            &w.to_host()?,
            &out_dims(&shape.weights_dims(), squeeze),
        )?;
    }
    outputs.commit()?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let masks = if plan.masks.is_empty() {
        String::new()
    } else {
        format!(" (masks: {})", plan.masks)
    };
    // The shape shows GQA as `H8/2` (query heads / K/V heads).
    eprintln!(
        "xattn: {shape}{masks} on {} via {}: attention {run_ms:.1} ms, with transfers and writes {total_ms:.1} ms",
        ctx.describe(),
        plan.path.name(),
    );
    Ok(ExitCode::SUCCESS)
}
