//! `xattn mha`: a multi-head attention layer (PyTorch `nn.MultiheadAttention`, the
//! cross-attention of Hugging Face and diffusers models; batch first) on `.npy` inputs, its
//! weights read from a safetensors file.
//!
//! As in `xattn run`, everything that can be checked on the host is checked before a device is
//! opened: the inputs' shapes against each other, the head counts against the layer's inner
//! width (read from the weights file), the weights file against the sizes the inputs imply (the
//! loader reads the file on the host), the tensors under the prefix that the layer does not
//! read (refused unless `--ignore-tensors` names them), the key padding mask, the masks, the
//! logits of the projected query and key (refused where f32 cannot hold them: `logits`) and
//! the output folders. Errors name the flag and file they come from.

use std::io::Read;
use std::path::{Path as FsPath, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use xattn::mha::weights::{LayerFile, Names};
use xattn::Request;
use xattn::{
    Attention, Context, DType, Engine, MhaConfig, MhaOptions, MultiHeadAttention, NeedWeights,
    Tensor,
};

use crate::analytics::AnalyticsArgs;
use crate::inputs::out_dims;
use crate::layout::SeqLayout;
use crate::logits::{check_layer_logits, LayerInput};
use crate::masks::MaskArgs;
use crate::npy::{read_bool_as, read_floats, Array, Polarity};
use crate::outputs::Outputs;
use crate::precision::{check_range, PrecisionArgs};
use crate::{open_file, parse_finite_f32, three_pass_limit, CliError, CliResult};

/// Which names each model saves and whether it scales its logits, shown after `xattn mha --help`.
const MODELS: &str = "\
Models (--names is detected from the names under --prefix; pass it when a prefix holds several):
  PyTorch nn.MultiheadAttention  --names pytorch    in_proj_weight [3E, E] or q_proj_weight,
      k_proj_weight, v_proj_weight; in_proj_bias; out_proj.weight, out_proj.bias. Scale 1/sqrt(d).
  Whisper, BART (Hugging Face)   --names hf         q_proj, k_proj, v_proj, out_proj (.weight,
      .bias where saved), e.g. --prefix model.decoder.layers.0.encoder_attn. Scale 1/sqrt(d).
  diffusers Attention            --names diffusers  to_q, to_k, to_v (usually unbiased), to_out.0,
      e.g. --prefix down_blocks.1.attentions.0.transformer_blocks.0.attn2. Scale 1/sqrt(d).
  T5, MT5 (Hugging Face)         --names t5         q, k, v, o (no biases), e.g. --prefix
      decoder.block.0.layer.1.EncDecAttention. Scale 1: T5 does not scale its logits (its
      query projection is initialised to absorb 1/sqrt(d)), so without --scale a T5 layer runs
      at scale 1, with a note saying so.
The inner width (heads x head dim) is the rows of the query projection, so layers where it
differs from E (T5 v1.1, some diffusers blocks) load as saved; --heads must divide it.";

/// Options of `xattn mha` (layouts in the subcommand's help in `main.rs`, models in [`MODELS`]).
#[derive(Debug, Args)]
#[command(after_long_help = MODELS)]
pub struct MhaArgs {
    /// Layer weights: a safetensors file (f32, f16 or bf16 tensors) with PyTorch, Hugging Face,
    /// diffusers or T5 names under --prefix.
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    /// What precedes the layer's tensor names in the file, trailing dot included, e.g.
    /// `model.decoder.layers.0.encoder_attn.`. Default: none.
    #[arg(long, value_name = "P", default_value = "", hide_default_value = true)]
    prefix: String,
    /// The names to read under --prefix: pytorch, hf, diffusers or t5. Default: the one family
    /// whose query projection is there (needed only when a prefix holds more than one).
    #[arg(long, value_name = "SET")]
    names: Option<Names>,
    /// Load the layer without these tensors under --prefix (names after the prefix, or in
    /// full; comma-separated or repeated). A tensor under the prefix that the layer does not
    /// read (nn.MultiheadAttention's bias_k and bias_v, diffusers' norm_q, norm_k and
    /// norm_cross, T5's relative_attention_bias, any name xattn does not know) changes what the
    /// model computes, so a file holding one is refused, naming each, unless it is named here;
    /// the output then differs from the model's, and a note says what was ignored. A name that
    /// is not such a tensor of the file is an error.
    #[arg(long, value_name = "NAME[,NAME]", value_delimiter = ',')]
    ignore_tensors: Vec<String>,
    /// Query heads; the inner width (rows of the query projection in --weights: E in most
    /// models) must be a multiple of it. Head dim = inner width / H.
    #[arg(long, value_name = "H", value_parser = positive)]
    heads: usize,
    /// Key/value heads (GQA/MQA: the K and V projections output N · head dim features); must
    /// divide --heads. Default: --heads.
    #[arg(long, value_name = "N", value_parser = positive)]
    kv_heads: Option<usize>,
    /// Ignore the biases in --weights: the layer adds none. Without it each projection adds the
    /// bias the file holds for it, if any.
    #[arg(long)]
    no_bias: bool,
    /// Axis order of the 3-D inputs and output: bse [batch, seq, features] (the default:
    /// PyTorch batch_first=True, Hugging Face, diffusers) or sbe [seq, batch, features],
    /// nn.MultiheadAttention's default (batch_first=False); batch-first and seq-first name
    /// them too. 2-D inputs are the same in both. --need-weights, --key-padding-mask and the
    /// statistics are batch first in both, as in PyTorch. A shape cannot show its layout: where
    /// the inputs fit only the other layout the error says so, but where they fit both (e.g.
    /// self-attention) a wrong layout gives wrong numbers with no error; without --layout a
    /// note then asks to name it.
    #[arg(long, value_enum, value_name = "LAYOUT")]
    layout: Option<SeqLayout>,
    /// Query input, float32 or float16 [batch, M, E] or [M, E].
    #[arg(long, value_name = "FILE")]
    query: PathBuf,
    /// Key input, float32 or float16 [batch, N, kdim] or [N, kdim].
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Value input, float32 or float16 [batch, N, vdim] or [N, vdim].
    #[arg(long, value_name = "FILE")]
    value: PathBuf,
    /// Output, [batch, M, E] ([M, E] for 2-D inputs).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Also write the attention weights averaged over heads, [batch, M, N] ([M, N] for 2-D
    /// inputs); PyTorch need_weights=True. Forces the three-pass attention path.
    #[arg(long, value_name = "FILE")]
    need_weights: Option<PathBuf>,
    /// With --need-weights: write the weights of every head instead, [batch, H, M, N]
    /// ([H, M, N] for 2-D inputs); PyTorch average_attn_weights=False.
    #[arg(long, requires = "need_weights")]
    per_head_weights: bool,
    /// PyTorch's key_padding_mask: bool [batch, N] ([N] for 2-D inputs), where true = ignore
    /// that key (PyTorch's polarity, the opposite of --mask and of Hugging Face's
    /// attention_mask, which --attention-mask takes as it is). An integer 0/1 array is refused:
    /// it does not say which is which. Cannot be combined with --mask or --attention-mask: fold
    /// it into the mask file instead.
    #[arg(long, value_name = "FILE")]
    key_padding_mask: Option<PathBuf>,
    /// Logit scale; default 1/sqrt(head dim), as in PyTorch MHA, Whisper, BART and diffusers,
    /// but 1 for a layer under T5 names (T5 and MT5 do not scale their logits; a note says so).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_finite_f32)]
    scale: Option<f32>,
    #[command(flatten)]
    masks: MaskArgs,
    // --dtype also sets the type the layer's weights are kept in on the device.
    #[command(flatten)]
    precision: PrecisionArgs,
    /// Statistics per head, [batch, H, M] or [batch, H, N].
    #[command(flatten)]
    analytics: AnalyticsArgs,
}

/// Parses a count ≥ 1.
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a positive integer")),
    }
}

