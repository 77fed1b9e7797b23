//! The attention inputs `xattn run` and `xattn grad` share: Q, K, V from `.npy` files or one
//! safetensors file, their layout, the logit scale, the path, the masks and the precision,
//! read and checked on the host (files, dtypes, ranks, shapes, logits f32 cannot hold) before
//! a device is opened.

use std::path::PathBuf;

use clap::Args;
use xattn::{Attention, AttnShape, Context, DType, Tensor};

use crate::layout::Layout;
use crate::logits::{check_logits, Heads};
use crate::masks::MaskArgs;
use crate::npy::{read_floats, Array, Source};
use crate::precision::{check_range, PrecisionArgs};
use crate::qkv::Bundle;
use crate::{parse_finite_f32, parse_path_choice, CliError, CliResult, PathChoice};

/// Q, K, V and their layout.
#[derive(Debug, Args)]
pub struct QkvArgs {
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
}

/// The logit scale, the path and `--plan`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// Logit scale; default 1/sqrt(d_k).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_finite_f32)]
    pub scale: Option<f32>,
    /// Kernel path: auto (the planner's choice), three-pass, fused or split-k.
    #[arg(long, default_value = "auto", value_parser = parse_path_choice)]
    pub path: PathChoice,
    /// Print the plan (path, tiles, splits, buffers; for grad the backward's too) to stderr
    /// before running.
    #[arg(long)]
    pub plan: bool,
}

/// An input beside Q, K and V that shares their file type (`grad`'s dO): its flag and file.
/// Its shape and range are the caller's to check (it may be stored in another type).
pub struct Extra<'a> {
    /// `--d-o`.
    pub flag: &'static str,
    /// The file.
    pub path: &'a PathBuf,
}

/// The inputs of one attention call, read and checked.
pub struct Loaded {
    /// The problem.
    pub shape: AttnShape,
    /// The layout of the files.
    pub layout: Layout,
    /// Whether the files had no batch axis (3-D): outputs are written without it.
    pub squeeze: bool,
    /// The type Q, K, V (and the extra inputs) are stored in on the device.
    pub dtype: DType,
    /// How messages name each input and the type its file holds: q, k, v, then the extras.
    pub types: Vec<(String, DType)>,
    /// The options: path, scale, masks, output type.
    pub opts: Attention,
    /// Q `[batch, M, heads, d_k]`, batch and seq first as the device reads them.
    pub q: Vec<f32>,
    /// K, as the device reads it.
    pub k: Vec<f32>,
    /// V, as the device reads it.
    pub v: Vec<f32>,
    /// The extra inputs as their files hold them (their shapes are the caller's to check).
    pub extras: Vec<Array>,
    /// The shape of the bias as its file (or tensor) holds it, before broadcasting.
    pub bias_shape: Option<Vec<usize>>,
}

/// Drops the leading batch axis of `dims` (which is 1) when the inputs had none.
pub fn out_dims(dims: &[usize], squeeze: bool) -> Vec<usize> {
    if squeeze {
        dims[1..].to_vec()
    } else {
        dims.to_vec()
    }
}

impl Loaded {
    /// The dims of a file holding a tensor of heads whose device dims are `dims` (bshd,
    /// 4-D): in the files' layout, without batch for 3-D inputs.
    pub fn file_dims(&self, dims: [usize; 4]) -> Vec<usize> {
        out_dims(&self.layout.dims(dims), self.squeeze)
    }

    /// The dims of O's file in the other layout, and that layout's name, for messages.
    pub fn other_o_dims(&self) -> (Vec<usize>, &'static str) {
        let other = self.layout.other();
        (
            out_dims(&other.dims(self.shape.o_dims()), self.squeeze),
            other.name(),
        )
    }

    /// Uploads `data` (device order, `dims`) as `name` in the inputs' type: half files hold
    /// values their type represents, so uploading them as it is exact.
    pub fn upload(
        &self,
        ctx: &Context,
        name: &'static str,
        data: &[f32],
        dims: [usize; 4],
    ) -> CliResult<Tensor> {
        Ok(Tensor::upload_as(ctx, name, data, &dims, self.dtype)?)
    }
}

impl QkvArgs {
    /// Reads Q, K, V (and `extras`), checks their types (one for all, or --dtype), ranks,
    /// shapes and ranges, applies `call`'s
    /// scale and path, `masks` and `precision`'s output type, and refuses logits that f32
    /// cannot hold: all before a device is opened.
    pub fn load(
        &self,
        call: &CallArgs,
        masks: &MaskArgs,
        precision: &PrecisionArgs,
        extras: &[Extra],
    ) -> CliResult<Loaded> {
        let bundle = self.qkv.as_deref().map(Bundle::read).transpose()?;
        let mut types = Vec::new();
        let mut read = |name: &str, src: Source| {
            let shown = match &src {
                Source::File(path) => format!("--{name} {}", path.display()),
                Source::Tensor { shown, .. } => shown.clone(),
            };
            let (array, dtype) = read_floats(src)?;
            types.push((shown, dtype));
            CliResult::Ok(array)
        };
        let mut qkv = Vec::new();
        for (name, path) in [("q", &self.q), ("k", &self.k), ("v", &self.v)] {
            let src = match (&bundle, path) {
                (Some(bundle), _) => bundle.required(name)?,
                (None, Some(path)) => Source::from(path),
                (None, None) => unreachable!("clap requires --{name} without --qkv"),
            };
            qkv.push(read(name, src)?);
        }
        let mut extra_arrays = Vec::new();
        for e in extras {
            extra_arrays.push(read(e.flag.trim_start_matches('-'), Source::from(e.path))?);
        }
        let [q, k, v]: [Array; 3] = qkv.try_into().expect("three inputs read");
        let dtype = precision.input_dtype(&types)?;
        for ((shown, _), x) in types.iter().zip([&q, &k, &v]) {
            check_range(shown, &x.data, &x.shape, dtype)?;
        }
        let layout = self.layout.unwrap_or_default();
        let (q_file, q3) = layout.file_dims("q", &q.shape)?;
        let (k_file, k3) = layout.file_dims("k", &k.shape)?;
        let (v_file, v3) = layout.file_dims("v", &v.shape)?;
        if q3 != k3 || q3 != v3 {
            return Err(CliError::new(format!(
                "q, k and v must all be 3-D or all 4-D, got shapes {:?}, {:?}, {:?}",
                q.shape, k.shape, v.shape
            )));
        }
        let shape = layout.attn_shape([q_file, k_file, v_file], self.layout.is_some())?;
        let mut opts = Attention::default().with_path_choice(call.path.0);
        if let Some(out) = precision.out_dtype() {
            opts = opts.with_out_dtype(out);
        }
        if let Some(s) = call.scale {
            opts = opts.with_scale(s);
        }
        let (opts, bias_shape) = masks.apply_noting(opts, &shape, bundle.as_ref())?;
        drop(bundle);
        // Batch and seq first, as the device reads them; logits that f32 cannot hold are
        // refused here, before a device is opened.
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
        Ok(Loaded {
            shape,
            layout,
            squeeze: q3,
            dtype,
            types,
            opts,
            q: q_data,
            k: k_data,
            v: layout.data(v.data, v_file),
            extras: extra_arrays,
            bias_shape,
        })
    }
}
