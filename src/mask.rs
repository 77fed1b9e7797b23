//! Masks, sequence lengths and logit controls: which keys a query row may see, and how its
//! logits are shaped before the softmax.
//!
//! For query row `i` of batch entry `b` and head `h`, key `j` takes part when all hold:
//! - `i < q_len[b]` and `j < kv_len[b]` (per-sequence lengths; default M and N);
//! - the window, if any: `diag − left ≤ j ≤ diag + right`, where `diag = i` for
//!   [`Alignment::TopLeft`] and `diag = i + kv_len[b] − q_len[b]` for
//!   [`Alignment::BottomRight`] (causal is `left = ∞, right = 0`);
//! - the bool mask, if any, is `true` at `[b, h, i, j]` (broadcast over size-1 dims).
//!
//! Its logit is `scale·q·k`, times the factor of the key segment holding `j` (if any), then
//! soft-capped `cap·tanh(x/cap)` (if set), then plus the bias at `[b, h, i, j]` (if any).
//! A bias of −∞, or of any value ≤ −1e30 ([`BIAS_REMOVES`], taken as −∞ on every path),
//! removes the key like a `false` mask element; the rule looks at the bias value alone, in
//! natural units, whatever log base a kernel computes in.
//!
//! The factors that shape a logit are bounded by [`LOGIT_FACTOR_MAX`] (1e30): |scale|,
//! |scale × segment factor|, the softcap and a kept bias. Beyond, the kernels' f32 logits would
//! overflow or meet the removed-key sentinel, so such calls are refused with a typed error.
//!
//! Removed keys get weight exactly 0, and a path may still multiply their values by it, so V
//! must be finite everywhere, padding included (as in PyTorch, where 0·NaN = NaN too).
//!
//! A row with no key left outputs zeros and LSE = −∞ on every path. PyTorch's
//! `nn.MultiheadAttention` returns NaN there with `need_weights=True` and zeros (before
//! `out_proj`) with `need_weights=False`; JAX's `dot_product_attention` returns the mean of V.

use crate::dropout::Dropout;
use crate::error::{Error, Result};
use crate::params::{flags, AttnParams, UNBOUNDED};
use crate::shape::{check_len, AttnShape};

/// How query row `i` lines up with key `j` under causal and window masks when M ≠ N.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alignment {
    /// Row `i` sits on key `i` (PyTorch `is_causal`, JAX `is_causal`).
    TopLeft,
    /// The last row sits on the last key: row `i` on key `i + kv_len − q_len`
    /// (FlashAttention ≥ 2.1, decoding with a cache). Rows before the diagonal start see
    /// nothing when `q_len > kv_len`.
    BottomRight,
}

impl Alignment {
    /// Name used by the CLI (`top-left`, `bottom-right`).
    pub fn name(&self) -> &'static str {
        match self {
            Alignment::TopLeft => "top-left",
            Alignment::BottomRight => "bottom-right",
        }
    }
}

impl std::str::FromStr for Alignment {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "top-left" => Ok(Alignment::TopLeft),
            "bottom-right" => Ok(Alignment::BottomRight),
            _ => Err(Error::Argument(format!(
                "unknown alignment `{s}` (expected top-left or bottom-right)"
            ))),
        }
    }
}

/// A band of keys around each row's diagonal; `None` = unbounded on that side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// Where the diagonal lies.
    pub align: Alignment,
    /// Keys visible before the diagonal.
    pub left: Option<usize>,
    /// Keys visible after the diagonal (0 = causal).
    pub right: Option<usize>,
}

/// A key range `[start, end)` whose logits are multiplied by `factor` (an inverse
/// temperature: > 1 sharpens the softmax over those keys).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeySegment {
    /// First key.
    pub start: usize,
    /// One past the last key.
    pub end: usize,
    /// Logit factor.
    pub factor: f32,
}

