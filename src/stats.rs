//! What attends to what: statistics of the attention weights P and pooled maps of P,
//! computed on the GPU on every path without storing M×N.
//!
//! Each is a reduction of `P_ij = exp(s_ij − LSE_i)` over blocks of (query rows × keys), P
//! rebuilt from Q, K, the masks and the LSE of the finished attention by the `weight_blocks`
//! kernel (one pass over the keys per statistic). Removed keys have P = 0; rows that see no
//! key (LSE = −∞) have P = 0 everywhere, so H = 0 and F = 0 there and they add nothing to C.

/// Statistics of P to compute with the attention ([`crate::Attention::with_stats`]). All f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    /// Row entropy `H[b, h, i] = −Σ_j P_ij ln P_ij` (natural log), `[batch, q_heads, M]`.
    pub entropy: bool,
    /// Row focus `F[b, h, i] = max_j P_ij`, `[batch, q_heads, M]`.
    pub focus: bool,
    /// Key coverage `C[b, h, j] = Σ_i P_ij` over the query rows, `[batch, q_heads, N]`.
    pub coverage: bool,
}

impl Stats {
    /// Entropy, focus and coverage.
    pub const ALL: Stats = Stats {
        entropy: true,
        focus: true,
        coverage: true,
    };

    /// Whether any statistic is asked for.
    pub fn any(&self) -> bool {
        self.entropy || self.focus || self.coverage
    }
}

/// How a block of values is pooled into one value of a map (on the GPU from blocks of P,
/// or on the host by `heatmap::pool_host`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolOp {
    /// The largest value of the block: a key read strongly by one query in the block stays
    /// visible however large the map is.
    Max,
    /// The mean over the block's real values (a partial edge block is averaged over the
    /// values it holds, not over the full block size).
    Mean,
}

impl PoolOp {
    /// Name used by the CLI and in captions (`max`, `mean`).
    pub fn name(&self) -> &'static str {
        match self {
            PoolOp::Max => "max",
            PoolOp::Mean => "mean",
        }
    }
}

impl std::str::FromStr for PoolOp {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> crate::error::Result<Self> {
        match s {
            "max" => Ok(PoolOp::Max),
            "mean" => Ok(PoolOp::Mean),
            _ => Err(crate::error::Error::Argument(format!(
                "unknown pooling `{s}` (expected max or mean)"
            ))),
        }
    }
}

/// A map of P pooled to at most `max_side` values a side
/// ([`crate::Attention::with_pooled_weights`]): blocks of `⌈M / max_side⌉` rows ×
/// `⌈N / max_side⌉` keys, output `[batch, q_heads, ⌈M / block_rows⌉, ⌈N / block_cols⌉]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool {
    /// Most values per side of the map (≥ 1).
    pub max_side: usize,
    /// How a block becomes a value.
    pub op: PoolOp,
}

impl Pool {
    /// Largest `max_side` a heatmap uses.
    pub const HEATMAP_SIDE: usize = 2048;

    /// Query rows and keys per block for `m` rows and `n` keys.
    pub fn block(&self, m: usize, n: usize) -> (usize, usize) {
        let side = self.max_side.max(1);
        (m.div_ceil(side).max(1), n.div_ceil(side).max(1))
    }

    /// The map's rows and columns for `m` rows and `n` keys.
    pub fn grid(&self, m: usize, n: usize) -> (usize, usize) {
        let (br, bc) = self.block(m, n);
        (m.div_ceil(br), n.div_ceil(bc))
    }
}

/// The statistics and pooled map of one call, where asked for; `T` is a device
/// [`Tensor`](crate::Tensor) in [`crate::Output`] and a host `Vec<f32>` in
/// [`crate::HostOutput`].
#[derive(Clone, Debug, PartialEq)]
pub struct StatsOutput<T> {
    /// Row entropy `[batch, q_heads, M]`.
    pub entropy: Option<T>,
    /// Row focus `[batch, q_heads, M]`.
    pub focus: Option<T>,
    /// Key coverage `[batch, q_heads, N]`.
    pub coverage: Option<T>,
    /// Pooled P `[batch, q_heads, rows, cols]` (see [`Pool::grid`]).
    pub pooled: Option<T>,
}

impl<T> Default for StatsOutput<T> {
    fn default() -> Self {
        Self {
            entropy: None,
            focus: None,
            coverage: None,
            pooled: None,
        }
    }
}

impl StatsOutput<crate::gpu::tensor::Tensor> {
    /// Each output read back to the host.
    pub fn to_host(&self) -> crate::error::Result<StatsOutput<Vec<f32>>> {
        self.as_ref().try_map(crate::gpu::tensor::Tensor::to_host)
    }
}

impl<T> StatsOutput<T> {
    /// Each output with its name, in the order entropy, focus, coverage, pooled.
    pub fn named(&self) -> [(&'static str, Option<&T>); 4] {
        [
            ("entropy", self.entropy.as_ref()),
            ("focus", self.focus.as_ref()),
            ("coverage", self.coverage.as_ref()),
            ("pooled", self.pooled.as_ref()),
        ]
    }

    /// The outputs by reference.
    pub fn as_ref(&self) -> StatsOutput<&T> {
        StatsOutput {
            entropy: self.entropy.as_ref(),
            focus: self.focus.as_ref(),
            coverage: self.coverage.as_ref(),
            pooled: self.pooled.as_ref(),
        }
    }

    /// Applies `f` to each output present.
    pub fn try_map<U, E>(
        self,
        mut f: impl FnMut(T) -> std::result::Result<U, E>,
    ) -> std::result::Result<StatsOutput<U>, E> {
        let mut g = |t: Option<T>| t.map(&mut f).transpose();
        Ok(StatsOutput {
            entropy: g(self.entropy)?,
            focus: g(self.focus)?,
            coverage: g(self.coverage)?,
            pooled: g(self.pooled)?,
        })
    }
}
