//! The mask and logit-control options of `xattn run` (and the alignment `xattn bench` shares).
//!
//! Semantics are the library's (`xattn::mask`); this module reads the files, resolves the
//! alignment rules of the command line and attributes each library error to the flag (and
//! file) that caused it. Everything here runs before a device is opened.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use xattn::{Alignment, Attention, AttnShape};

use crate::npy::{read_bias, read_bool, read_keep_mask, read_lens, Source};
use crate::qkv::Bundle;
use crate::{parse_finite_f32, CliError, CliResult};

/// `top-left` or `bottom-right`, as a clap value (so `--help` lists the choices).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AlignArg {
    /// Row i sits on key i (PyTorch and JAX `is_causal`).
    TopLeft,
    /// The last row sits on the last key: row i on key i + kv_len − q_len (FlashAttention ≥ 2.1,
    /// decoding with a cache).
    BottomRight,
}

impl From<AlignArg> for Alignment {
    fn from(a: AlignArg) -> Self {
        match a {
            AlignArg::TopLeft => Alignment::TopLeft,
            AlignArg::BottomRight => Alignment::BottomRight,
        }
    }
}

/// Masks and logit controls of `xattn run`.
///
/// Key j takes part in row i of batch b, head h when j < kv_len[b], i < q_len[b], j is inside
/// the causal/window band, and the mask is true at [b, h, i, j]. Its logit is scale·q·k, times
/// its key segment's factor, soft-capped, plus the bias. A row left with no key outputs
/// zeros (LSE −∞).
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Masks and logit controls")]
pub struct MaskArgs {
    /// Causal mask: row i sees keys up to its diagonal. top-left: the diagonal of row i is key
    /// i (PyTorch, JAX). bottom-right: it is key i + kv_len − q_len, so the last row sees every
    /// key (FlashAttention ≥ 2.1, decoding with a cache); rows before the diagonal starts see
    /// nothing when q_len > kv_len. No default: say which.
    #[arg(long, value_enum, value_name = "ALIGN")]
    pub causal: Option<AlignArg>,
    /// Local window: row i sees keys diag − LEFT ..= diag + RIGHT (diag as for --causal, per
    /// --align). With --causal the right side is 0 (both apply).
    #[arg(
        long,
        num_args = 2,
        value_names = ["LEFT", "RIGHT"],
        allow_negative_numbers = true,
        value_parser = window_side
    )]
    pub window: Option<Vec<usize>>,
    /// Alignment of --window; default: that of --causal. One of the two is required with
    /// --window, and they must agree when both are given.
    #[arg(long, value_enum, value_name = "ALIGN", requires = "window")]
    pub align: Option<AlignArg>,
    /// Valid query rows per batch entry: int32 (or int64) .npy of shape [batch]. Rows at or
    /// past q_len[b] output zeros (LSE −∞); bottom-right diagonals use it.
    #[arg(long, value_name = "FILE")]
    pub q_lens: Option<PathBuf>,
    /// Valid keys per batch entry: int32 (or int64) .npy of shape [batch]. Keys at or past
    /// kv_len[b] are ignored (padding).
    #[arg(long, value_name = "FILE")]
    pub kv_lens: Option<PathBuf>,
    /// Bool mask .npy, true = may attend (PyTorch SDPA's polarity), broadcast to [batch,
    /// heads, M, N]: each of the first three dims 1 or full, the last N; fewer dims are padded
    /// with leading 1s as numpy does ([M, N], [N]). Only bool: an integer 0/1 array (uint8
    /// included) does not say whether 1 keeps or removes a key, so it is refused with both
    /// conversions. A float mask (PyTorch's additive 0 / −inf attn_mask) is a bias: give it to
    /// --bias.
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,
    /// A Hugging Face attention_mask .npy, [batch, N] ([N] for batch 1): 1 = keep that key, 0 =
    /// padding (any integer type, or bool), as the tokenizer returns it. The same as --mask
    /// (a != 0)[:, None, None, :]; cannot be combined with --mask.
    #[arg(long, value_name = "FILE")]
    pub attention_mask: Option<PathBuf>,
    /// Additive logit bias .npy (float32, e.g. ALiBi, or PyTorch's float attn_mask), broadcast
    /// like --mask; added after the softcap. −inf (or ≤ −1e30) removes the key; NaN and +inf
    /// are errors.
    #[arg(long, value_name = "FILE")]
    pub bias: Option<PathBuf>,
    /// Soft-cap the logits: C·tanh(logit / C) (after scale and key-segment factors, before
    /// the bias). C > 0.
    #[arg(
        long,
        value_name = "C",
        allow_negative_numbers = true,
        value_parser = parse_finite_f32
    )]
    pub softcap: Option<f32>,
    /// Multiply the logits of keys START..END (END exclusive) by FACTOR > 0 (an inverse
    /// temperature per key segment). Repeatable, up to 4 disjoint segments.
    #[arg(
        long,
        num_args = 3,
        value_names = ["START", "END", "FACTOR"],
        allow_negative_numbers = true
    )]
    pub key_segment: Vec<String>,
}

