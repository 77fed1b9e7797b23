//! `xattn bench`: headless timings of each path on standard or custom shapes.
//!
//! Times GPU completion, not submission: with `TIMESTAMP_QUERY` the GPU's own timestamps
//! bracket the call's passes; otherwise the host clock brackets `Prepared::run`, which waits
//! until the device is idle. Inputs are uploaded once per shape and outputs allocated once
//! per (shape, path), so only the attention itself is measured. With autotuning (the default)
//! the fused kernel's configuration is chosen while planning, before any timed run. With
//! `--backward` each forward is followed by its backward ([`backward`]), timed alike.

mod backward;
mod graph;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use xattn::cpu::reference;
use xattn::{
    Attention, AttnShape, ConfigChoice, ConfigSource, Context, DType, Engine, FusedConfig,
    GpuTimer, Path, Prepared, Stats, Storage, Tensor,
};

use crate::distributed::{self, DistArgs, ModeArg, Timed};
use crate::masks::AlignArg;
use crate::outputs::Outputs;
use crate::precision::DtypeArg;
use crate::suite::{self, SuiteShape};
use crate::{one_line, parse_path_choice, path_names_hint, CliError, CliResult};

/// Named shape suites.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SuiteName {
    /// The standard patterns at small sizes, checked against the reference (the default).
    Quick,
    /// diffusion, decode, square, perceiver at their real sizes.
    Standard,
    /// The standard suite and the 16384×16384 `long` shape.
    Full,
}

/// Statistics of P timed next to plain attention (`--stats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatArg {
    /// Row entropy.
    Entropy,
    /// Row focus (max weight).
    Focus,
    /// Key coverage.
    Coverage,
    /// All three in one call.
    All,
}

impl StatArg {
    fn stats(self) -> Stats {
        match self {
            StatArg::Entropy => Stats {
                entropy: true,
                ..Stats::default()
            },
            StatArg::Focus => Stats {
                focus: true,
                ..Stats::default()
            },
            StatArg::Coverage => Stats {
                coverage: true,
                ..Stats::default()
            },
            StatArg::All => Stats::ALL,
        }
    }

    fn name(self) -> &'static str {
        match self {
            StatArg::Entropy => "entropy",
            StatArg::Focus => "focus",
            StatArg::Coverage => "coverage",
            StatArg::All => "stats",
        }
    }
}

/// Which paths to time on each shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathSet {
    /// Every path that plans.
    All,
    /// One path, or the planner's choice (`None`).
    One(Option<Path>),
}

fn parse_path_set(s: &str) -> Result<PathSet, String> {
    if s == "all" {
        return Ok(PathSet::All);
    }
    parse_path_choice(s)
        .map(|c| PathSet::One(c.0))
        .map_err(|_| path_names_hint(s, &["all", "auto"]))
}

