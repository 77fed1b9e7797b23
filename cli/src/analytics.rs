//! What attends to what, for `xattn run` and `xattn mha`: the statistics of P written as
//! `.npy` files (`--entropy`, `--focus`, `--coverage`) and heatmaps of P pooled on the GPU
//! (`--heatmap DIR`), on any path, without storing P.

use std::io::Read;
use std::path::{Path as FsPath, PathBuf};

use clap::Args;
use xattn::heatmap::{render_png, HeatmapStyle};
use xattn::{Attention, AttnShape, Pool, PoolOp, Stats, StatsOutput, Tensor};

use crate::inputs::out_dims;
use crate::outputs::Outputs;
use crate::{open_file, CliError, CliResult};

/// Statistics of the attention weights P (see `xattn::stats`), each f32.
#[derive(Debug, Args)]
#[command(next_help_heading = "Statistics and heatmaps of P")]
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
    /// Write heatmaps of P (rows = queries, columns = keys, viridis, with a legend) into this
    /// folder, created if missing: b<batch>_h<head>.png per head and b<batch>_mean.png, the
    /// mean of the heads' maps. Maps over 2048 a side are pooled on the GPU (--pool) from
    /// blocks of P, which is never stored whole.
    #[arg(long, value_name = "DIR")]
    heatmap: Option<PathBuf>,
    /// How --heatmap pools blocks of P: max (a strong link stays visible) or mean.
    #[arg(long, default_value = "max", value_name = "OP", requires = "heatmap")]
    pool: PoolOp,
    /// Query token labels for --heatmap, one per line (M lines), drawn where rows are tall
    /// enough and the map is not pooled along the queries.
    #[arg(long, value_name = "FILE", requires = "heatmap")]
    q_labels: Option<PathBuf>,
    /// Key token labels for --heatmap, one per line (N lines), drawn where columns are wide
    /// enough and the map is not pooled along the keys.
    #[arg(long, value_name = "FILE", requires = "heatmap")]
    k_labels: Option<PathBuf>,
}

/// What `--heatmap` draws, checked before the run: the folder and the labels.
pub struct Heatmaps {
    dir: PathBuf,
    pool: Pool,
    q_labels: Option<Vec<String>>,
    k_labels: Option<Vec<String>>,
}

