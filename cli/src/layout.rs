//! `xattn run --layout`: Q, K, V and O as the library holds them, `[batch, seq, heads, d]`
//! (bshd), or as PyTorch's `scaled_dot_product_attention` does, `[batch, heads, seq, d]`
//! (bhsd). The library reads bshd; bhsd arrays are transposed on the host when read and
//! written. Weights `[batch, heads, M, N]`, LSE and masks are the same in both.
//!
//! A file's shape does not say its layout. Where q, k and v fit only one layout, a shape
//! error names the other; where they fit both (self-attention shapes, for one), nothing can
//! tell them apart, and without `--layout` a note says so.

use clap::ValueEnum;
use xattn::AttnShape;

use crate::{CliError, CliResult};

/// The order of the axes of Q, K, V and O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// [batch, seq, heads, d]: xattn's, FlashAttention's.
    #[default]
    Bshd,
    /// [batch, heads, seq, d]: PyTorch scaled_dot_product_attention's.
    Bhsd,
}

impl Layout {
    /// The name `--layout` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bshd => "bshd",
            Self::Bhsd => "bhsd",
        }
    }

    /// The axes of a 4-D file, for messages.
    pub fn axes(self) -> &'static str {
        match self {
            Self::Bshd => "[batch, seq, heads, d]",
            Self::Bhsd => "[batch, heads, seq, d]",
        }
    }

    /// The other layout.
    pub fn other(self) -> Self {
        match self {
            Self::Bshd => Self::Bhsd,
            Self::Bhsd => Self::Bshd,
        }
    }

    /// `dims` converted between this layout and bshd, either way (axes 1 and 2 swap or stay).
    pub fn dims(self, [b, x, y, d]: [usize; 4]) -> [usize; 4] {
        match self {
            Self::Bshd => [b, x, y, d],
            Self::Bhsd => [b, y, x, d],
        }
    }

    /// `data` of 4-D `dims` converted between this layout and bshd, either way.
    pub fn data(self, data: Vec<f32>, [b, x, y, d]: [usize; 4]) -> Vec<f32> {
        if self == Self::Bshd {
            return data;
        }
        let mut out = Vec::with_capacity(data.len());
        for i in 0..b {
            for k in 0..y {
                for j in 0..x {
                    let at = ((i * x + j) * y + k) * d;
                    out.extend_from_slice(&data[at..at + d]);
                }
            }
        }
        out
    }

    /// The 4-D dims, in this layout, of the file `name` (q, k or v) of shape `shape`, and
    /// whether it had no batch axis (3-D: batch 1).
    pub fn file_dims(self, name: &str, shape: &[usize]) -> CliResult<([usize; 4], bool)> {
        match *shape {
            [x, y, d] => Ok(([1, x, y, d], true)),
            [b, x, y, d] => Ok(([b, x, y, d], false)),
            ref other => Err(CliError::new(format!(
                "{name} has shape {other:?}; with --layout {} it must be {} or, for batch 1, \
                 those dims without batch",
                self.name(),
                self.axes()
            ))),
        }
    }

    /// The attention shape of q, k and v, whose files have 4-D `dims` in this layout. A shape
    /// error says which layout the files were read in, and points to the other when they fit
    /// it. When they fit both and the layout was not `named`, a note on stderr says so.
    pub fn attn_shape(self, dims: [[usize; 4]; 3], named: bool) -> CliResult<AttnShape> {
        let read = |l: Layout| {
            let [q, k, v] = dims.map(|d| l.dims(d));
            AttnShape::from_qkv(q, k, v)
        };
        let other = self.other();
        let read_as = format!("q, k, v read as --layout {} {}", self.name(), self.axes());
        match (read(self), read(other)) {
            (Ok(shape), Ok(also)) if !named => {
                eprintln!(
                    "xattn: note: q, k, v fit both layouts ({} {shape}, {} {also}); reading \
                     the default, {}: pass --layout to say which (PyTorch SDPA tensors are bhsd)",
                    self.name(),
                    other.name(),
                    self.name()
                );
                Ok(shape)
            }
            (Ok(shape), _) => Ok(shape),
            (Err(e), Ok(_)) => Err(CliError::new(format!(
                "{e} ({read_as}); they fit --layout {} {}: pass --layout {}",
                other.name(),
                other.axes(),
                other.name()
            ))),
            (Err(e), Err(_)) => Err(CliError::new(format!("{e} ({read_as})"))),
        }
    }
}