/// Where one call's rows and keys lie in longer sequences: the call is the block of rows
/// `row_offset .. row_offset + M` of a query sequence of `rows_total` rows and keys
/// `key_offset .. key_offset + N` of a source of `keys_total` keys (a shard of a sharded call,
/// [`crate::shard`]). With a block, `q_lens`, `kv_lens`, the causal and window diagonals and the
/// key segments speak of the whole sequences' positions (row `i` of the call is row
/// `row_offset + i`, key `j` is key `key_offset + j`), so the block's result is exactly its part
/// of the whole call's: its rows, over its keys. The bool mask and the bias cover the block
/// alone (dims `[batch|1, q_heads|1, M|1, N]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Block {
    /// First row of the block.
    pub row_offset: usize,
    /// Rows of the whole query sequence.
    pub rows_total: usize,
    /// First key of the block.
    pub key_offset: usize,
    /// Keys of the whole source.
    pub keys_total: usize,
}

impl Block {
    /// The block of keys `key_offset ..` of a source of `keys_total` keys, all rows.
    pub fn keys(key_offset: usize, keys_total: usize, rows: usize) -> Self {
        Block {
            row_offset: 0,
            rows_total: rows,
            key_offset,
            keys_total,
        }
    }
}

/// Bias values at or below this count as −∞: the key is removed, alike on every path.
pub const BIAS_REMOVES: f32 = -1.0e30;

/// Largest magnitude of each factor that shapes a logit: the scale, the scale times a key
/// segment's factor, the softcap and a kept bias. The kernels multiply logits by log2 e and
/// tell removed keys by a sentinel near −3e38, so logits must stay far inside f32's range
/// (3.4e38); within these bounds they do for any |q·k| up to 1e7.
pub const LOGIT_FACTOR_MAX: f32 = 1.0e30;

/// Most key segments one call may carry.
pub const MAX_SEGMENTS: usize = 4;

/// Host data broadcast over `[batch|1, q_heads|1, M|1, N]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Broadcast<T> {
    /// Dims `[batch or 1, q_heads or 1, M or 1, N]`.
    pub dims: [usize; 4],
    /// Elements, row-major over `dims`.
    pub data: Vec<T>,
}

/// Everything that removes keys or shapes logits in one call. Empty by default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Masking {
    /// Causal or local window.
    pub window: Option<Window>,
    /// Valid query rows per batch entry (`[batch]`); rows at or past it output 0.
    pub q_lens: Option<Vec<u32>>,
    /// Valid keys per batch entry (`[batch]`); keys at or past it are ignored.
    pub kv_lens: Option<Vec<u32>>,
    /// Bool mask, `true` = may attend.
    pub mask: Option<Broadcast<bool>>,
    /// Additive logit bias (e.g. ALiBi).
    pub bias: Option<Broadcast<f32>>,
    /// Softcap `cap` of `cap·tanh(logit/cap)`.
    pub softcap: Option<f32>,
    /// Per-key-segment logit factors.
    pub segments: Vec<KeySegment>,
    /// Dropout of the weights ([`crate::dropout`]).
    pub dropout: Option<Dropout>,
    /// Where the call's rows and keys lie in longer sequences, if they do ([`Block`]).
    pub block: Option<Block>,
    /// A causal and a window request that disagree on alignment (reported by `spec`).
    pub(crate) conflict: Option<(Alignment, Alignment)>,
}

/// The part of [`Masking`] the planner needs: flags, window and strides, no data.
/// `MaskSpec::default()` removes and reshapes nothing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskSpec {
    /// `params::flags` bits.
    pub flags: u32,
    /// Softcap.
    pub softcap: f32,
    /// Window bounds (clamped to M + N), or `UNBOUNDED`.
    pub win_left: u32,
    /// See `win_left`.
    pub win_right: u32,
    /// 1 for bottom-right alignment.
    pub bottom_right: u32,
    /// Whether lengths were given (the kernels always apply them; given lengths select the
    /// masked kernel variants).
    pub lens: bool,
    /// Bool-mask dims, if any.
    pub mask_dims: Option<[usize; 4]>,
    /// Bias dims, if any.
    pub bias_dims: Option<[usize; 4]>,
    /// Segments as (start, end, factor).
    pub segments: [(u32, u32, f32); MAX_SEGMENTS],
    /// Segments in use.
    pub n_segments: u32,
    /// Dropout of the weights (`flags::DROPOUT`), if any.
    pub dropout: Option<Dropout>,
    /// Added to each row's diagonal ([`Block`]); 0 without a block.
    pub diag_shift: i32,
}