/// One label per line of `path`; exactly `count` of them (the `flag`'s axis length). Only a
/// regular file is read (a FIFO would block).
fn read_labels(flag: &str, path: &FsPath, count: usize) -> CliResult<Vec<String>> {
    let fail = |e: String| CliError::new(format!("cannot read {flag} {}: {e}", path.display()));
    let (mut file, len) = open_file(path).map_err(|e| CliError::new(format!("{flag}: {e}")))?;
    let mut text = String::with_capacity(usize::try_from(len).unwrap_or(0));
    file.read_to_string(&mut text)
        .map_err(|e| fail(e.to_string()))?;
    let labels: Vec<String> = text.lines().map(str::to_string).collect();
    if labels.len() != count {
        return Err(CliError::new(format!(
            "{flag} {} has {} lines; it needs one label per line, {count} of them",
            path.display(),
            labels.len()
        )));
    }
    Ok(labels)
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

    /// The pooled map `--heatmap` needs.
    fn pool(&self) -> Option<Pool> {
        self.heatmap.as_ref().map(|_| Pool {
            max_side: Pool::HEATMAP_SIDE,
            op: self.pool,
        })
    }

    /// `opts` computing what these flags ask for.
    pub fn apply(&self, opts: Attention) -> Attention {
        let opts = opts.with_stats(self.stats());
        match self.pool() {
            Some(pool) => opts.with_pooled_weights(pool),
            None => opts,
        }
    }

    /// Reads the labels and creates the heatmap folder (before any device work), for shape
    /// `s`, and adds the maps' files to `outputs`: written with the other outputs, all or none.
    pub fn heatmaps(&self, s: &AttnShape, outputs: &mut Outputs) -> CliResult<Option<Heatmaps>> {
        let (Some(dir), Some(pool)) = (&self.heatmap, self.pool()) else {
            return Ok(None);
        };
        let (q_labels, k_labels) = (
            self.q_labels
                .as_deref()
                .map(|p| read_labels("--q-labels", p, s.m))
                .transpose()?,
            self.k_labels
                .as_deref()
                .map(|p| read_labels("--k-labels", p, s.n))
                .transpose()?,
        );
        outputs.create_dir("--heatmap", dir)?;
        let maps = Heatmaps {
            dir: dir.clone(),
            pool,
            q_labels,
            k_labels,
        };
        for (name, _) in maps.files(s) {
            outputs.add("--heatmap", &dir.join(name))?;
        }
        Ok(Some(maps))
    }

    /// Whether any statistic or heatmap is asked for.
    pub fn asked(&self) -> bool {
        self.heatmap.is_some() || self.targets().iter().any(|(_, t)| t.is_some())
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

impl Heatmaps {
    /// The maps' file names for shape `s`, each with the head it shows (`None`: the mean).
    fn files(&self, s: &AttnShape) -> Vec<(String, Option<usize>)> {
        (0..s.batch)
            .flat_map(|b| {
                (0..s.q_heads)
                    .map(move |h| (format!("b{b}_h{h}.png"), Some(h)))
                    .chain([(format!("b{b}_mean.png"), None)])
            })
            .collect()
    }

    /// Writes one PNG per (batch, head) of `pooled [batch, heads, rows, cols]` and one per
    /// batch entry of `mean [batch, rows, cols]` (the mean over heads; computed here from
    /// `pooled` when `None`) to `outputs`, which [`AnalyticsArgs::heatmaps`] added them to.
    /// Returns the number of files written.
    pub fn write(
        &self,
        outputs: &mut Outputs,
        s: &AttnShape,
        pooled: &Tensor,
        mean: Option<&Tensor>,
    ) -> CliResult<usize> {
        let (rows, cols) = self.pool.grid(s.m, s.n);
        let (br, bc) = self.pool.block(s.m, s.n);
        let maps = pooled.to_host()?;
        let area = rows * cols;
        let mean = match mean {
            Some(t) => t.to_host()?,
            None => (0..s.batch * area)
                .map(|e| {
                    let (b, x) = (e / area, e % area);
                    let sum: f32 = (0..s.q_heads)
                        .map(|h| maps[(b * s.q_heads + h) * area + x])
                        .sum();
                    sum / s.q_heads as f32
                })
                .collect(),
        };
        // Labels only along an axis the map shows one value per token.
        let (q_labels, k_labels) = (
            self.q_labels.clone().filter(|_| br == 1),
            self.k_labels.clone().filter(|_| bc == 1),
        );
        if (self.q_labels.is_some() && br > 1) || (self.k_labels.is_some() && bc > 1) {
            eprintln!(
                "xattn: labels are drawn only along an axis that is not pooled; this map pools \
                 blocks of {br} rows × {bc} keys"
            );
        }
        let what = if br * bc == 1 {
            "P".to_string()
        } else {
            format!("{}-pooled {br}×{bc} blocks of P", self.pool.op.name())
        };
        let files = self.files(s);
        for (i, (name, head)) in files.iter().enumerate() {
            let b = i / (s.q_heads + 1);
            let (values, caption) = match head {
                Some(h) => {
                    let at = (b * s.q_heads + h) * area;
                    (&maps[at..at + area], format!("{what}, batch {b} head {h}"))
                }
                None => (
                    &mean[b * area..(b + 1) * area],
                    format!("{what}, batch {b}, mean of {} heads", s.q_heads),
                ),
            };
            let style = HeatmapStyle {
                q_labels: q_labels.clone(),
                k_labels: k_labels.clone(),
                caption: Some(caption),
                range: None,
            };
            let png = render_png(values, rows, cols, &style)?;
            outputs.write_bytes(&self.dir.join(name), &png)?;
        }
        Ok(files.len())
    }

    /// The folder the maps go to.
    pub fn dir(&self) -> &FsPath {
        &self.dir
    }
}