/// One input file: its array, its dims as `[batch, seq, features]`, and the flag it came from.
struct Input<'a> {
    flag: &'static str,
    path: &'a FsPath,
    array: Array,
    /// The type the file stores.
    dtype: DType,
    /// The file's dims, `[1, seq, features]` for a 2-D file.
    file: [usize; 3],
    /// `[batch, seq, features]`, once the layout is known ([`Input::read_as`]).
    dims: [usize; 3],
    /// The file had no batch axis.
    two_d: bool,
}

impl<'a> Input<'a> {
    fn read(flag: &'static str, path: &'a FsPath, features: &str) -> CliResult<Self> {
        let (array, dtype) = read_floats(path)?;
        let shown = path.display();
        let (file, two_d) = match *array.shape.as_slice() {
            [s, f] => ([1, s, f], true),
            [x, y, f] => ([x, y, f], false),
            ref other => {
                return Err(CliError::new(format!(
                    "{flag} {shown} has shape {other:?}; it must be [batch, seq, {features}] \
                     (seq first with --layout sbe: [seq, batch, {features}]) or [seq, \
                     {features}]"
                )))
            }
        };
        if array.shape.contains(&0) {
            return Err(CliError::new(format!(
                "{flag} {shown} has shape {:?}; every dim must be at least 1",
                array.shape
            )));
        }
        Ok(Self {
            flag,
            path,
            array,
            dtype,
            file,
            dims: file,
            two_d,
        })
    }