/// Parses one side of `--window`: a key count ≥ 0.
fn window_side(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| {
        format!(
            "`{s}` is not a window side: LEFT and RIGHT count the keys before and after the \
             diagonal, so each is an integer ≥ 0"
        )
    })
}

/// One mask input: `label` names it in messages (`--mask m.npy`, or the tensor of `--qkv`).
struct Given<'a> {
    label: String,
    src: Source<'a>,
}

/// The input of `flag` (its file, `path`) or the tensor `name` of the `--qkv` file; an error
/// when both give it.
fn given<'a>(
    flag: &str,
    path: Option<&'a PathBuf>,
    bundle: Option<&'a Bundle>,
    name: &str,
) -> CliResult<Option<Given<'a>>> {
    let tensor = bundle.map(|b| b.get(name)).transpose()?.flatten();
    Ok(match (path, tensor) {
        (Some(path), Some(tensor)) => {
            return Err(CliError::usage(format!(
                "{flag} {} and the {tensor} both give `{name}`; drop one",
                path.display()
            )))
        }
        (Some(path), None) => Some(Given {
            label: format!("{flag} {}", path.display()),
            src: Source::File(path),
        }),
        (None, Some(src)) => Some(Given {
            label: src.to_string(),
            src,
        }),
        (None, None) => None,
    })
}

/// The lengths of `input`, each at most `bound`, the size of axis `axis`.
fn read_bounded_lens(input: &Given, axis: &str, bound: usize) -> CliResult<Vec<u32>> {
    let lens = read_lens(input.src.clone())?.data;
    if let Some((b, &l)) = lens.iter().enumerate().find(|(_, &l)| l as usize > bound) {
        return Err(CliError::new(format!(
            "{}: entry {b} is {l}, more than {axis} = {bound}; each length must be at most \
             {axis}",
            input.label
        )));
    }
    Ok(lens)
}

/// The alignment of `--window`: `--align`, else `--causal`'s; an error if neither or if they
/// disagree.
fn window_alignment(causal: Option<AlignArg>, align: Option<AlignArg>) -> CliResult<Alignment> {
    let name = |a: AlignArg| Alignment::from(a).name();
    match (causal, align) {
        (Some(c), Some(a)) if c != a => Err(CliError::usage(format!(
            "--causal {} and --align {} disagree; a causal mask and a window share one \
             alignment (drop --align, or make them equal)",
            name(c),
            name(a)
        ))),
        (_, Some(a)) | (Some(a), None) => Ok(a.into()),
        (None, None) => Err(CliError::usage(
            "--window needs an alignment: add --align top-left (row i on key i, PyTorch/JAX) \
             or --align bottom-right (last row on last key, FlashAttention/decoding), \
             or give --causal",
        )),
    }
}

/// `dims` left-padded with 1s to 4 (numpy broadcasting), or an error naming the input.
fn broadcast_dims(label: &str, shape: &[usize]) -> CliResult<[usize; 4]> {
    if shape.len() > 4 {
        return Err(CliError::new(format!(
            "{label} has shape {shape:?}; it needs at most 4 dims [batch, heads, M, N]"
        )));
    }
    let mut dims = [1; 4];
    dims[4 - shape.len()..].copy_from_slice(shape);
    Ok(dims)
}

/// Parses one `--key-segment START END FACTOR`.
fn key_segment(words: &[String]) -> CliResult<(usize, usize, f32)> {
    let bad = |what: &str, got: &str| {
        CliError::usage(format!(
            "--key-segment {}: {what} `{got}` is not {}",
            words.join(" "),
            if what == "FACTOR" {
                "a number"
            } else {
                "a non-negative integer"
            }
        ))
    };
    let [start, end, factor] = words else {
        return Err(CliError::usage(format!(
            "--key-segment takes START END FACTOR, got {words:?}"
        )));
    };
    Ok((
        start.parse().map_err(|_| bad("START", start))?,
        end.parse().map_err(|_| bad("END", end))?,
        factor.parse().map_err(|_| bad("FACTOR", factor))?,
    ))
}

impl MaskArgs {
    /// `opts` with every mask and logit control of the command line, validated against `s`.
    pub fn apply(&self, opts: Attention, s: &AttnShape) -> CliResult<Attention> {
        self.apply_with(opts, s, None)
    }

    /// [`MaskArgs::apply`], with the mask, bias and lengths that `bundle` (`--qkv`) holds.
    pub fn apply_with(
        &self,
        opts: Attention,
        s: &AttnShape,
        bundle: Option<&Bundle>,
    ) -> CliResult<Attention> {
        Ok(self.apply_noting(opts, s, bundle)?.0)
    }