/// The order of the axes of `xattn mha`'s 3-D inputs and output: batch first, `[batch, seq,
/// features]` (PyTorch `batch_first=True`, Hugging Face, diffusers), or sequence first, `[seq,
/// batch, features]`, `nn.MultiheadAttention`'s default (`batch_first=False`). The layer reads
/// batch first; seq-first arrays are transposed on the host when read and written. 2-D inputs
/// `[seq, features]` are the same in both; the attention weights, the key padding mask and the
/// statistics are batch first in both, as PyTorch returns and takes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SeqLayout {
    /// [batch, seq, features]: PyTorch batch_first=True, Hugging Face, diffusers.
    #[default]
    #[value(alias = "batch-first")]
    Bse,
    /// [seq, batch, features]: nn.MultiheadAttention's default (batch_first=False).
    #[value(alias = "seq-first")]
    Sbe,
}

impl SeqLayout {
    /// The name `--layout` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bse => "bse",
            Self::Sbe => "sbe",
        }
    }

    /// The axes of a 3-D array, for messages.
    pub fn axes(self) -> &'static str {
        match self {
            Self::Bse => "[batch, seq, features] (batch first)",
            Self::Sbe => "[seq, batch, features] (seq first, batch_first=False)",
        }
    }

    /// The other layout.
    pub fn other(self) -> Self {
        match self {
            Self::Bse => Self::Sbe,
            Self::Sbe => Self::Bse,
        }
    }

    /// 3-D `dims` converted between this layout and batch first, either way.
    pub fn dims(self, [x, y, f]: [usize; 3]) -> [usize; 3] {
        match self {
            Self::Bse => [x, y, f],
            Self::Sbe => [y, x, f],
        }
    }

    /// `data` of 3-D `dims` converted between this layout and batch first, either way.
    pub fn data(self, data: Vec<f32>, [x, y, f]: [usize; 3]) -> Vec<f32> {
        if self == Self::Bse {
            return data;
        }
        let mut out = Vec::with_capacity(data.len());
        for j in 0..y {
            for i in 0..x {
                let at = (i * y + j) * f;
                out.extend_from_slice(&data[at..at + f]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bhsd_data_is_the_transpose_and_converts_back() {
        // [1, 2, 3, 2] bhsd: element (h, s, e) = 10h + s + e/10.
        let dims = [1, 2, 3, 2];
        let bhsd: Vec<f32> = (0..12)
            .map(|i| (10 * (i / 6) + (i / 2) % 3) as f32 + (i % 2) as f32 / 10.0)
            .collect();
        let bshd = Layout::Bhsd.data(bhsd.clone(), dims);
        // bshd [1, 3, 2, 2]: (s, h, e).
        assert_eq!(&bshd[..4], &[0.0, 0.1, 10.0, 10.1]);
        assert_eq!(Layout::Bhsd.dims(dims), [1, 3, 2, 2]);
        assert_eq!(Layout::Bhsd.data(bshd, [1, 3, 2, 2]), bhsd);
        assert_eq!(Layout::Bshd.data(bhsd.clone(), dims), bhsd);
    }

    #[test]
    fn seq_first_data_is_the_transpose_and_converts_back() {
        // [L3, B2, E2] seq first: element (l, b, e) = 10l + b + e/10.
        let dims = [3, 2, 2];
        let lbe: Vec<f32> = (0..12)
            .map(|i| (10 * (i / 4) + (i / 2) % 2) as f32 + (i % 2) as f32 / 10.0)
            .collect();
        let ble = SeqLayout::Sbe.data(lbe.clone(), dims);
        // [B2, L3, E2]: (b, l, e).
        assert_eq!(&ble[..6], &[0.0, 0.1, 10.0, 10.1, 20.0, 20.1]);
        assert_eq!(SeqLayout::Sbe.dims(dims), [2, 3, 2]);
        assert_eq!(SeqLayout::Sbe.data(ble, [2, 3, 2]), lbe);
        assert_eq!(SeqLayout::Bse.data(lbe.clone(), dims), lbe);
    }

    #[test]
    fn shape_errors_point_to_the_layout_the_files_fit() {
        // bhsd files: q [B2, H2, M4, d3], k, v [B2, H2, N6, d3]; read as bshd, 4 heads over 6.
        let files = [[2, 2, 4, 3], [2, 2, 6, 3], [2, 2, 6, 3]];
        let e = Layout::Bshd
            .attn_shape(files, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("read as --layout bshd"), "{e}");
        assert!(e.contains("pass --layout bhsd"), "{e}");
        let s = Layout::Bhsd.attn_shape(files, true).unwrap();
        assert_eq!((s.q_heads, s.m, s.n), (2, 4, 6));
        // Fitting neither: no pointer.
        let e = Layout::Bshd
            .attn_shape([[2, 2, 4, 3], [2, 2, 6, 5], [2, 2, 6, 3]], false)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("pass --layout"), "{e}");
    }
}