/// Options of `xattn bench` (the subcommand's help in `main.rs` says how they combine).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Shape suite to run.
    #[arg(long, value_enum)]
    suite: Option<SuiteName>,
    /// Run only the shapes of this name (repeatable; suite names or the custom --name).
    #[arg(long, value_name = "NAME")]
    only: Vec<String>,
    /// Causal mask on every shape, aligned top-left (row i sees keys ≤ i) or bottom-right
    /// (row i sees keys ≤ i + N − M). --check compares with the masked reference. GFLOP/s
    /// still counts the full M×N work, so it compares directly with unmasked runs.
    #[arg(long, value_enum, value_name = "ALIGN")]
    causal: Option<AlignArg>,
    /// Name of the custom shape in the table and JSON.
    #[arg(long, default_value = "custom")]
    name: String,
    /// Custom shape: batch size (default 1).
    #[arg(long)]
    batch: Option<usize>,
    /// Custom shape: query heads (default 1).
    #[arg(long)]
    heads: Option<usize>,
    /// Custom shape: key/value heads (default: --heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Custom shape: query rows M.
    #[arg(long)]
    m: Option<usize>,
    /// Custom shape: key/value rows N.
    #[arg(long)]
    n: Option<usize>,
    /// Custom shape: query/key head dim.
    #[arg(long)]
    dk: Option<usize>,
    /// Custom shape: value head dim (default: --dk).
    #[arg(long)]
    dv: Option<usize>,
    /// Paths to time: all (every path that plans), auto, three-pass, fused or split-k.
    #[arg(long, default_value = "all", value_parser = parse_path_set)]
    path: PathSet,
    /// Untimed runs before timing (default 2, 1 with --quick or the quick suite).
    #[arg(long)]
    warmup: Option<u32>,
    /// Timed runs; the median is reported (default 5, 3 with --quick or the quick suite).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    runs: Option<u32>,
    /// Fewer runs: warmup 1, runs 3 (explicit --warmup/--runs still win).
    #[arg(long)]
    quick: bool,
    /// Compare O with the CPU reference (f64) and report the max abs error (always on for the
    /// quick suite).
    #[arg(long)]
    check: bool,
    /// With --check, skip the reference for shapes above this many GFLOP (it is naive f64).
    #[arg(long, default_value_t = 4.0)]
    check_max_gflop: f64,
    /// With --check, the max abs error above which a result counts as failed (f32 compute on
    /// the inputs as stored). A half O is rounded once more when written: f16 and bf16 runs
    /// add half an ulp of the largest |O|, 2⁻¹¹·max|O| (f16) or 2⁻⁸·max|O| (bf16).
    #[arg(long, default_value_t = 1e-3)]
    tolerance: f64,
    /// Store the inputs (and O) as f32, f16 or bf16; compute is f32 in every case. Several,
    /// comma-separated (--dtype f32,f16,bf16), time each shape and path in each, side by side
    /// with their time ratios. --check compares with the reference on the rounded inputs.
    #[arg(
        long,
        value_enum,
        value_name = "TYPES",
        value_delimiter = ',',
        default_value = "f32"
    )]
    dtype: Vec<DtypeArg>,
    /// Write one JSON record per (shape, path) timed to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seed of the random inputs (uniform in [-1, 1]).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Time with the host clock even where GPU timestamps are available.
    #[arg(long)]
    wall_clock: bool,
    /// Read f16 as packed pairs in u32 words even where the device has SHADER_F16 (to time
    /// the packed storage against the native one on the same device).
    #[arg(long)]
    packed_f16: bool,
    /// Also time each (shape, path) computing statistics of P, each listed one on its own
    /// (entropy, focus, coverage; all = the three in one call), next to plain attention;
    /// the path column shows them as `fused+entropy`, the ratios as their cost.
    #[arg(long, value_enum, value_name = "STATS", value_delimiter = ',')]
    stats: Vec<StatArg>,
    /// Time the planner's default configuration of the fused kernel. Without this flag (or
    /// XATTN_AUTOTUNE=0), a few candidate configurations are timed once per adapter and shape
    /// bucket before the timed runs, the fastest is used, and the winner is cached in
    /// $XATTN_CACHE_DIR, else $XDG_CACHE_HOME/xattn, else ~/.cache/xattn.
    #[arg(long)]
    no_autotune: bool,
    /// Run the fused kernel (fused and split-K paths) in this configuration instead of the
    /// default or the autotuner's: R=1, R=2 or R=4, each plain, with +lanes (subgroup lanes)
    /// or with +bcast (broadcast loads), or matrix-units (cooperative matrices; needs
    /// XATTN_MATRIX_UNITS=1 and an adapter that reports them, see `xattn info`).
    #[arg(long, value_name = "CONFIG", value_parser = parse_fused_config)]
    fused_config: Option<FusedConfig>,
    /// Also time the backward (dQ, dK, dV from a random dO) beside the forward of each shape
    /// and dtype, on the planner's path (or the one --path names): a `backward` row after the
    /// forward's, with its median ms and GFLOP/s counting the backward as 2.5× the forward's
    /// FLOPs (FlashAttention's count: five M×N matrix products, the recomputed Q·Kᵀ among
    /// them, to the forward's two), and the backward/forward time ratio on the shape's `time
    /// ratios` line. With --check (always on for the quick suite), dQ, dK and
    /// dV are compared with the f64 reference backward within budgets derived per gradient
    /// from the shape and the inputs (xattn::cpu::budget); --check-max-gflop counts 2.5×.
    #[arg(long, conflicts_with = "stats")]
    backward: bool,
    /// Time edge-list attention (xattn::graph) instead of the suites: random graphs of each
    /// --densities with uniform and power-law in-degrees (unique edges) against the fused
    /// path with the equivalent dense bool mask, side by side, with the bytes each moves at
    /// the least and the largest difference of their O. --m (default 16384), --n (default
    /// --m), --heads, --dk (default 64), --dv, --warmup (1), --runs (3) and --seed apply.
    #[arg(long, conflicts_with_all = ["backward", "stats", "suite"])]
    graph: bool,
    /// Edge densities E / (M·N) of --graph, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.001,0.01,0.1")]
    densities: Vec<f64>,
    /// `mpirun -n R xattn bench --distributed --mode lv|ring --m M --n N ...`: time one
    /// distributed call of the custom shape (random inputs, the first --dtype, --warmup 1 and
    /// --runs 3 unless given); rank 0 prints per rank the bytes sent and received (counted,
    /// and the byte model's), compute time, waiting time and the bytes in flight during
    /// compute. With --backward (--mode lv) the backward of the last forward is timed and
    /// reported likewise.
    #[command(flatten)]
    dist: DistArgs,
}

fn parse_fused_config(text: &str) -> Result<FusedConfig, String> {
    text.parse().map_err(|e: xattn::Error| e.to_string())
}

/// The custom shape given by flags, if any.
fn custom_shape(a: &BenchArgs) -> CliResult<Option<SuiteShape>> {
    let dims = [a.batch, a.heads, a.kv_heads, a.m, a.n, a.dk, a.dv];
    if dims.iter().all(Option::is_none) {
        return Ok(None);
    }
    let (Some(m), Some(n), Some(dk)) = (a.m, a.n, a.dk) else {
        return Err(CliError::usage(
            "a custom shape needs at least --m, --n and --dk",
        ));
    };
    let (b, h) = (a.batch.unwrap_or(1), a.heads.unwrap_or(1));
    let kvh = a.kv_heads.unwrap_or(h);
    let dv = a.dv.unwrap_or(dk);
    let shape = AttnShape::from_qkv([b, m, h, dk], [b, n, kvh, dk], [b, n, kvh, dv])?;
    Ok(Some(SuiteShape {
        name: a.name.clone(),
        shape,
        only: None,
    }))
}

