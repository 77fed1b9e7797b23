//! What attends to what, for `xattn run` and `xattn mha`: the statistics of P written as
//! `.npy` files (`--entropy`, `--focus`, `--coverage`) on any path, without storing P.

use std::path::PathBuf;

use clap::Args;
use xattn::{Attention, AttnShape, Stats, StatsOutput, Tensor};

use crate::outputs::Outputs;
use crate::run::out_dims;
use crate::{CliError, CliResult};

/// Statistics of the attention weights P (see `xattn::stats`), each f32.
#[derive(Debug, Args)]
pub struct AnalyticsArgs {
    /// Write each query row's entropy −Σ_j P_ij ln P_ij (natural log) of its weights,
    /// [batch, heads, M]; 0 for a row that sees no key.
    #[arg(long, value_name = "FILE")]
    entropy: Option<PathBuf>,
    /// Write each query row's focus max_j P_ij, [batch, heads, M]; 0 for a row that sees no key.
    #[arg(long, value_name = "FILE")]
    focus: Option<PathBuf>,
    /// Write each key's coverage Σ_i P_ij over the query rows, [batch, heads, N]; 0 for a
    /// key no row may see.
    #[arg(long, value_name = "FILE")]
    coverage: Option<PathBuf>,
}

impl AnalyticsArgs {
    /// The statistics asked for.
    pub fn stats(&self) -> Stats {
        Stats {
            entropy: self.entropy.is_some(),
            focus: self.focus.is_some(),
            coverage: self.coverage.is_some(),
        }
    }

    /// `opts` computing what these flags ask for.
    pub fn apply(&self, opts: Attention) -> Attention {
        opts.with_stats(self.stats())
    }

    /// The output files, for [`Outputs::create`].
    pub fn targets(&self) -> [(&'static str, Option<&PathBuf>); 3] {
        [
            ("--entropy", self.entropy.as_ref()),
            ("--focus", self.focus.as_ref()),
            ("--coverage", self.coverage.as_ref()),
        ]
    }

    /// Writes the statistics of `stats` (per head, for shape `s`) to their files; `squeeze`
    /// drops the batch axis as for the other outputs.
    pub fn write(
        &self,
        outputs: &mut Outputs,
        stats: &StatsOutput<Tensor>,
        s: &AttnShape,
        squeeze: bool,
    ) -> CliResult<()> {
        let files = [&self.entropy, &self.focus, &self.coverage];
        let lens = [s.m, s.m, s.n];
        for ((path, (name, t)), len) in files.into_iter().zip(stats.named()).zip(lens) {
            let Some(path) = path else { continue };
            let t = t.ok_or_else(|| CliError::new(format!("the plan computed no {name}")))?;
            let dims = out_dims(&[s.batch, s.q_heads, len], squeeze);
            outputs.write(path, &t.to_host()?, &dims)?;
        }
        Ok(())
    }
}