impl Default for MaskSpec {
    fn default() -> Self {
        Self {
            flags: 0,
            softcap: 0.0,
            win_left: UNBOUNDED,
            win_right: UNBOUNDED,
            bottom_right: 0,
            lens: false,
            mask_dims: None,
            bias_dims: None,
            segments: [(0, 0, 0.0); MAX_SEGMENTS],
            n_segments: 0,
            dropout: None,
            diag_shift: 0,
        }
    }
}

/// Strides over `[batch, head, row]` of a broadcast tensor whose rows are `row_len` long.
fn broadcast_strides(dims: [usize; 4], row_len: usize) -> [u32; 3] {
    let row = if dims[2] == 1 { 0 } else { row_len };
    let head = if dims[1] == 1 { 0 } else { dims[2] * row_len };
    let batch = if dims[0] == 1 {
        0
    } else {
        dims[1] * dims[2] * row_len
    };
    [batch as u32, head as u32, row as u32]
}

fn check_broadcast(what: &'static str, dims: [usize; 4], len: usize, s: &AttnShape) -> Result<()> {
    let full = [s.batch, s.q_heads, s.m, s.n];
    let ok = (0..3).all(|a| dims[a] == 1 || dims[a] == full[a]) && dims[3] == s.n;
    if !ok {
        return Err(Error::Shape(format!(
            "{what} has dims {dims:?}; it must broadcast to [batch, q_heads, M, N] = {full:?} \
             (each of the first three dims 1 or full, the last exactly N)"
        )));
    }
    check_len(what, &dims, len)?;
    let elems = dims.iter().product::<usize>();
    if elems > u32::MAX as usize {
        return Err(Error::Limit {
            what: format!("{what} {dims:?}"),
            asked: elems as u64,
            limit_name: "u32 element indices",
            limit: u64::from(u32::MAX),
        });
    }
    Ok(())
}

fn check_lens(what: &str, lens: &[u32], s: &AttnShape, max: usize) -> Result<()> {
    if lens.len() != s.batch {
        return Err(Error::Shape(format!(
            "{what} has {} entries; it needs one per batch entry ({})",
            lens.len(),
            s.batch
        )));
    }
    if let Some((b, &l)) = lens.iter().enumerate().find(|(_, &l)| l as usize > max) {
        return Err(Error::Argument(format!(
            "{what}[{b}] = {l} is more than the {max} rows of the tensor"
        )));
    }
    Ok(())
}

impl Masking {
    /// Whether nothing is masked or shaped.
    pub fn is_empty(&self) -> bool {
        *self == Masking::default()
    }