/// How one (shape, path) was timed.
#[derive(Clone, Debug)]
struct Timing {
    median_ms: f64,
    min_ms: f64,
}

/// Outcome of the comparison with the CPU reference.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Check {
    /// `--check` not given.
    Off,
    /// Shape above `--check-max-gflop`.
    Skipped,
    /// Max abs error (NaN if any element was not finite).
    Err(f64),
}

/// One timed (shape, dtype, path).
#[derive(Clone, Debug)]
struct Record {
    name: String,
    shape: AttnShape,
    /// The inputs' (and O's) type.
    dtype: DType,
    /// How the kernels read it (native or packed halves).
    storage: Storage,
    requested: Option<Path>,
    path: Path,
    timing: Timing,
    check: Check,
    /// The error allowed by --check (--tolerance plus a half O's rounding).
    tolerance: f64,
    /// `none` or `causal top-left`/`causal bottom-right`.
    masks: String,
    /// The statistics computed with it, if any.
    stats: Option<StatArg>,
    /// The fused kernel's configuration and why, where the path runs it.
    config: Option<ConfigChoice>,
    /// The forward, or its backward (`--backward`).
    pass: Pass,
    /// What `check` compared: O, or the gradient furthest within (or past) its budget.
    checked: &'static str,
}

/// A forward attention call or its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::Backward => "backward",
        }
    }

    /// The FLOPs of this pass of `s`: the forward's 2·B·H·M·N·(d_k + d_v), and 2.5 times
    /// that for the backward, as FlashAttention counts it.
    fn flops(self, s: &AttnShape) -> f64 {
        match self {
            Pass::Forward => s.flops(),
            Pass::Backward => backward::FLOPS_FACTOR * s.flops(),
        }
    }
}

impl Record {
    fn gflops(&self) -> f64 {
        self.pass.flops(&self.shape) / (self.timing.median_ms * 1e6)
    }
    /// GB/s of the least traffic: Q, K, V read and O written once (the backward: Q, K, V,
    /// O and dO read, dQ, dK and dV written once).
    fn gbps(&self) -> f64 {
        let bytes = match self.pass {
            Pass::Forward => min_bytes(&self.shape, self.dtype),
            Pass::Backward => backward::min_bytes(&self.shape, self.dtype),
        };
        bytes as f64 / (self.timing.median_ms * 1e6)
    }
    fn failed(&self) -> bool {
        matches!(self.check, Check::Err(e) if e.is_nan() || e > self.tolerance)
    }
}

/// Bytes of Q, K, V read and O written once each, stored as `dtype`: the floor on traffic.
fn min_bytes(s: &AttnShape, dtype: DType) -> u64 {
    let e = |d: [usize; 4]| d.iter().product::<usize>() as u64 * dtype.size();
    e(s.q_dims()) + e(s.k_dims()) + e(s.v_dims()) + e(s.o_dims())
}

/// The unit roundoff of an O stored as `dtype` (half an ulp, relative): 2⁻¹¹ for f16, 2⁻⁸
/// for bf16; 0 for f32, whose rounding the f32 error model already holds.
fn out_rounding(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 0.0,
        DType::F16 => 2f64.powi(-11),
        DType::Bf16 => 2f64.powi(-8),
    }
}

/// The device and the settings every measurement shares.
struct Bench<'a> {
    engine: Engine,
    timer: Option<GpuTimer>,
    warmup: u32,
    runs: u32,
    /// Whether O is compared with the reference.
    check: bool,
    args: &'a BenchArgs,
}

/// What is left of a benchmark, estimated from the time the work so far took per FLOP (the
/// paths differ in speed, so it is an estimate; it firms up as the run goes).
struct Progress {
    start: Instant,
    done: f64,
    total: f64,
}

impl Progress {
    /// Progress over `shapes`, each timed on the paths of `set` in `dtypes` types and
    /// `variants` statistics variants, each run a pass of `passes`.
    fn new(
        shapes: &[SuiteShape],
        set: PathSet,
        (dtypes, variants): (usize, usize),
        passes: &[Pass],
    ) -> Self {
        let total = shapes
            .iter()
            .map(|s| {
                let runs = candidates(set, s)
                    .iter()
                    .filter(|(_, skip)| skip.is_none())
                    .count();
                passes.iter().map(|p| p.flops(&s.shape)).sum::<f64>() * runs as f64
            })
            .sum::<f64>()
            * (dtypes * variants) as f64;
        Self {
            start: Instant::now(),
            done: 0.0,
            total,
        }
    }

    fn advance(&mut self, pass: Pass, shape: &AttnShape) {
        self.done += pass.flops(shape);
    }

