//! `xattn run`: attention on `.npy` files (or one safetensors file, `--qkv`).
//!
//! Everything that can be checked on the host (files, dtypes, ranks, shapes, logits f32
//! cannot hold (`logits`), output folders, the `--expect` reference) is checked before a
//! device is opened, so a typo fails in milliseconds rather than after a long run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use xattn::{Attention, Context, Engine, Path, Tensor};

use crate::analytics::AnalyticsArgs;
use crate::expect::ExpectArgs;
use crate::layout::Layout;
use crate::logits::{check_logits, Heads};
use crate::masks::MaskArgs;
use crate::npy::{read_floats, Source};
use crate::outputs::Outputs;
use crate::precision::{check_range, PrecisionArgs};
use crate::qkv::Bundle;
use crate::{
    parse_finite_f32, parse_path_choice, three_pass_limit, CliError, CliResult, PathChoice,
};

/// Options of `xattn run` (layouts in the subcommand's help in `main.rs`).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Queries, [batch, M, heads, d_k] (bhsd: [batch, heads, M, d_k]); 3-D without batch.
    #[arg(long, value_name = "FILE", required_unless_present = "qkv")]
    q: Option<PathBuf>,
    /// Keys, [batch, N, kv_heads, d_k] (bhsd: [batch, kv_heads, N, d_k]); 3-D without batch.
    #[arg(long, value_name = "FILE", required_unless_present = "qkv")]
    k: Option<PathBuf>,
    /// Values, [batch, N, kv_heads, d_v] (bhsd: [batch, kv_heads, N, d_v]); 3-D without batch.
    #[arg(long, value_name = "FILE", required_unless_present = "qkv")]
    v: Option<PathBuf>,
    /// Q, K and V from one safetensors file, instead of --q, --k, --v: tensors named q, k, v,
    /// and optionally mask, bias, q_lens, kv_lens (each as its flag takes it), as
    /// safetensors.torch.save_file({"q": q, "k": k, "v": v}, path) writes them. No other name
    /// is allowed; .npz is not read.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["q", "k", "v"])]
    qkv: Option<PathBuf>,
    /// Axis order of Q, K, V and O: bshd [batch, seq, heads, d] (default) or bhsd [batch,
    /// heads, seq, d], PyTorch scaled_dot_product_attention's (3-D files drop batch either
    /// way). Weights, LSE and masks are [batch, heads, ...] in both. A shape cannot show its
    /// layout: where q, k, v fit only the other layout the error says so, but where they fit
    /// both (e.g. equal lengths and head counts) a wrong layout gives wrong numbers with no
    /// error; without --layout a note then asks to name it.
    #[arg(long, value_enum, value_name = "LAYOUT")]
    layout: Option<Layout>,
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
    #[command(flatten)]
    precision: PrecisionArgs,
    #[command(flatten)]
    analytics: AnalyticsArgs,
    #[command(flatten)]
    expect: ExpectArgs,
}

/// Drops the leading batch axis of `dims` (which is 1) when the inputs had none.
pub fn out_dims(dims: &[usize], squeeze: bool) -> Vec<usize> {
    if squeeze {
        dims[1..].to_vec()
    } else {
        dims.to_vec()
    }
}

/// Reads the inputs, runs the plan on the default adapter, writes the outputs; with
/// `--expect`, the exit status says whether O matches.
pub fn run(args: &RunArgs) -> CliResult<ExitCode> {
    let bundle = args.qkv.as_deref().map(Bundle::read).transpose()?;
    let mut types = Vec::new();
    let mut read = |name: &str, path: Option<&PathBuf>| {
        let src = match (&bundle, path) {
            (Some(bundle), _) => bundle.required(name)?,
            (None, Some(path)) => Source::from(path),
            (None, None) => unreachable!("clap requires --{name} without --qkv"),
        };
        let shown = match &src {
            Source::File(path) => format!("--{name} {}", path.display()),
            Source::Tensor { shown, .. } => shown.clone(),
        };
        let (array, dtype) = read_floats(src)?;
        types.push((shown, dtype));
        CliResult::Ok(array)
    };
    let (q, k, v) = (
        read("q", args.q.as_ref())?,
        read("k", args.k.as_ref())?,
        read("v", args.v.as_ref())?,
    );
    let dtype = args.precision.input_dtype(&types)?;
    for ((shown, _), x) in types.iter().zip([&q, &k, &v]) {
        check_range(shown, &x.data, &x.shape, dtype)?;
    }
    let layout = args.layout.unwrap_or_default();
    let (q_file, q3) = layout.file_dims("q", &q.shape)?;
    let (k_file, k3) = layout.file_dims("k", &k.shape)?;
    let (v_file, v3) = layout.file_dims("v", &v.shape)?;
    if q3 != k3 || q3 != v3 {
        return Err(CliError::new(format!(
            "q, k and v must all be 3-D or all 4-D, got shapes {:?}, {:?}, {:?}",
            q.shape, k.shape, v.shape
        )));
    }
    let squeeze = q3;
    let shape = layout.attn_shape([q_file, k_file, v_file], args.layout.is_some())?;
    let o_dims = out_dims(&layout.dims(shape.o_dims()), squeeze);
    let other = layout.other();
    let other_o_dims = out_dims(&other.dims(shape.o_dims()), squeeze);
    let expect = args.expect.read(&o_dims, (&other_o_dims, other.name()))?;
    let mut opts = Attention::default().with_path_choice(args.path.0);
    if let Some(out) = args.precision.out_dtype() {
        opts = opts.with_out_dtype(out);
    }
    if let Some(s) = args.scale {
        opts = opts.with_scale(s);
    }
    if args.weights.is_some() {
        opts = opts.with_weights();
    }
    let opts = args.masks.apply_with(opts, &shape, bundle.as_ref())?;
    let opts = args.analytics.apply(opts);
    drop(bundle);
    // Batch and seq first, as the device reads them; logits that f32 cannot hold are refused
    // here, before a device is opened.
    let (q_data, k_data) = (layout.data(q.data, q_file), layout.data(k.data, k_file));
    check_logits(
        &Heads {
            shown: &types[0].0,
            data: &q_data,
            dims: shape.q_dims(),
        },
        &Heads {
            shown: &types[1].0,
            data: &k_data,
            dims: shape.k_dims(),
        },
        &opts,
    )?;
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
    // Half files hold values their type represents: uploading them as it is exact.
    let upload =
        |name, data: &[f32], dims: [usize; 4]| Tensor::upload_as(&ctx, name, data, &dims, dtype);
    let qt = upload("q", &q_data, shape.q_dims())?;
    let kt = upload("k", &k_data, shape.k_dims())?;
    drop((q_data, k_data));
    let vt = upload("v", &layout.data(v.data, v_file), shape.v_dims())?;
    let call = engine.prepare(&qt, &kt, &vt, &opts).map_err(|e| {
        let forced_by: Vec<&str> = [
            (args.path.0 == Some(Path::ThreePass)).then_some("--path three-pass"),
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
    if args.plan {
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
    let o = layout.data(out.o.to_host()?, shape.o_dims());
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