    /// Adds a window constraint; a second one with the same alignment narrows the first.
    pub(crate) fn narrow_window(&mut self, w: Window) {
        let min = |a: Option<usize>, b: Option<usize>| match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, None) | (None, x) => x,
        };
        self.window = Some(match self.window {
            None => w,
            Some(old) if old.align == w.align => Window {
                align: w.align,
                left: min(old.left, w.left),
                right: min(old.right, w.right),
            },
            Some(old) => {
                self.conflict = Some((old.align, w.align));
                old
            }
        });
    }

    /// Validates everything against `s` and returns what the planner needs.
    pub fn spec(&self, s: &AttnShape) -> Result<MaskSpec> {
        if let Some((a, b)) = self.conflict {
            return Err(Error::Argument(format!(
                "causal/window requests disagree on alignment: {} and {}",
                a.name(),
                b.name()
            )));
        }
        let mut spec = MaskSpec::default();
        let block = self.block_of(s)?;
        let (m_all, n_all) = (block.rows_total, block.keys_total);
        // The kernels add a diagonal (< M + N of the whole sequences) and a window bound
        // (≤ that) in i32.
        let i32_room = (i32::MAX as usize - 1) / 2;
        if m_all + n_all > i32_room {
            return Err(Error::Limit {
                what: format!("M + N = {}", m_all + n_all),
                asked: (m_all + n_all) as u64,
                limit_name: "i32 row/key arithmetic of the masks",
                limit: i32_room as u64,
            });
        }
        if let Some(w) = self.window {
            // Wider than M + N is unbounded in effect; clamping keeps the kernels' i32 sums safe.
            let clamp = |x: Option<usize>| x.map_or(UNBOUNDED, |x| x.min(m_all + n_all) as u32);
            spec.win_left = clamp(w.left);
            spec.win_right = clamp(w.right);
            spec.bottom_right = u32::from(w.align == Alignment::BottomRight);
            // The block's lengths are its own, unclipped (`lens_words`): bottom-right, its
            // diagonal i + kv_len − q_len is the whole one's already; top-left, row i sits on
            // key row_offset + i of the whole source, key row_offset + i − key_offset here.
            if w.align == Alignment::TopLeft {
                spec.diag_shift = block.row_offset as i32 - block.key_offset as i32;
            }
        }
        if let Some(l) = &self.q_lens {
            check_lens("q_lens", l, s, m_all)?;
        }
        if let Some(l) = &self.kv_lens {
            check_lens("kv_lens", l, s, n_all)?;
        }
        spec.lens = self.q_lens.is_some() || self.kv_lens.is_some();
        if let Some(m) = &self.mask {
            check_broadcast("mask", m.dims, m.data.len(), s)?;
            spec.flags |= flags::MASK;
            spec.mask_dims = Some(m.dims);
        }
        if let Some(b) = &self.bias {
            check_broadcast("bias", b.dims, b.data.len(), s)?;
            if let Some(x) = b.data.iter().find(|x| x.is_nan() || **x > LOGIT_FACTOR_MAX) {
                return Err(Error::Argument(format!(
                    "bias holds {x}; each value must be finite and at most {LOGIT_FACTOR_MAX:e} \
                     (larger logits overflow f32 inside the kernels), or −∞ (any value ≤ \
                     {BIAS_REMOVES:e}) to remove its key"
                )));
            }
            spec.flags |= flags::BIAS;
            spec.bias_dims = Some(b.dims);
        }
        if let Some(cap) = self.softcap {
            if !(cap > 0.0 && cap <= LOGIT_FACTOR_MAX) {
                return Err(Error::Argument(format!(
                    "softcap must be > 0 and at most {LOGIT_FACTOR_MAX:e} (capped logits are \
                     carried in f32), got {cap}"
                )));
            }
            spec.flags |= flags::SOFTCAP;
            spec.softcap = cap;
        }
        self.check_segments(n_all)?;
        // The segments' parts within the block's keys, in its own key indices.
        let (k0, k1) = (block.key_offset, block.key_offset + s.n);
        let local = self
            .segments
            .iter()
            .map(|g| (g.start.max(k0), g.end.min(k1), g.factor))
            .filter(|(a, b, _)| a < b);
        let mut n_segments = 0;
        for (slot, (a, b, factor)) in spec.segments.iter_mut().zip(local) {
            *slot = ((a - k0) as u32, (b - k0) as u32, factor);
            n_segments += 1;
        }
        spec.n_segments = n_segments;
        if n_segments > 0 {
            spec.flags |= flags::SEGMENTS;
        }
        if let Some(d) = self.dropout.filter(|d| d.p != 0.0) {
            if self.block.is_some() {
                return Err(Error::Unsupported(
                    "dropout in a block of a longer call (its keep mask is drawn at the block's \
                     own row and key indices)"
                        .into(),
                ));
            }
            if !(0.0..1.0).contains(&d.p) {
                return Err(Error::Argument(format!(
                    "dropout probability must be in [0, 1), got {}",
                    d.p
                )));
            }
            // The kernels form the element index's row part, (b·q_heads + h)·M + i, in u32.
            let rows = s.batch * s.q_heads * s.m;
            if rows > u32::MAX as usize {
                return Err(Error::Limit {
                    what: format!("batch × q_heads × M = {rows} rows under dropout"),
                    asked: rows as u64,
                    limit_name: "u32 row index of the dropout counter",
                    limit: u64::from(u32::MAX),
                });
            }
            spec.flags |= flags::DROPOUT;
            spec.dropout = Some(d);
        }
        Ok(spec)
    }

    /// Refuses a scale whose logits, alone or times a key segment's factor, f32 cannot carry
    /// through the kernels (see [`LOGIT_FACTOR_MAX`]).
    pub(crate) fn check_scale(&self, scale: f32) -> Result<()> {
        if !scale.is_finite() {
            return Err(Error::Argument(format!(
                "scale must be finite, got {scale}"
            )));
        }
        let segments = self.segments.iter().map(|g| {
            let what = format!("scale × factor of key segment [{}, {})", g.start, g.end);
            (g.factor, what)
        });
        for (factor, what) in std::iter::once((1.0, "scale".to_string())).chain(segments) {
            // A product that overflows is inf, refused like any other beyond the bound.
            let x = scale * factor;
            if x.abs() > LOGIT_FACTOR_MAX {
                return Err(Error::Argument(format!(
                    "{what} is {x:e}; it must be within ±{LOGIT_FACTOR_MAX:e} (logits are \
                     carried in f32 after the kernels pre-scale them by log2 e)"
                )));
            }
        }
        Ok(())
    }

    /// The block of `s` (the whole call when there is none), checked: it lies within the
    /// whole sequences.
    pub fn block_of(&self, s: &AttnShape) -> Result<Block> {
        let Some(b) = self.block else {
            return Ok(Block::keys(0, s.n, s.m));
        };
        if b.row_offset + s.m > b.rows_total || b.key_offset + s.n > b.keys_total {
            return Err(Error::Shape(format!(
                "a block of M = {} rows from row {} and N = {} keys from key {} does not lie \
                 within {} rows and {} keys",
                s.m, b.row_offset, s.n, b.key_offset, b.rows_total, b.keys_total
            )));
        }
        Ok(b)
    }

    fn check_segments(&self, keys: usize) -> Result<()> {
        if self.segments.len() > MAX_SEGMENTS {
            return Err(Error::Argument(format!(
                "{} key segments given; at most {MAX_SEGMENTS} are supported",
                self.segments.len()
            )));
        }
        let mut sorted = self.segments.clone();
        sorted.sort_by_key(|g| g.start);
        for g in &sorted {
            if g.start >= g.end || g.end > keys {
                return Err(Error::Argument(format!(
                    "key segment [{}, {}) must be non-empty and within the {} keys",
                    g.start, g.end, keys
                )));
            }
            if !(g.factor.is_finite() && g.factor > 0.0) {
                return Err(Error::Argument(format!(
                    "key segment [{}, {}) has factor {}; it must be finite and > 0",
                    g.start, g.end, g.factor
                )));
            }
        }
        if let Some(w) = sorted.windows(2).find(|w| w[1].start < w[0].end) {
            return Err(Error::Argument(format!(
                "key segments [{}, {}) and [{}, {}) overlap",
                w[0].start, w[0].end, w[1].start, w[1].end
            )));
        }
        Ok(())
    }

    /// `[q_lens..., kv_lens...]` as the kernels read them (defaults M and N). In a
    /// [`Block`], the lengths past its first row and key, not clipped to its M and N (the
    /// kernels bound rows and keys by M and N themselves): a bottom-right diagonal
    /// `i + kv_len − q_len` then is the whole call's, and a length before the block is 0.
    /// Call after [`Masking::spec`] has checked the block.
    pub fn lens_words(&self, s: &AttnShape) -> Vec<u32> {
        let b = self.block.unwrap_or(Block::keys(0, s.n, s.m));
        let q = self
            .q_lens
            .clone()
            .unwrap_or_else(|| vec![b.rows_total as u32; s.batch]);
        let kv = self
            .kv_lens
            .clone()
            .unwrap_or_else(|| vec![b.keys_total as u32; s.batch]);
        let q = q.into_iter().map(|l| l.saturating_sub(b.row_offset as u32));
        let kv = kv
            .into_iter()
            .map(|l| l.saturating_sub(b.key_offset as u32));
        q.chain(kv).collect()
    }

    /// The bias as the kernels read it: values ≤ [`BIAS_REMOVES`] become −∞.
    pub fn bias_values(&self) -> Option<Vec<f32>> {
        let b = self.bias.as_ref()?;
        Some(
            b.data
                .iter()
                .map(|&x| {
                    if x <= BIAS_REMOVES {
                        f32::NEG_INFINITY
                    } else {
                        x
                    }
                })
                .collect(),
        )
    }

    /// The bool mask packed as the kernels read it: each row of N keys in ⌈N/32⌉ u32 words,
    /// key j at bit j % 32 of word j / 32 (1 = may attend).
    pub fn mask_words(&self) -> Option<Vec<u32>> {
        let m = self.mask.as_ref()?;
        let n = m.dims[3];
        let per_row = n.div_ceil(32);
        let rows = m.data.len() / n;
        let mut words = vec![0u32; rows * per_row];
        for (r, row) in m.data.chunks(n).enumerate() {
            for (j, _) in row.iter().enumerate().filter(|(_, &x)| x) {
                words[r * per_row + j / 32] |= 1 << (j % 32);
            }
        }
        Some(words)
    }
}