    /// ` (12 s so far, about 40 s left)`, once something has been measured.
    fn left(&self) -> String {
        if self.done == 0.0 {
            return String::new();
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        let left = elapsed * (self.total - self.done).max(0.0) / self.done;
        format!(" ({elapsed:.0} s so far, about {left:.0} s left)")
    }
}

/// Whether the autotuner runs, and where it keeps its winners.
fn autotune_label(engine: &Engine, args: &BenchArgs) -> String {
    if engine.autotune() {
        match engine.autotune_cache_file() {
            Some(file) => format!("on, winners cached in {}", file.display()),
            None => "on, winners kept in memory (no cache folder: set XATTN_CACHE_DIR)".into(),
        }
    } else if let Some(config) = args.fused_config {
        format!("off: --fused-config {config} on the fused and split-K paths")
    } else if args.no_autotune {
        "off (--no-autotune): the planner's default configurations".into()
    } else {
        "off (XATTN_AUTOTUNE=0): the planner's default configurations".into()
    }
}

/// The masks every shape runs with, for tables and JSON.
fn masks_label(causal: Option<AlignArg>) -> String {
    causal.map_or("none".to_string(), |a| {
        format!("causal {}", xattn::Alignment::from(a).name())
    })
}

/// The options of one (shape, path, statistics): the requested path, the statistics and the
/// --causal mask.
fn options(args: &BenchArgs, requested: Option<Path>, stats: Option<StatArg>) -> Attention {
    let mut opts = Attention::default()
        .with_path_choice(requested)
        .with_stats(stats.map_or(Stats::default(), StatArg::stats));
    if let Some(config) = args.fused_config {
        opts = opts.with_fused_config(config);
    }
    match args.causal {
        Some(a) => opts.with_causal(a.into()),
        None => opts,
    }
}

/// Seeded uniform values in [-1, 1].
fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..=1.0)).collect()
}

/// Host copies (rounded to the dtype) and device tensors of one shape's inputs.
struct Inputs {
    dtype: DType,
    host: [Vec<f32>; 3],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The reference O, computed on first use.
    reference_o: Option<Vec<f64>>,
    /// dO for the backward (`--backward`): host copy rounded to the dtype, and on the device.
    d_o: Option<(Vec<f32>, Tensor)>,
}

impl Bench<'_> {
    fn timing_method(&self) -> &'static str {
        if self.timer.is_some() {
            "timestamp"
        } else {
            "wall"
        }
    }

    /// The seeded inputs of shape `s` stored as `dtype`; the host copies hold the rounded
    /// values, so that the reference sees what the device reads. The same seed gives every
    /// dtype the same values before rounding.
    fn inputs(&self, s: &AttnShape, seed: u64, dtype: DType) -> CliResult<Inputs> {
        let mut rng = StdRng::seed_from_u64(seed);
        let len = |d: [usize; 4]| d.iter().product::<usize>();
        let mut draw = |dims: [usize; 4]| -> Vec<f32> {
            let x = random(&mut rng, len(dims));
            x.into_iter().map(|y| dtype.round(y)).collect()
        };
        let host = [draw(s.q_dims()), draw(s.k_dims()), draw(s.v_dims())];
        // Drawn after Q, K, V: they are the same with and without --backward.
        let d_o = self.args.backward.then(|| draw(s.o_dims()));
        let ctx = self.engine.context();
        let q = Tensor::upload_as(ctx, "q", &host[0], &s.q_dims(), dtype)?;
        let k = Tensor::upload_as(ctx, "k", &host[1], &s.k_dims(), dtype)?;
        let v = Tensor::upload_as(ctx, "v", &host[2], &s.v_dims(), dtype)?;
        // dO comes in O's type, which is the inputs'.
        let d_o = d_o
            .map(|h| {
                let t = Tensor::upload_as(ctx, "d_o", &h, &s.o_dims(), dtype)?;
                CliResult::Ok((h, t))
            })
            .transpose()?;
        Ok(Inputs {
            dtype,
            host,
            q,
            k,
            v,
            reference_o: None,
            d_o,
        })
    }

    /// One run, in milliseconds to GPU completion.
    fn time_once<O>(&self, call: &Prepared<O>) -> CliResult<f64> {
        let start = Instant::now();
        match &self.timer {
            Some(t) => Ok(call.run_timed(t)?),
            None => {
                call.run()?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            }
        }
    }

    /// Warmup and timed runs of `call`: their median and minimum.
    fn time<O>(&self, call: &Prepared<O>) -> CliResult<Timing> {
        for _ in 0..self.warmup {
            self.time_once(call)?;
        }
        let mut times = (0..self.runs)
            .map(|_| self.time_once(call))
            .collect::<CliResult<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        Ok(Timing {
            median_ms: xattn::tune::median(&times),
            min_ms: times[0],
        })
    }

    /// Warmup, timed runs and (with --check) the comparison for one planned path, with the
    /// error it is allowed.
    fn measure(
        &self,
        call: &Prepared,
        opts: &Attention,
        x: &mut Inputs,
    ) -> CliResult<(Timing, Check, f64)> {
        let timing = self.time(call)?;
        let (plan, out) = (call.plan(), call.output());
        let s = plan.shape();
        let mut tolerance = self.args.tolerance;
        let check = if !self.check {
            Check::Off
        } else if s.flops() > self.args.check_max_gflop * 1e9 {
            Check::Skipped
        } else {
            let got = out.o.to_host()?;
            let want = x.reference_o.get_or_insert_with(|| {
                eprintln!(
                    "      CPU reference for {s} {} ({:.2} GFLOP, f64) ...",
                    x.dtype,
                    s.flops() / 1e9
                );
                // Same masks for every path of a shape, so one reference serves them all.
                let scale = f64::from(opts.scale_for(s.d_k));
                let [q, k, v] = &x.host;
                reference::attention_masked(&s, q, k, v, scale, opts.masking()).o
            });
            let err = got
                .iter()
                .zip(want.iter())
                .map(|(&g, &w)| {
                    if g.is_finite() {
                        (f64::from(g) - w).abs()
                    } else {
                        f64::NAN
                    }
                })
                .fold(0.0, |acc: f64, e| {
                    if e.is_nan() || acc.is_nan() {
                        f64::NAN
                    } else {
                        acc.max(e)
                    }
                });
            let o_max = want.iter().fold(0.0f64, |a, w| a.max(w.abs()));
            tolerance += out_rounding(out.o.dtype()) * o_max;
            Check::Err(err)
        };
        Ok((timing, check, tolerance))
    }
}

