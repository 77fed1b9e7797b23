//! `xattn grad`: the gradients of attention on `.npy` files: the forward on the device, then
//! its backward from dO, written as dQ, dK, dV (and dBias) for a comparison with autograd.
//!
//! The inputs, masks and layouts are `xattn run`'s ([`crate::inputs`]); as there, everything
//! that can be checked on the host is checked before a device is opened.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{ArgGroup, Args};
use xattn::{Attention, Context, DType, Engine, Path, Tensor};

use crate::distributed::{self, DistArgs, GradOutputs, ModeArg};
use crate::inputs::{CallArgs, Extra, Loaded, QkvArgs};
use crate::masks::MaskArgs;
use crate::outputs::Outputs;
use crate::precision::{check_range, OutDtype, PrecisionArgs};
use crate::{parse_finite_f32, three_pass_limit, CliError, CliResult};

/// Options of `xattn grad` (layouts and semantics in the subcommand's help in `main.rs`).
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("grads")
        .required(true)
        .multiple(true)
        .args(["dq", "dk", "dv", "dbias"])
))]
pub struct GradArgs {
    #[command(flatten)]
    qkv: QkvArgs,
    /// dO, the gradient of the loss with respect to O: O's shape as `xattn run` writes it,
    /// [batch, M, heads, d_v] (bhsd: [batch, heads, M, d_v]), 3-D for 3-D inputs; float32 or
    /// float16 like q, k, v (it is stored in O's type, see --out-dtype).
    #[arg(long = "d-o", value_name = "FILE")]
    d_o: PathBuf,
    /// Write dQ, like q: [batch, M, heads, d_k] (bhsd: [batch, heads, M, d_k]).
    #[arg(long, value_name = "FILE")]
    dq: Option<PathBuf>,
    /// Write dK, like k: [batch, N, kv_heads, d_k] (bhsd: [batch, kv_heads, N, d_k]); with
    /// GQA/MQA summed over the query heads that share each K/V head.
    #[arg(long, value_name = "FILE")]
    dk: Option<PathBuf>,
    /// Write dV, like v: [batch, N, kv_heads, d_v] (bhsd: [batch, kv_heads, N, d_v]); with
    /// GQA/MQA summed like dK.
    #[arg(long, value_name = "FILE")]
    dv: Option<PathBuf>,
    /// Write dBias (float32), the gradient of --bias in the bias's own shape (that of its file
    /// or --qkv tensor): the gradient of the logits summed over the dims the bias broadcasts
    /// over, as autograd gives bias.grad. Needs a bias.
    #[arg(long, value_name = "FILE")]
    dbias: Option<PathBuf>,
    #[command(flatten)]
    call: CallArgs,
    #[command(flatten)]
    dropout: DropoutArgs,
    #[command(flatten)]
    masks: MaskArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
    /// Type of dQ, dK and dV: same (the inputs' type, after --dtype: a float16 .npy for f16,
    /// float32 for bf16, which numpy lacks) or f32. They are accumulated in f32 either way.
    #[arg(
        long,
        value_enum,
        value_name = "TYPE",
        default_value = "same",
        help_heading = "Precision"
    )]
    grad_dtype: OutDtype,
    #[command(flatten)]
    dist: DistArgs,
}

/// Dropout of the attention weights, forward and backward.
#[derive(Debug, Args)]
#[command(next_help_heading = "Dropout")]
struct DropoutArgs {
    /// Drop each attention weight with probability P (0 ≤ P < 1) and scale the kept ones by
    /// 1/(1 − P), in the forward and the backward alike: the mask is a pure function of
    /// --seed, --offset and (batch, head, row, key) (Philox4x32-10; see the docs of
    /// xattn::dropout), so the backward regenerates the forward's. Its bits are xattn's own:
    /// PyTorch drops other weights for the same seed. P = 0 is the call without dropout.
    #[arg(long, value_name = "P", value_parser = parse_probability)]
    dropout: Option<f32>,
    /// The dropout RNG's key (default 0).
    #[arg(long, value_name = "S", requires = "dropout")]
    seed: Option<u64>,
    /// The dropout RNG's counter offset (default 0): advance it (by at least batch·heads·M·N)
    /// to draw a new mask with the same seed.
    #[arg(long, value_name = "O", requires = "dropout")]
    offset: Option<u64>,
}

/// Parses a dropout probability, 0 ≤ p < 1.
fn parse_probability(s: &str) -> Result<f32, String> {
    let p = parse_finite_f32(s)?;
    if (0.0..1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!(
            "`{s}` is not a dropout probability: P is the chance a weight is dropped, 0 ≤ P < 1"
        ))
    }
}