    /// `[batch, seq, features]` of this input read in `layout`.
    fn dims_as(&self, layout: SeqLayout) -> [usize; 3] {
        if self.two_d {
            self.file
        } else {
            layout.dims(self.file)
        }
    }

    /// Reads this input in `layout`: its dims, and its data batch first.
    fn read_as(&mut self, layout: SeqLayout) {
        self.dims = self.dims_as(layout);
        if !self.two_d {
            let data = std::mem::take(&mut self.array.data);
            self.array.data = layout.data(data, self.file);
        }
    }

    /// `--flag file (shape [..])`, for messages.
    fn describe(&self) -> String {
        format!(
            "{} {} (shape {:?})",
            self.flag,
            self.path.display(),
            self.array.shape
        )
    }
}

/// How query, key and value fail to agree in batch or N when read in `layout`: whether it is
/// the batch that differs, and the message.
fn axes_disagree(inputs: [&Input; 3], layout: SeqLayout) -> Option<(bool, String)> {
    let [q, k, v] = inputs;
    let [qd, kd, vd] = inputs.map(|x| x.dims_as(layout));
    for ((a, da), (b, db), axis, what) in [
        ((q, qd), (k, kd), 0, "batch"),
        ((q, qd), (v, vd), 0, "batch"),
        ((k, kd), (v, vd), 1, "N (the number of keys)"),
    ] {
        if da[axis] != db[axis] {
            return Some((
                axis == 0,
                format!(
                    "{} and {} differ in {what}: {} vs {}",
                    a.describe(),
                    b.describe(),
                    da[axis],
                    db[axis]
                ),
            ));
        }
    }
    None
}

/// A hint for a layer not found under `prefix`: a prefix missing its dot, or several name
/// families to choose from. Empty when none applies.
fn open_hint(bytes: &[u8], prefix: &str, names: Option<Names>) -> String {
    let opens = |prefix: &str, names| LayerFile::open(bytes, prefix, names).is_ok();
    if !prefix.is_empty() && !prefix.ends_with('.') && opens(&format!("{prefix}."), names) {
        return format!(" (did you mean --prefix `{prefix}.`? the prefix ends with the dot)");
    }
    let families: Vec<&str> = Names::ALL
        .into_iter()
        .filter(|&n| names.is_none() && opens(prefix, Some(n)))
        .map(Names::as_str)
        .collect();
    if families.len() > 1 {
        return format!(" (choose one with --names {})", families.join("|"));
    }
    String::new()
}

/// Reads the `--weights` file on the host.
fn read_weights(path: &FsPath) -> CliResult<Vec<u8>> {
    let (mut file, len) = open_file(path)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.read_to_end(&mut bytes)
        .map_err(|e| CliError::new(format!("cannot read --weights {}: {e}", path.display())))?;
    Ok(bytes)
}

/// A failure reading the layer from `--weights`, with the prefix and, once the sizes are
/// known, which input each came from; `hint` follows the message.
fn weights_error(
    args: &MhaArgs,
    config: Option<&MhaConfig>,
    e: xattn::Error,
    hint: &str,
) -> CliError {
    let prefix = if args.prefix.is_empty() {
        "no prefix".to_string()
    } else {
        format!("prefix `{}`", args.prefix)
    };
    let sizes = config.map_or(String::new(), |c| {
        format!(
            "; E {} from --query, kdim {} from --key, vdim {} from --value, inner width {} from \
             the file, {} heads{}{}",
            c.embed_dim,
            c.kdim,
            c.vdim,
            c.inner_dim,
            c.num_heads,
            if c.kv_heads == c.num_heads {
                String::new()
            } else {
                format!(" / {} kv heads", c.kv_heads)
            },
            if c.bias { "" } else { ", --no-bias" },
        )
    });
    CliError::new(format!(
        "--weights {} ({prefix}{sizes}): {e}{hint}",
        args.weights.display()
    ))
}