/// Paths to try on one shape, with a reason for those the suite excludes.
fn candidates(set: PathSet, shape: &SuiteShape) -> Vec<(Option<Path>, Option<&'static str>)> {
    let requested: Vec<Option<Path>> = match set {
        PathSet::All => Path::ALL.iter().copied().map(Some).collect(),
        PathSet::One(p) => vec![p],
    };
    requested
        .into_iter()
        .map(|p| match (p, shape.only) {
            (Some(p), Some((only, why))) if p != only => (Some(p), Some(why)),
            _ => (p, None),
        })
        .collect()
}

fn path_label(requested: Option<Path>, actual: Option<Path>, stats: Option<StatArg>) -> String {
    let path = match (requested, actual) {
        (None, Some(p)) => format!("auto→{}", p.name()),
        (None, None) => "auto".to_string(),
        (Some(p), _) => p.name().to_string(),
    };
    match stats {
        Some(s) => format!("{path}+{}", s.name()),
        None => path,
    }
}

fn print_header() {
    println!(
        "{:<10} {:<26} {:<22} {:<11} {:>11} {:>11} {:>9} {:>8} {:>10}  masks",
        "shape", "dims", "path", "dtype", "median ms", "min ms", "GFLOP/s", "GB/s", "max |err|"
    );
}

fn print_row(r: &Record) {
    let err = match r.check {
        Check::Off => "-".to_string(),
        Check::Skipped => "skipped".to_string(),
        Check::Err(e) => format!("{e:.2e}{}", if r.failed() { " FAIL" } else { "" }),
    };
    let path = match r.pass {
        Pass::Forward => path_label(r.requested, Some(r.path), r.stats),
        // The error column is that of the gradient named (the furthest within its budget).
        Pass::Backward if matches!(r.check, Check::Err(_)) => {
            format!("backward (err: {})", r.checked)
        }
        Pass::Backward => "backward".to_string(),
    };
    println!(
        "{:<10} {:<26} {:<22} {:<11} {:>11.3} {:>11.3} {:>9.2} {:>8.2} {:>10}  {}",
        r.name,
        r.shape.to_string(),
        path,
        r.storage.name(),
        r.timing.median_ms,
        r.timing.min_ms,
        r.gflops(),
        r.gbps(),
        err,
        r.masks
    );
}

fn print_note(
    s: &SuiteShape,
    (requested, stats): (Option<Path>, Option<StatArg>),
    storage: Storage,
    note: &str,
) {
    let note = one_line(note);
    println!(
        "{:<10} {:<26} {:<22} {:<11} {note}",
        s.name,
        s.shape.to_string(),
        path_label(requested, None, stats),
        storage.name()
    );
}

/// The time ratios of one shape's records: between paths in each dtype (`fused/three-pass
/// 0.42×`), and of each dtype to the first one timed, per path (`f16/f32 fused 0.61×`).
fn print_ratios(records: &[Record], dtypes: &[DType], stats: &[StatArg]) {
    let ms_with = |p: Path, d: DType, st: Option<StatArg>| {
        records
            .iter()
            .find(|r| r.pass == Pass::Forward && r.path == p && r.dtype == d && r.stats == st)
            .map(|r| r.timing.median_ms)
    };
    let ms = |p: Path, d: DType| ms_with(p, d, None);
    let mut parts = Vec::new();
    // The backward over its forward, per dtype.
    for &d in dtypes {
        let backward = records
            .iter()
            .find(|r| r.pass == Pass::Backward && r.dtype == d);
        if let Some(b) = backward {
            let suffix = if dtypes.len() > 1 {
                format!(" ({d})")
            } else {
                String::new()
            };
            if let Some(f) = ms(b.path, d) {
                parts.push(format!(
                    "backward/forward{suffix} {:.2}×",
                    b.timing.median_ms / f
                ));
            }
        }
    }
    for &d in dtypes {
        let suffix = if dtypes.len() > 1 {
            format!(" ({d})")
        } else {
            String::new()
        };
        for (num, den) in [(Path::Fused, Path::ThreePass), (Path::SplitK, Path::Fused)] {
            if let (Some(a), Some(b)) = (ms(num, d), ms(den, d)) {
                parts.push(format!(
                    "{}/{}{suffix} {:.2}×",
                    num.name(),
                    den.name(),
                    a / b
                ));
            }
        }
    }
    // The cost of each statistic: its time over plain attention's, per path.
    for &d in dtypes {
        for p in Path::ALL {
            for &st in stats {
                if let (Some(a), Some(b)) = (ms_with(p, d, Some(st)), ms(p, d)) {
                    parts.push(format!(
                        "{}+{}/{} {:.2}×",
                        p.name(),
                        st.name(),
                        p.name(),
                        a / b
                    ));
                }
            }
        }
    }
    let base = dtypes[0];
    for &d in &dtypes[1..] {
        for p in Path::ALL {
            if let (Some(a), Some(b)) = (ms(p, d), ms(p, base)) {
                parts.push(format!("{d}/{base} {} {:.2}×", p.name(), a / b));
            }
        }
    }
    if !parts.is_empty() {
        println!("{:<10} time ratios: {}", "", parts.join("   "));
    }
}