/// Reads the inputs and dO, runs the forward and the backward on the default adapter (or,
/// with --distributed, across the ranks of `mpirun`), writes the gradients asked for.
pub fn grad(args: &GradArgs) -> CliResult<ExitCode> {
    if args.dist.distributed {
        if args.dbias.is_some() || args.dropout.dropout.is_some() {
            return Err(CliError::usage(
                "--distributed computes dQ, dK and dV: --dbias and --dropout need the whole \
                 source on one device",
            ));
        }
        if args.dist.mode != ModeArg::Lv {
            return Err(CliError::usage(
                "the distributed backward runs LV-XAttn's schedule: --mode lv",
            ));
        }
        let outputs = GradOutputs {
            dq: args.dq.as_ref(),
            dk: args.dk.as_ref(),
            dv: args.dv.as_ref(),
            f32: args.grad_dtype == OutDtype::F32,
        };
        return distributed::grad(|| load(args), &outputs, &args.dist);
    }
    let (mut input, d_o_data, mut opts) = load(args)?;
    let (shape, dtype) = (input.shape, input.dtype);
    if let Some(p) = args.dropout.dropout {
        opts = opts.with_dropout(
            p,
            args.dropout.seed.unwrap_or(0),
            args.dropout.offset.unwrap_or(0),
        );
    }
    if args.dbias.is_some() {
        opts = opts.with_bias_grad();
    }
    if args.grad_dtype == OutDtype::F32 {
        opts = opts.with_grad_dtype(DType::F32);
    }
    let mut outputs = Outputs::create(&[
        ("--dq", args.dq.as_ref()),
        ("--dk", args.dk.as_ref()),
        ("--dv", args.dv.as_ref()),
        ("--dbias", args.dbias.as_ref()),
    ])?;

    let ctx = Context::new()?;
    let engine = Engine::new(&ctx);
    let t0 = Instant::now();
    let qt = input.upload(&ctx, "q", &input.q, shape.q_dims())?;
    let kt = input.upload(&ctx, "k", &input.k, shape.k_dims())?;
    let vt = input.upload(&ctx, "v", &input.v, shape.v_dims())?;
    // The host copies are no longer needed.
    (input.q, input.k, input.v) = Default::default();
    let forward = engine.prepare(&qt, &kt, &vt, &opts).map_err(|e| {
        let forced: Vec<&str> = (args.call.path.0 == Some(Path::ThreePass))
            .then_some("--path three-pass")
            .into_iter()
            .collect();
        three_pass_limit(
            e,
            &forced,
            || opts.request_typed(shape, dtype),
            engine.caps(),
        )
    })?;
    let d_o = Tensor::upload_as(&ctx, "d_o", &d_o_data, &shape.o_dims(), forward.o().dtype())?;
    drop(d_o_data);
    let qkv = (&qt, &kt, &vt);
    let backward = engine.prepare_backward(qkv, (forward.o(), forward.lse()), &d_o, &opts)?;
    if args.call.plan {
        eprintln!("{}", forward.plan());
        eprintln!("{}", engine.plan_backward(qkv, (forward.o(), &d_o), &opts)?);
        for lack in engine.context().degradations() {
            eprintln!("  device {lack}");
        }
    }
    let t_run = Instant::now();
    forward.run()?;
    let forward_ms = t_run.elapsed().as_secs_f64() * 1e3;
    let t_run = Instant::now();
    backward.run()?;
    let backward_ms = t_run.elapsed().as_secs_f64() * 1e3;
    let grads = backward.into_output();

    // Widened to f32 (exactly); f16 gradients are written back as float16.
    for (path, t, dims) in [
        (&args.dq, &grads.dq, shape.q_dims()),
        (&args.dk, &grads.dk, shape.k_dims()),
        (&args.dv, &grads.dv, shape.v_dims()),
    ] {
        if let Some(path) = path {
            let data = input.layout.data(t.to_host()?, dims);
            outputs.write_as(path, &data, &input.file_dims(dims), t.dtype())?;
        }
    }
    if let (Some(path), Some(t), Some(dims)) = (&args.dbias, &grads.dbias, &input.bias_shape) {
        outputs.write(path, &t.to_host()?, dims)?;
    }
    outputs.commit()?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let plan = forward.plan();
    let masks = if plan.masks().is_empty() {
        String::new()
    } else {
        format!(" (masks: {})", plan.masks())
    };
    let mut types = format!("{dtype}");
    if forward.o().dtype() != dtype {
        types += &format!("→{}", forward.o().dtype());
    }
    if grads.dq.dtype() != dtype {
        types += &format!(", gradients {}", grads.dq.dtype());
    }
    eprintln!(
        "xattn: {shape} {types}{masks} on {} via {}: forward {forward_ms:.1} ms, backward \
         {backward_ms:.1} ms, with transfers and writes {total_ms:.1} ms",
        ctx.describe(),
        plan.path().name(),
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads and checks q, k, v, dO and the options (everything that can be checked before a
/// device is opened): the inputs, dO in the inputs' layout made [batch, M, heads, d_v], and
/// the forward's options.
fn load(args: &GradArgs) -> CliResult<(Loaded, Vec<f32>, Attention)> {
    let extras = [Extra {
        flag: "--d-o",
        path: &args.d_o,
    }];
    let mut input = args
        .qkv
        .load(&args.call, &args.masks, &args.precision, &extras)?;
    let (shape, dtype) = (input.shape, input.dtype);
    let d_o = input.extras.pop().expect("dO is read with q, k, v");
    let d_o_shown = input.types[3].0.clone();
    let o_dims = input.file_dims(shape.o_dims());
    if d_o.shape != o_dims {
        let (other, name) = input.other_o_dims();
        let hint = if d_o.shape == other {
            format!("; it is O's shape with --layout {name}: pass --layout {name}")
        } else {
            String::new()
        };
        return Err(CliError::new(format!(
            "{d_o_shown} has shape {:?}; dO has the shape of O, {o_dims:?} ([batch, M, heads, \
             d_v] in --layout {}{}){hint}",
            d_o.shape,
            input.layout.name(),
            if input.squeeze { ", without batch" } else { "" },
        )));
    }
    if args.dbias.is_some() && input.bias_shape.is_none() {
        return Err(CliError::usage(
            "--dbias needs a bias: give --bias (or a `bias` tensor in --qkv); a call without \
             one has no dBias",
        ));
    }
    // dO is stored in O's type: checked against its range, not the inputs'.
    let o_dtype = args.precision.out_dtype().unwrap_or(dtype);
    check_range(&d_o_shown, &d_o.data, &d_o.shape, o_dtype)?;
    let d_o_data = input
        .layout
        .data(d_o.data, input.layout.dims(shape.o_dims()));

    let opts = std::mem::take(&mut input.opts);
    Ok((input, d_o_data, opts))
}