impl MaskSpec {
    /// Writes the mask fields of `p` (shape fields must already be set).
    pub fn apply(&self, p: &mut AttnParams) {
        p.flags = self.flags;
        p.softcap = self.softcap;
        p.win_left = self.win_left;
        p.win_right = self.win_right;
        p.bottom_right = self.bottom_right;
        p.diag_shift = self.diag_shift;
        if let Some(d) = self.mask_dims {
            [p.mask_b, p.mask_h, p.mask_row] = broadcast_strides(d, d[3].div_ceil(32));
        }
        if let Some(d) = self.bias_dims {
            [p.bias_b, p.bias_h, p.bias_row] = broadcast_strides(d, d[3]);
        }
        if let Some(d) = self.dropout {
            d.apply(p);
        }
        p.n_segments = self.n_segments;
        for (i, &(start, end, factor)) in self.segments.iter().enumerate() {
            p.seg_start[i] = start;
            p.seg_end[i] = end;
            p.seg_factor[i] = factor;
        }
    }

    /// Whether nothing is masked, shaped or dropped.
    pub fn is_empty(&self) -> bool {
        self.flags == 0 && !self.lens && self.win_left == UNBOUNDED && self.win_right == UNBOUNDED
    }

    /// Whether any key is removed or any logit reshaped before the softmax: what the
    /// kernels' `masked` variants handle. Dropout, which acts on the weights after the
    /// softmax, does not count (the dropout variants handle it).
    pub fn masks_logits(&self) -> bool {
        !MaskSpec {
            flags: self.flags & !flags::DROPOUT,
            ..*self
        }
        .is_empty()
    }
}