/// What the autotuner chose for one (shape, path), under the table's columns: the
/// configuration, whether it was measured now or cached, and each candidate's median.
fn print_config(
    s: &SuiteShape,
    which: (Option<Path>, Option<StatArg>),
    storage: Storage,
    choice: &ConfigChoice,
) {
    let note = match &choice.source {
        ConfigSource::Tuned(t) => format!(
            "autotune: {} ({}; medians {})",
            choice.config,
            t.how(),
            t.medians()
        ),
        ConfigSource::Default => format!("autotune: {} (default, one candidate)", choice.config),
        ConfigSource::Forced => format!("autotune: {} (forced)", choice.config),
    };
    print_note(s, which, storage, &note);
}

/// `default`, `forced`, `tuned` (measured by this run) or `cached` (a winner measured before).
fn config_source_name(source: &ConfigSource) -> &'static str {
    match source {
        ConfigSource::Default => "default",
        ConfigSource::Forced => "forced",
        ConfigSource::Tuned(t) if t.measured_now => "tuned",
        ConfigSource::Tuned(_) => "cached",
    }
}

fn json_record(r: &Record, ctx: &Context, b: &Bench) -> Value {
    let s = r.shape;
    let (err, check, tolerance) = match r.check {
        Check::Off => (Value::Null, Value::Null, Value::Null),
        Check::Skipped => (Value::Null, json!("skipped"), Value::Null),
        Check::Err(e) => (
            if e.is_finite() { json!(e) } else { Value::Null },
            json!(if r.failed() { "failed" } else { "passed" }),
            json!(r.tolerance),
        ),
    };
    let mut record = json!({
        "name": r.name,
        "batch": s.batch,
        "heads": s.q_heads,
        "kv_heads": s.kv_heads,
        "m": s.m,
        "n": s.n,
        "d_k": s.d_k,
        "d_v": s.d_v,
        "dtype": r.dtype.name(),
        "storage": r.storage.name(),
        "path": r.path.name(),
        "requested_path": r.requested.map_or("auto", |p| p.name()),
        "stats": r.stats.map(StatArg::name),
        "masks": r.masks,
        "causal": b.args.causal.map(|a| xattn::Alignment::from(a).name()),
        "adapter": ctx.info.name,
        "backend": format!("{:?}", ctx.info.backend),
        "driver": ctx.info.driver,
        "driver_info": ctx.info.driver_info,
        "timing": b.timing_method(),
        "warmup": b.warmup,
        "runs": b.runs,
        "median_ms": r.timing.median_ms,
        "min_ms": r.timing.min_ms,
        "gflops": r.gflops(),
        "min_bytes": min_bytes(&s, r.dtype),
        "gbps": r.gbps(),
        "max_abs_err": err,
        "tolerance": tolerance,
        "check": check,
        "config": r.config.as_ref().map(|c| c.config.to_string()),
        "config_source": r.config.as_ref().map(|c| config_source_name(&c.source)),
    });
    if b.args.backward {
        let fields = record.as_object_mut().expect("a JSON object");
        fields.insert("pass".into(), json!(r.pass.name()));
        fields.insert("checked".into(), json!(r.checked));
        fields.insert("flops".into(), json!(r.pass.flops(&s)));
    }
    record
}