    /// [`MaskArgs::apply_with`], and the shape of the bias as its file (or tensor) holds it,
    /// before broadcasting: the shape of its gradient.
    pub fn apply_noting(
        &self,
        mut opts: Attention,
        s: &AttnShape,
        bundle: Option<&Bundle>,
    ) -> CliResult<(Attention, Option<Vec<usize>>)> {
        let mut bias_shape = None;
        // Checks what has been added so far; the first failing addition is the culprit.
        let check = |opts: &Attention, context: &dyn Fn() -> String| {
            opts.masking()
                .spec(s)
                .map(|_| ())
                .map_err(|e| CliError::new(format!("{}: {e}", context())))
        };
        if let Some(c) = self.causal {
            opts = opts.with_causal(c.into());
        }
        if let Some(w) = &self.window {
            let align = window_alignment(self.causal, self.align)?;
            let [left, right] = w[..] else {
                return Err(CliError::usage(format!(
                    "--window takes LEFT RIGHT, got {w:?}"
                )));
            };
            opts = opts.with_window(align, left, right);
        }
        if self.causal.is_some() || self.window.is_some() {
            check(&opts, &|| "--causal/--window".to_string())?;
        }
        if let Some(input) = given("--q-lens", self.q_lens.as_ref(), bundle, "q_lens")? {
            opts = opts.with_q_lens(read_bounded_lens(&input, "M", s.m)?);
            check(&opts, &|| input.label.clone())?;
        }
        if let Some(input) = given("--kv-lens", self.kv_lens.as_ref(), bundle, "kv_lens")? {
            opts = opts.with_kv_lens(read_bounded_lens(&input, "N", s.n)?);
            check(&opts, &|| input.label.clone())?;
        }
        if let Some(Given { label, src }) = given("--mask", self.mask.as_ref(), bundle, "mask")? {
            let a = read_bool(src)?;
            opts = opts.with_mask(broadcast_dims(&label, &a.shape)?, a.data);
            check(&opts, &|| format!("{label} (shape {:?})", a.shape))?;
        }
        if let Some(path) = &self.attention_mask {
            let label = format!("--attention-mask {}", path.display());
            if opts.masking().mask.is_some() {
                return Err(CliError::usage(format!(
                    "{label} and --mask cannot be combined: fold them into one --mask file \
                     (mask & (attention_mask != 0)[:, None, None, :]; --mask is true = attend)"
                )));
            }
            let a = read_keep_mask(path)?;
            let (b, n) = (s.batch, s.n);
            if a.shape != [b, n] && !(b == 1 && a.shape == [n]) {
                return Err(CliError::new(format!(
                    "{label} has shape {:?}; an attention_mask is [batch, N] = [{b}, {n}]{}",
                    a.shape,
                    if b == 1 {
                        format!(" or [N] = [{n}]")
                    } else {
                        String::new()
                    }
                )));
            }
            opts = opts.with_mask([b, 1, 1, n], a.data);
            check(&opts, &|| label.clone())?;
        }
        if let Some(Given { label, src }) = given("--bias", self.bias.as_ref(), bundle, "bias")? {
            let a = read_bias(src)?;
            opts = opts.with_bias(broadcast_dims(&label, &a.shape)?, a.data);
            check(&opts, &|| format!("{label} (shape {:?})", a.shape))?;
            bias_shape = Some(a.shape);
        }
        if let Some(cap) = self.softcap {
            opts = opts.with_softcap(cap);
            check(&opts, &|| "--softcap".to_string())?;
        }
        for words in self.key_segment.chunks(3) {
            let (start, end, factor) = key_segment(words)?;
            opts = opts.with_key_segment(start, end, factor);
        }
        if !self.key_segment.is_empty() {
            check(&opts, &|| "--key-segment".to_string())?;
        }
        Ok((opts, bias_shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_alignment_rules() {
        use AlignArg::*;
        assert_eq!(
            window_alignment(Some(TopLeft), None).unwrap(),
            Alignment::TopLeft
        );
        assert_eq!(
            window_alignment(None, Some(BottomRight)).unwrap(),
            Alignment::BottomRight
        );
        assert_eq!(
            window_alignment(Some(BottomRight), Some(BottomRight)).unwrap(),
            Alignment::BottomRight
        );
        assert!(window_alignment(Some(TopLeft), Some(BottomRight)).is_err());
        assert!(window_alignment(None, None).is_err());
    }

    #[test]
    fn broadcast_pads_leading_ones() {
        let m = "--mask m.npy";
        assert_eq!(broadcast_dims(m, &[5]).unwrap(), [1, 1, 1, 5]);
        assert_eq!(broadcast_dims(m, &[3, 5]).unwrap(), [1, 1, 3, 5]);
        assert_eq!(broadcast_dims(m, &[2, 1, 3, 5]).unwrap(), [2, 1, 3, 5]);
        assert!(broadcast_dims(m, &[1, 2, 1, 3, 5]).is_err());
    }

    #[test]
    fn key_segment_words() {
        let w = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(key_segment(&w("0 4 1.5")).unwrap(), (0, 4, 1.5));
        let e = key_segment(&w("0 x 1.5")).unwrap_err().to_string();
        assert!(e.contains("END `x`"), "{e}");
        assert!(key_segment(&w("-1 4 1")).is_err());
    }
}