/// Reads `--key-padding-mask` and checks it is `[batch, N]` (or `[N]` for 2-D inputs).
fn key_padding_mask(path: &FsPath, batch: usize, n: usize, two_d: bool) -> CliResult<Vec<bool>> {
    let a = read_bool_as(path, Polarity::IgnoreKey)?;
    if a.shape == [batch, n] || (two_d && a.shape == [n]) {
        return Ok(a.data);
    }
    Err(CliError::new(format!(
        "--key-padding-mask {} has shape {:?}; it must be [batch, N] = [{batch}, {n}]{} \
         (batch from --query, N from --key; true = ignore that key)",
        path.display(),
        a.shape,
        if two_d {
            format!(" or [N] = [{n}]")
        } else {
            String::new()
        }
    )))
}

/// Checks that query, key and value agree in batch and N in the layout `named` (else the
/// default). An error says which layout they were read in, and points to the other when they
/// fit it (or, for a batch that differs, names seq first anyway); when they fit both and no
/// layout was named, a note on stderr says so.
fn read_layout(named: Option<SeqLayout>, inputs: [&Input; 3]) -> CliResult<()> {
    let layout = named.unwrap_or_default();
    let other = layout.other();
    let three_d = !inputs[0].two_d;
    let shapes = |l: SeqLayout| {
        let [q, k, _] = inputs.map(|x| x.dims_as(l));
        format!("batch {}, M {}, N {}", q[0], q[1], k[1])
    };
    let pass = |l: SeqLayout| {
        format!(
            "pass --layout {} (nn.MultiheadAttention's default, batch_first=False, is seq \
             first: sbe), or give batch-first arrays (x.transpose(0, 1))",
            l.name()
        )
    };
    let read_as = format!("read as --layout {} {}", layout.name(), layout.axes());
    match (
        axes_disagree(inputs, layout),
        three_d.then(|| axes_disagree(inputs, other)),
    ) {
        (None, Some(None)) if named.is_none() => {
            eprintln!(
                "xattn: note: query, key, value fit both layouts ({}: {}; {}: {}); reading \
                 the default, {}: pass --layout to say which (nn.MultiheadAttention without \
                 batch_first=True takes sbe)",
                layout.name(),
                shapes(layout),
                other.name(),
                shapes(other),
                layout.name()
            );
            Ok(())
        }
        (None, _) => Ok(()),
        (Some((_, e)), Some(None)) => Err(CliError::new(format!(
            "{e} ({read_as}); they fit --layout {} {}: {}",
            other.name(),
            other.axes(),
            pass(other)
        ))),
        (Some((true, e)), Some(Some(_))) if layout == SeqLayout::Bse => {
            Err(CliError::new(format!(
                "{e} ({read_as}); for seq-first arrays [seq, batch, features] {}",
                pass(SeqLayout::Sbe)
            )))
        }
        (Some((_, e)), _) => Err(CliError::new(format!("{e} ({read_as})"))),
    }
}