impl std::fmt::Display for MaskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        let bound = |x: u32| {
            if x == UNBOUNDED {
                "∞".to_string()
            } else {
                x.to_string()
            }
        };
        let align = if self.bottom_right == 1 {
            Alignment::BottomRight
        } else {
            Alignment::TopLeft
        }
        .name();
        match (self.win_left, self.win_right) {
            (UNBOUNDED, UNBOUNDED) => {}
            (UNBOUNDED, 0) => parts.push(format!("causal {align}")),
            (left, right) => parts.push(format!(
                "window {align} (left {}, right {})",
                bound(left),
                bound(right)
            )),
        }
        if self.diag_shift != 0 {
            parts.push(format!("diagonal shifted {}", self.diag_shift));
        }
        if self.lens {
            parts.push("per-sequence lengths".into());
        }
        if let Some(d) = self.mask_dims {
            parts.push(format!("bool mask {d:?}"));
        }
        if let Some(d) = self.bias_dims {
            parts.push(format!("bias {d:?}"));
        }
        if self.flags & flags::SOFTCAP != 0 {
            parts.push(format!("softcap {}", self.softcap));
        }
        if self.n_segments > 0 {
            parts.push(format!("{} key segment(s)", self.n_segments));
        }
        if let Some(d) = self.dropout {
            parts.push(format!(
                "dropout p {} (seed {}, offset {})",
                d.p, d.seed, d.offset
            ));
        }
        if parts.is_empty() {
            write!(f, "none")
        } else {
            write!(f, "{}", parts.join(", "))
        }
    }
}