/// The last line of the table: whether the results were checked against the reference and,
/// if so, all within the tolerance or which were not (and which runs failed).
fn verdict(records: &[Record], errors: &[String], checked: bool, args: &BenchArgs) -> String {
    let mut tolerance = format!(
        "--tolerance {:.0e}, plus a half O's rounding",
        args.tolerance
    );
    if args.backward {
        tolerance += "; for dQ, dK, dV budgets derived per gradient";
    }
    let label = |r: &Record| match r.pass {
        Pass::Forward => format!(
            "{} {} {}",
            r.name,
            path_label(r.requested, Some(r.path), r.stats),
            r.dtype
        ),
        Pass::Backward => format!("{} backward {} {}", r.name, r.dtype, r.checked),
    };
    let failed: Vec<String> = records
        .iter()
        .filter(|r| r.failed())
        .map(|r| match r.check {
            Check::Err(e) => format!("{} (max |err| {e:.2e} > {:.2e})", label(r), r.tolerance),
            _ => label(r),
        })
        .collect();
    let compared = records
        .iter()
        .filter(|r| matches!(r.check, Check::Err(_)))
        .count();
    let skipped = records.iter().filter(|r| r.check == Check::Skipped).count();
    let skipped = if skipped > 0 {
        format!(
            "; {skipped} not checked (above --check-max-gflop {})",
            args.check_max_gflop
        )
    } else {
        String::new()
    };
    let runs = if errors.is_empty() {
        String::new()
    } else {
        format!("; {} run(s) failed: {}", errors.len(), errors.join(", "))
    };
    if !failed.is_empty() {
        format!(
            "verdict: FAILED: {} of {compared} result(s) checked against the f64 reference are \
             above the tolerance ({tolerance}): {}{skipped}{runs}",
            failed.len(),
            failed.join(", ")
        )
    } else if !errors.is_empty() {
        format!("verdict: FAILED{runs}")
    } else if !checked {
        "verdict: timed only, not checked against the reference (pass --check)".to_string()
    } else if compared == 0 {
        format!("verdict: nothing checked against the f64 reference{skipped}")
    } else {
        format!(
            "verdict: checked against the f64 reference: all {compared} result(s) within the \
             tolerance ({tolerance}){skipped}"
        )
    }
}