/// Reads the inputs and weights, runs the layer on the default adapter, writes the outputs.
pub fn mha(args: &MhaArgs) -> CliResult<ExitCode> {
    let mut q = Input::read("--query", &args.query, "E")?;
    let mut k = Input::read("--key", &args.key, "kdim")?;
    let mut v = Input::read("--value", &args.value, "vdim")?;
    if q.two_d != k.two_d || q.two_d != v.two_d {
        return Err(CliError::new(format!(
            "--query, --key and --value must all be 3-D [batch, seq, features] or all 2-D \
             [seq, features], got {}, {}, {}",
            q.describe(),
            k.describe(),
            v.describe()
        )));
    }
    let layout = args.layout.unwrap_or_default();
    read_layout(args.layout, [&q, &k, &v])?;
    for x in [&mut q, &mut k, &mut v] {
        x.read_as(layout);
    }
    let dtype = args.precision.input_dtype(
        &[&q, &k, &v].map(|x| (format!("{} {}", x.flag, x.path.display()), x.dtype)),
    )?;
    for x in [&q, &k, &v] {
        let shown = format!("{} {}", x.flag, x.path.display());
        check_range(&shown, &x.array.data, &x.array.shape, dtype)?;
    }
    let squeeze = q.two_d;
    let ([batch, m, e], [_, n, kdim], vdim) = (q.dims, k.dims, v.dims[2]);

    let bytes = read_weights(&args.weights)?;
    let mut file = LayerFile::open(&bytes, &args.prefix, args.names)
        .map_err(|e| weights_error(args, None, e, &open_hint(&bytes, &args.prefix, args.names)))?;
    file.ignore(&args.ignore_tensors)
        .and_then(|()| file.check_unread())
        .map_err(|e| weights_error(args, None, e, ""))?;
    if !file.ignored().is_empty() {
        let ignored: Vec<String> = file
            .ignored()
            .iter()
            .map(|u| match u.what {
                Some(what) => format!("{} ({what})", u.name),
                None => u.name.clone(),
            })
            .collect();
        eprintln!(
            "xattn: note: --ignore-tensors: the layer runs without {}; its output differs from \
             the model's wherever they take part",
            ignored.join(", ")
        );
    }
    let inner = file.inner_dim();
    let heads = args.heads;
    let kv_heads = args.kv_heads.unwrap_or(heads);
    if inner % heads != 0 {
        return Err(CliError::new(format!(
            "--heads {heads} does not divide the inner width {inner} of the layer in --weights {} \
             (heads × head dim; E = {e} from {})",
            args.weights.display(),
            q.describe()
        )));
    }
    if !heads.is_multiple_of(kv_heads) {
        return Err(CliError::usage(format!(
            "--kv-heads {kv_heads} does not divide --heads {heads}"
        )));
    }
    let config = MhaConfig::new(e, heads)
        .with_inner_dim(inner)
        .with_kv_heads(kv_heads)
        .with_kdim(kdim)
        .with_vdim(vdim)
        .with_bias(!args.no_bias);
    let weights = file
        .weights(&config)
        .map_err(|e| weights_error(args, Some(&config), e, ""))?;
    let names = file.names();
    drop(file);
    drop(bytes);
    // The layer is kept on the device in the inputs' type: its weights must fit it too.
    for (name, w) in [
        ("W_q", Some(&weights.q)),
        ("W_k", Some(&weights.k)),
        ("W_v", Some(&weights.v)),
        ("W_o", Some(&weights.o)),
        ("b_q", weights.q_bias.as_ref()),
        ("b_k", weights.k_bias.as_ref()),
        ("b_v", weights.v_bias.as_ref()),
        ("b_o", weights.o_bias.as_ref()),
    ] {
        if let Some(w) = w {
            let shown = format!("{name} of --weights {}", args.weights.display());
            check_range(&shown, w, &[w.len()], dtype)?;
        }
    }

    let kpm = args
        .key_padding_mask
        .as_deref()
        .map(|path| key_padding_mask(path, batch, n, squeeze))
        .transpose()?;
    if kpm.is_some() && args.masks.attention_mask.is_some() {
        return Err(CliError::usage(
            "--key-padding-mask and --attention-mask give the same thing in opposite \
             polarities (true = ignore, 1 = keep): give one",
        ));
    }
    if kpm.is_some() && args.masks.mask.is_some() {
        return Err(CliError::usage(
            "--key-padding-mask and --mask cannot be combined: fold the padding into the --mask \
             file (mask & ~key_padding_mask[:, None, None, :]; --mask is true = attend)",
        ));
    }
    let shape = config.attn_shape(batch, m, n);
    let mut attention = Attention::default();
    if let Some(out) = args.precision.out_dtype() {
        attention = attention.with_out_dtype(out);
    }
    // The family's convention where the file shows it: T5's own code never scales the
    // logits, and a user who ran the layer elsewhere expects what T5 computes. A note (not an
    // error) because the names already say which model this is; --scale overrides it.
    let scale = args.scale.or_else(|| {
        (names == Names::T5).then(|| {
            eprintln!(
                "xattn: note: T5 names: T5 and MT5 do not scale their logits, so the scale is 1 \
                 (not 1/sqrt(head dim) = {:.4}); pass --scale to choose another",
                1.0 / ((inner / heads) as f64).sqrt()
            );
            1.0
        })
    });
    if let Some(s) = scale {
        attention = attention.with_scale(s);
    }
    let attention = args.analytics.apply(args.masks.apply(attention, &shape)?);
    let mask_spec = attention.masking().spec(&shape)?;
    // The logits of the projected query and key, bounded through the weights (projected here
    // only where that bound does not decide): those f32 cannot hold are refused now.
    let (q_shown, k_shown) = [&q, &k]
        .map(|x| format!("{} {}", x.flag, x.path.display()))
        .into();
    check_layer_logits(
        &config,
        &weights,
        &LayerInput {
            shown: &q_shown,
            data: &q.array.data,
            dims: q.dims,
        },
        &LayerInput {
            shown: &k_shown,
            data: &k.array.data,
            dims: k.dims,
        },
        &attention,
    )?;
    let need = match (&args.need_weights, args.per_head_weights) {
        (None, _) => NeedWeights::None,
        (Some(_), false) => NeedWeights::Averaged,
        (Some(_), true) => NeedWeights::PerHead,
    };
    let mut opts = MhaOptions::default()
        .with_attention(attention)
        .with_need_weights(need);
    if let Some(kpm) = kpm {
        opts = opts.with_key_padding_mask(kpm);
    }
    let mut targets = vec![
        ("--out", Some(&args.out)),
        ("--need-weights", args.need_weights.as_ref()),
    ];
    targets.extend(args.analytics.targets());
    let mut outputs = Outputs::create(&targets)?;
    let heatmaps = args.analytics.heatmaps(&shape, &mut outputs)?;

    let ctx = Context::new()?;
    let engine = Engine::new(&ctx);
    let t0 = Instant::now();
    let layer = MultiHeadAttention::new_as(&engine, config, &weights, dtype)
        .map_err(|e| CliError::new(format!("--weights {}: {e}", args.weights.display())))?;
    drop(weights);
    // Half files hold values their type represents: uploading them as it is exact.
    let upload = |name, x: &Input| Tensor::upload_as(&ctx, name, &x.array.data, &x.dims, dtype);
    let qt = upload("query", &q)?;
    let kt = upload("key", &k)?;
    let vt = upload("value", &v)?;
    drop((q, k, v));
    let t_run = Instant::now();
    let out = layer.forward(&qt, &kt, &vt, &opts).map_err(|e| {
        let forced_by = args
            .need_weights
            .as_ref()
            .map_or(&[][..], |_| &["--need-weights"]);
        let req = || {
            Ok(Request {
                weights: need != NeedWeights::None,
                ..opts.attention_for(batch, n)?.request(shape)?
            })
        };
        three_pass_limit(e, forced_by, req, engine.caps())
    })?;
    let run_ms = t_run.elapsed().as_secs_f64() * 1e3;

    // Widened to f32 (exactly); an f16 output is written back as float16.
    let out_dtype = out.out.dtype();
    // Batch first from the layer; seq first back when the inputs were (3-D only).
    let (o, o_dims) = if squeeze {
        (out.out.to_host()?, vec![m, e])
    } else {
        (
            layout.data(out.out.to_host()?, [batch, m, e]),
            layout.dims([batch, m, e]).to_vec(),
        )
    };
    outputs.write_as(&args.out, &o, &o_dims, out_dtype)?;
    if let Some(path) = &args.need_weights {
        let w = out
            .weights
            .as_ref()
            .ok_or_else(|| CliError::new("the layer returned no attention weights"))?;
        let dims = match need {
            NeedWeights::PerHead => vec![batch, heads, m, n],
            _ => vec![batch, m, n],
        };
        outputs.write(path, &w.to_host()?, &out_dims(&dims, squeeze))?;
    }
    args.analytics
        .write(&mut outputs, &out.stats, &shape, squeeze)?;
    let maps = match (&heatmaps, &out.stats.pooled) {
        (Some(maps), Some(pooled)) => {
            let mean = out.mean_stats.pooled.as_ref();
            Some((maps, maps.write(&mut outputs, &shape, pooled, mean)?))
        }
        (Some(_), None) => return Err(CliError::new("the layer computed no heatmap")),
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

    let mut masks = Vec::new();
    if !mask_spec.is_empty() {
        masks.push(mask_spec.to_string());
    }
    if opts.key_padding_mask.is_some() {
        masks.push("key padding".to_string());
    }
    let masks = if masks.is_empty() {
        String::new()
    } else {
        format!(" (masks: {})", masks.join(", "))
    };
    let mut dims = format!("E{e}");
    if inner != e {
        dims += &format!(" inner{inner}");
    }
    if kdim != e || vdim != e {
        dims += &format!(" kdim{kdim} vdim{vdim}");
    }
    if out_dtype == dtype {
        dims += &format!(" {dtype}");
    } else {
        dims += &format!(" {dtype}→{out_dtype}");
    }
    let weights = match need {
        NeedWeights::None => "",
        NeedWeights::Averaged => ", weights averaged",
        NeedWeights::PerHead => ", weights per head",
    };
    // The shape shows GQA as `H8/2` (query heads / K/V heads).
    eprintln!(
        "xattn: mha {shape} {dims} ({names} names){masks}{weights} on {}: layer {run_ms:.1} ms, with uploads \
         and writes {total_ms:.1} ms",
        ctx.describe(),
    );
    Ok(ExitCode::SUCCESS)
}