/// Runs the benchmark and prints the table; fails (after writing the JSON) if any run failed
/// or any check exceeded the tolerance.
pub fn bench(args: &BenchArgs) -> CliResult<ExitCode> {
    if args.graph {
        return graph::bench(args);
    }
    let custom = custom_shape(args)?;
    if args.dist.distributed {
        let shape = custom.ok_or_else(|| {
            CliError::usage("--distributed times a custom shape: give --m, --n and --dk")
        })?;
        if args.backward && args.dist.mode != ModeArg::Lv {
            return Err(CliError::usage(
                "the distributed backward runs LV-XAttn's schedule: --mode lv",
            ));
        }
        let timed = Timed {
            warmup: args.warmup.unwrap_or(1),
            runs: args.runs.unwrap_or(3),
            seed: args.seed,
            backward: args.backward,
        };
        return distributed::bench(&shape.shape, args.dtype[0].into(), timed, &args.dist);
    }
    let suite = match (args.suite, &custom) {
        (None, None) => Some(SuiteName::Quick),
        (chosen, _) => chosen,
    };
    let quick = args.quick || suite == Some(SuiteName::Quick);
    let mut shapes = match suite {
        Some(SuiteName::Quick) => suite::quick(),
        Some(SuiteName::Standard) => suite::standard(),
        Some(SuiteName::Full) => suite::full(),
        None => Vec::new(),
    };
    shapes.extend(custom);
    if !args.only.is_empty() {
        let names: Vec<&str> = shapes.iter().map(|s| s.name.as_str()).collect();
        if let Some(bad) = args.only.iter().find(|o| !names.contains(&o.as_str())) {
            return Err(CliError::usage(format!(
                "--only {bad}: no such shape; the shapes are {}",
                names.join(", ")
            )));
        }
        shapes.retain(|s| args.only.contains(&s.name));
    }
    // Checked (and its temporary file made) now rather than after minutes of benchmarking;
    // a FIFO, device or link there is refused as for every output.
    let mut json_out = Outputs::create(&[("--json", args.json.as_ref())])?;

    let ctx = Context::new()?;
    let timer = if args.wall_clock {
        None
    } else {
        GpuTimer::new(&ctx)
    };
    let b = Bench {
        engine: if args.packed_f16 {
            let caps = xattn::DeviceCaps {
                native_f16: false,
                ..ctx.caps()
            };
            Engine::with_caps(&ctx, caps)
        } else {
            Engine::new(&ctx)
        }
        .with_autotune(
            !args.no_autotune
                && args.fused_config.is_none()
                && xattn::settings::autotune().unwrap_or(true),
        ),
        timer,
        warmup: args.warmup.unwrap_or(if quick { 1 } else { 2 }),
        runs: args.runs.unwrap_or(if quick { 3 } else { 5 }),
        check: args.check || suite == Some(SuiteName::Quick),
        args,
    };
    println!("adapter: {}", ctx.describe());
    println!(
        "timing: {}, warmup {}, median of {} runs",
        b.timing_method(),
        b.warmup,
        b.runs
    );
    let mut dtypes: Vec<DType> = Vec::new();
    for d in args.dtype.iter().map(|&d| DType::from(d)) {
        if !dtypes.contains(&d) {
            dtypes.push(d);
        }
    }
    let storage = |d| Storage::of(d, b.engine.caps().native_f16);
    println!("autotune: {}", autotune_label(&b.engine, args));
    println!("masks: {} (every shape)", masks_label(args.causal));
    let read_as: Vec<String> = dtypes
        .iter()
        .map(|&d| format!("{d} (read as {})", storage(d).name()))
        .collect();
    println!(
        "dtypes: {} for Q, K, V and O; computed in f32",
        read_as.join(", ")
    );
    if args.backward {
        println!(
            "backward: dQ, dK, dV from a random dO after each forward, in the inputs' type; \
             GFLOP/s counts {}× the forward's FLOPs (FlashAttention's count)",
            backward::FLOPS_FACTOR
        );
    }
    print_header();

    let mut variants: Vec<Option<StatArg>> = vec![None];
    for &st in &args.stats {
        if !variants.contains(&Some(st)) {
            variants.push(Some(st));
        }
    }
    let stat_list: Vec<StatArg> = variants.iter().flatten().copied().collect();
    // The backward is timed after the forward on one path: the planner's unless named.
    let (path_set, passes) = if args.backward {
        let set = match args.path {
            PathSet::All => PathSet::One(None),
            one => one,
        };
        (set, &[Pass::Forward, Pass::Backward][..])
    } else {
        (args.path, &[Pass::Forward][..])
    };
    let total: usize = dtypes.len()
        * variants.len()
        * shapes
            .iter()
            .map(|s| {
                candidates(path_set, s)
                    .iter()
                    .filter(|(_, skip)| skip.is_none())
                    .count()
            })
            .sum::<usize>();
    let mut progress = Progress::new(&shapes, path_set, (dtypes.len(), variants.len()), passes);
    let mut done = 0;
    let mut records: Vec<Record> = Vec::new();
    // The runs that failed, labelled as their row is, with why.
    let mut errors: Vec<String> = Vec::new();
    for (index, s) in shapes.iter().enumerate() {
        let first = records.len();
        for &dtype in &dtypes {
            let mut inputs: Option<Inputs> = None;
            let runs = candidates(path_set, s)
                .into_iter()
                .flat_map(|c| variants.iter().map(move |&st| (c, st)));
            for ((requested, skip), stats) in runs {
                let which = (requested, stats);
                if let Some(why) = skip {
                    print_note(s, which, storage(dtype), &format!("skipped: {why}"));
                    continue;
                }
                done += 1;
                eprintln!(
                    "[{done}/{total}] {} {} {dtype} ...{}",
                    s.name,
                    path_label(requested, None, stats),
                    progress.left()
                );
                let seed = args.seed.wrapping_add(index as u64);
                let x = match &mut inputs {
                    Some(x) => x,
                    None => inputs.insert(b.inputs(&s.shape, seed, dtype)?),
                };
                let opts = options(args, requested, stats);
                let call = match b.engine.prepare(&x.q, &x.k, &x.v, &opts) {
                    Ok(call) => call,
                    Err(e) => {
                        let note = format!("skipped, does not plan: {e}");
                        print_note(s, which, storage(dtype), &note);
                        continue;
                    }
                };
                let plan = call.plan();
                // `auto` may plan a path the suite excludes for this shape.
                if let Some((_, why)) = s.only.filter(|(only, _)| *only != plan.path()) {
                    print_note(s, which, storage(dtype), &format!("skipped: {why}"));
                    continue;
                }
                if let Some(choice) = plan.fused().filter(|_| b.engine.autotune()) {
                    print_config(s, which, storage(dtype), choice);
                }
                let measured = b.measure(&call, &opts, x);
                progress.advance(Pass::Forward, &s.shape);
                match measured {
                    Ok((timing, check, tolerance)) => {
                        let r = Record {
                            name: s.name.clone(),
                            shape: s.shape,
                            dtype,
                            storage: storage(dtype),
                            requested,
                            path: plan.path(),
                            timing,
                            check,
                            tolerance,
                            masks: masks_label(args.causal),
                            stats,
                            config: plan.fused().cloned(),
                            pass: Pass::Forward,
                            checked: "O",
                        };
                        print_row(&r);
                        if args.backward {
                            let backward = b.backward_row(s, &r, (&call, &opts), x, &mut errors);
                            progress.advance(Pass::Backward, &s.shape);
                            records.push(r);
                            records.extend(backward);
                        } else {
                            records.push(r);
                        }
                    }
                    Err(e) => {
                        errors.push(format!(
                            "{} {} {dtype} ({})",
                            s.name,
                            path_label(requested, None, stats),
                            one_line(&e.to_string())
                        ));
                        print_note(s, which, storage(dtype), &format!("error: {e}"));
                    }
                }
            }
        }
        print_ratios(&records[first..], &dtypes, &stat_list);
    }

    if let Some(path) = &args.json {
        let list: Vec<Value> = records.iter().map(|r| json_record(r, &ctx, &b)).collect();
        let text = serde_json::to_string_pretty(&list).expect("JSON values always serialize");
        json_out.write_bytes(path, (text + "\n").as_bytes())?;
        json_out.commit()?;
        eprintln!(
            "xattn: wrote {} record(s) to {}",
            list.len(),
            path.display()
        );
    }
    let verdict = verdict(&records, &errors, b.check, args);
    println!(
        "{verdict} ({:.2} s in all)",
        progress.start.elapsed().as_secs_f64()
    );
    let failed = records.iter().filter(|r| r.failed()).count();
    if failed > 0 || !errors.is_empty() {
        return Err(CliError::new(format!(
            "{failed} result(s) above the tolerance (--tolerance {:.0e}, plus a half O's \
             rounding), {} run(s) failed: the verdict line names them",
            args.tolerance,
            errors.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}
