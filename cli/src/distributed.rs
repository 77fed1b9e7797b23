//! `xattn run --distributed` and `xattn bench --distributed`: one rank per device under
//! `mpirun`, each holding one shard of the keys (xattn::distributed, the `mpi` feature).
//!
//! Every rank reads and checks its inputs, opens its device and uploads its shard; then the
//! ranks agree that all are ready before any computes, so a rank with bad input or no device
//! makes every rank exit with status 1 (the failing rank's error on its stderr, the others
//! naming it) and no output is written. Rank 0 alone writes the outputs, after every rank
//! finished. A device error in the middle of the ring aborts the communicator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use crate::inputs::{CallArgs, QkvArgs};
use crate::masks::MaskArgs;
use crate::precision::PrecisionArgs;
use crate::{CliError, CliResult};

/// Options of a distributed run.
#[derive(Debug, Args)]
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub struct DistArgs {
    /// Run across the ranks of `mpirun -n R xattn ...` (built with `--features mpi`): rank p
    /// holds shard p of the keys and one device; every rank reads the whole inputs and takes
    /// its shard, rank 0 writes the outputs (`run`: --out in the inputs' type, or --out-dtype,
    /// and --lse; `grad`: --dq, --dk, --dv, the backward riding LV-XAttn's ring).
    #[arg(long)]
    pub distributed: bool,
    /// With --distributed: lv (LV-XAttn: query blocks and their running O and LSE move
    /// around the ring, K and V stay) or ring (Ring Attention: K and V shards move).
    #[arg(long, value_enum, default_value = "lv", requires = "distributed")]
    pub mode: ModeArg,
    /// With --distributed: where the keys are cut, R + 1 comma-separated positions rising
    /// from 0 to N (shard p holds keys cuts[p]..cuts[p+1]; a shard may be empty); default even.
    #[arg(
        long,
        value_delimiter = ',',
        requires = "distributed",
        value_name = "CUTS"
    )]
    pub shards: Vec<usize>,
}

/// A distributed schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// LV-XAttn.
    Lv,
    /// Ring Attention.
    Ring,
}

/// The inputs of `xattn run` a distributed run reads, and its two outputs.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub struct RunInputs<'a> {
    pub qkv: &'a QkvArgs,
    pub call: &'a CallArgs,
    pub masks: &'a MaskArgs,
    pub precision: &'a PrecisionArgs,
    pub out: Option<&'a PathBuf>,
    pub lse: Option<&'a PathBuf>,
}

/// Where `xattn grad --distributed` writes the gradients, and whether in f32 (else in the
/// inputs' type).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub struct GradOutputs<'a> {
    pub dq: Option<&'a PathBuf>,
    pub dk: Option<&'a PathBuf>,
    pub dv: Option<&'a PathBuf>,
    pub f32: bool,
}

/// What `xattn grad` reads before a device is opened: the inputs, dO `[batch, M, heads, d_v]`
/// and the forward's options.
pub type GradInputs = (crate::inputs::Loaded, Vec<f32>, xattn::Attention);

#[cfg(not(feature = "mpi"))]
fn unavailable() -> CliError {
    CliError::usage(
        "--distributed needs the tool built with MPI: cargo build --release -p xattn-cli \
         --features mpi (Open MPI or MPICH and libclang installed)",
    )
}

/// `xattn run --distributed`.
#[cfg(not(feature = "mpi"))]
pub fn run(_: &RunInputs, _: &DistArgs) -> CliResult<ExitCode> {
    Err(unavailable())
}

/// `xattn grad --distributed`.
#[cfg(not(feature = "mpi"))]
pub fn grad(
    _: impl FnOnce() -> CliResult<GradInputs>,
    _: &GradOutputs,
    _: &DistArgs,
) -> CliResult<ExitCode> {
    Err(unavailable())
}

/// `xattn bench --distributed`.
#[cfg(not(feature = "mpi"))]
pub fn bench(_: &xattn::AttnShape, _: xattn::DType, _: Timed, _: &DistArgs) -> CliResult<ExitCode> {
    Err(unavailable())
}

/// Untimed and timed runs of a bench, and the seed of its inputs.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub struct Timed {
    pub warmup: u32,
    pub runs: u32,
    pub seed: u64,
    /// Also time the backward (LV-XAttn's ring) of the last forward.
    pub backward: bool,
}

#[cfg(feature = "mpi")]
pub use ranks::{bench, grad, run};

#[cfg(feature = "mpi")]
mod ranks {
    use std::time::{Duration, Instant};

    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use xattn::distributed::{agree, Mode, RankAttention, RankCost, RankKv};
    use xattn::shard::{lv_backward_bytes, lv_bytes, ring_bytes, RowBytes, Split, Traffic};
    use xattn::{Attention, AttnShape, Context, DType, Engine};

    use super::*;
    use crate::inputs::{out_dims, Loaded};
    use crate::outputs::Outputs;

    impl From<ModeArg> for Mode {
        fn from(m: ModeArg) -> Mode {
            match m {
                ModeArg::Lv => Mode::Lv,
                ModeArg::Ring => Mode::Ring,
            }
        }
    }

    /// What every rank prepares before the ranks agree.
    struct Ready<'c, T> {
        part: RankAttention<'c, SimpleCommunicator>,
        kv: RankKv,
        rest: T,
    }

    /// Runs `prepare` on this rank (its device opened on `engine`-to-be), then agrees with the
    /// other ranks: the failing rank returns its own error, the others one naming it.
    fn prepare<'c, T>(
        world: &'c SimpleCommunicator,
        prepare: impl FnOnce(&'c SimpleCommunicator) -> CliResult<Ready<'c, T>>,
    ) -> CliResult<Ready<'c, T>> {
        let (rank, ranks) = (world.rank(), world.size());
        let local =
            prepare(world).map_err(|e| CliError::new(format!("rank {rank} of {ranks}: {e}")));
        let flag = match &local {
            Ok(_) => Ok(()),
            Err(e) => Err(xattn::Error::Argument(e.to_string())),
        };
        let agreed = agree(world, flag);
        let ready = local?;
        agreed?;
        Ok(ready)
    }

    /// A rank's part of a call on files: rank 0 creates the outputs `targets`, every rank
    /// opens its device and uploads its keys of `input`.
    fn open_rank<'c>(
        world: &'c SimpleCommunicator,
        dist: &DistArgs,
        input: &Loaded,
        targets: &[(&'static str, Option<&PathBuf>)],
    ) -> CliResult<(
        RankAttention<'c, SimpleCommunicator>,
        RankKv,
        Option<Outputs>,
    )> {
        let outputs = if world.rank() == 0 {
            Some(Outputs::create(targets)?)
        } else {
            None
        };
        let engine = Engine::new(&Context::new()?);
        let part =
            RankAttention::new(world, &engine, split(dist), input.shape.n)?.with_dtype(input.dtype);
        let kv = part.upload_kv_of_whole(&input.k, &input.v, &input.shape)?;
        Ok((part, kv, outputs))
    }

    fn split(dist: &DistArgs) -> Split {
        if dist.shards.is_empty() {
            Split::Even
        } else {
            Split::At(dist.shards.clone())
        }
    }

    fn universe() -> CliResult<mpi::environment::Universe> {
        mpi::initialize().ok_or_else(|| CliError::new("MPI is initialized already"))
    }

    pub fn run(inputs: &RunInputs, dist: &DistArgs) -> CliResult<ExitCode> {
        let universe = universe()?;
        let world = universe.world();
        let ready = prepare(&world, |world| {
            let input = inputs
                .qkv
                .load(inputs.call, inputs.masks, inputs.precision, &[])?;
            let targets = [("--out", inputs.out), ("--lse", inputs.lse)];
            let (part, kv, outputs) = open_rank(world, dist, &input, &targets)?;
            Ok(Ready {
                part,
                kv,
                rest: (input, outputs),
            })
        })?;
        let (input, outputs) = ready.rest;
        let (s, mode) = (input.shape, Mode::from(dist.mode));
        let t0 = Instant::now();
        let out = ready
            .part
            .attention(mode, &input.q, &ready.kv, &s, &input.opts, 0)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if let Some(mut outputs) = outputs {
            // The merge is f32; a half call's O is rounded once to its type, as the
            // single-device call's is.
            let o_dtype = inputs.precision.out_dtype().unwrap_or(input.dtype);
            if let Some(path) = inputs.out {
                let o = input.layout.data(out.o.clone(), s.o_dims());
                outputs.write_as(path, &o, &input.file_dims(s.o_dims()), o_dtype)?;
            }
            if let Some(path) = inputs.lse {
                outputs.write(path, &out.lse, &out_dims(&s.lse_dims(), input.squeeze))?;
            }
            outputs.commit()?;
        }
        report(
            &world,
            &ready.part,
            &s,
            (input.dtype, mode),
            &out.cost,
            &format!("{ms:.1} ms"),
        );
        Ok(ExitCode::SUCCESS)
    }

    pub fn bench(
        s: &AttnShape,
        dtype: DType,
        timed: Timed,
        dist: &DistArgs,
    ) -> CliResult<ExitCode> {
        let universe = universe()?;
        let world = universe.world();
        let mode = Mode::from(dist.mode);
        let ready = prepare(&world, |world| {
            let engine = Engine::new(&Context::new()?);
            let part = RankAttention::new(world, &engine, split(dist), s.n)?.with_dtype(dtype);
            // Q is the same on every rank; each rank draws only its own keys.
            let mut rng = StdRng::seed_from_u64(timed.seed);
            let q = random(&mut rng, s.q_dims().iter().product());
            let keys = AttnShape {
                n: part.keys().1 - part.keys().0,
                ..*s
            };
            let mut rng = StdRng::seed_from_u64(timed.seed + 1 + world.rank() as u64);
            let k = random(&mut rng, keys.k_dims().iter().product());
            let v = random(&mut rng, keys.v_dims().iter().product());
            let kv = part.upload_kv(&k, &v, s)?;
            Ok(Ready { part, kv, rest: q })
        })?;
        let opts = Attention::default();
        let (part, q) = (&ready.part, &ready.rest);
        let (median, out) =
            timed.median(&world, || part.attention(mode, q, &ready.kv, s, &opts, 0))?;
        report(
            &world,
            part,
            s,
            (dtype, mode),
            &out.cost,
            &timed.label(median),
        );
        if !timed.backward {
            return Ok(ExitCode::SUCCESS);
        }
        // The backward of the last forward: its O and LSE given to every rank, dO drawn alike.
        let (mut o, mut lse) = (out.o, out.lse);
        o.resize(s.o_dims().iter().product(), 0.0);
        lse.resize(s.lse_dims().iter().product(), 0.0);
        let root = world.process_at_rank(0);
        root.broadcast_into(&mut o[..]);
        root.broadcast_into(&mut lse[..]);
        let d_o = random(&mut StdRng::seed_from_u64(timed.seed + 7919), o.len());
        let (median, g) = timed.median(&world, || {
            part.backward(mode, q, &ready.kv, (&o, &lse), &d_o, s, &opts, 0)
        })?;
        let rows = block_rows(s.m, world.size() as usize);
        let model = lv_backward_bytes(RowBytes::of(s, dtype), &rows, 0);
        let what = format!(
            "{s} {dtype} over {} ranks, lv backward: {}",
            rows.len(),
            timed.label(median)
        );
        report_table(&world, part.cuts(), &g.cost, &model, &what);
        Ok(ExitCode::SUCCESS)
    }

    impl Timed {
        /// The median time of `runs` calls of `call` after `warmup` untimed ones, each
        /// started together on every rank, and the last call's result.
        fn median<T>(
            &self,
            world: &SimpleCommunicator,
            mut call: impl FnMut() -> xattn::Result<T>,
        ) -> CliResult<(Duration, T)> {
            let mut times = Vec::new();
            let mut last = None;
            for i in 0..self.warmup + self.runs {
                world.barrier();
                let t = Instant::now();
                let out = call()?;
                if i >= self.warmup {
                    times.push(t.elapsed());
                    last = Some(out);
                }
            }
            times.sort();
            let out = last.expect("at least one timed run");
            Ok((times[times.len() / 2], out))
        }

        fn label(&self, median: Duration) -> String {
            format!(
                "median of {} runs {:.1} ms (the last run's counters and times below)",
                self.runs,
                median.as_secs_f64() * 1e3
            )
        }
    }

    /// `xattn grad --distributed`: the forward (LV-XAttn, O and LSE on rank 0, then given to
    /// every rank), the backward along the same ring, dK and dV gathered on rank 0, which
    /// writes the gradients asked for.
    pub fn grad(
        load: impl FnOnce() -> CliResult<GradInputs>,
        targets: &GradOutputs,
        dist: &DistArgs,
    ) -> CliResult<ExitCode> {
        let universe = universe()?;
        let world = universe.world();
        let ready = prepare(&world, |world| {
            let (input, d_o, opts) = load()?;
            let files = [
                ("--dq", targets.dq),
                ("--dk", targets.dk),
                ("--dv", targets.dv),
            ];
            let (part, kv, outputs) = open_rank(world, dist, &input, &files)?;
            Ok(Ready {
                part,
                kv,
                rest: (input, d_o, opts, outputs),
            })
        })?;
        let (input, d_o, opts, outputs) = ready.rest;
        let (s, part) = (input.shape, &ready.part);
        let t0 = Instant::now();
        let forward = part.attention(Mode::Lv, &input.q, &ready.kv, &s, &opts, 0)?;
        // The backward needs the whole call's O and LSE on every rank (each reads its block).
        let (mut o, mut lse) = (forward.o, forward.lse);
        o.resize(s.o_dims().iter().product(), 0.0);
        lse.resize(s.lse_dims().iter().product(), 0.0);
        let root = world.process_at_rank(0);
        root.broadcast_into(&mut o[..]);
        root.broadcast_into(&mut lse[..]);
        let t1 = Instant::now();
        let g = part.backward(
            Mode::Lv,
            &input.q,
            &ready.kv,
            (&o, &lse),
            &d_o,
            &s,
            &opts,
            0,
        )?;
        let backward_ms = t1.elapsed().as_secs_f64() * 1e3;
        let dk = part.gather_keys(&g.dk, s.kv_heads * s.d_k, &s, 0)?;
        let dv = part.gather_keys(&g.dv, s.kv_heads * s.d_v, &s, 0)?;
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        if let Some(mut outputs) = outputs {
            // Accumulated in f32; written in the inputs' type unless --grad-dtype f32.
            let dtype = if targets.f32 { DType::F32 } else { input.dtype };
            for (path, data, dims) in [
                (targets.dq, g.dq.clone(), s.q_dims()),
                (targets.dk, dk, s.k_dims()),
                (targets.dv, dv, s.v_dims()),
            ] {
                if let Some(path) = path {
                    let data = input.layout.data(data, dims);
                    outputs.write_as(path, &data, &input.file_dims(dims), dtype)?;
                }
            }
            outputs.commit()?;
        }
        let rows = block_rows(s.m, world.size() as usize);
        let bytes = RowBytes::of(&s, input.dtype);
        let what = |pass: &str, ms: f64| {
            format!(
                "{s} {} over {} ranks, lv, {pass}: {ms:.1} ms",
                input.dtype,
                rows.len()
            )
        };
        let forward_ms = (t1 - t0).as_secs_f64() * 1e3;
        let model = lv_bytes(bytes, &rows, 0);
        report_table(
            &world,
            part.cuts(),
            &forward.cost,
            &model,
            &what("forward", forward_ms),
        );
        let model = lv_backward_bytes(bytes, &rows, 0);
        report_table(
            &world,
            part.cuts(),
            &g.cost,
            &model,
            &what("backward", backward_ms),
        );
        if world.rank() == 0 {
            eprintln!("xattn: forward, backward and gathers {total_ms:.1} ms");
        }
        Ok(ExitCode::SUCCESS)
    }

    fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..=1.0)).collect()
    }

    /// Rank 0 prints, for every rank, the bytes it sent and received (counted, and the byte
    /// model's), its compute and waiting times and the share of its bytes in flight while it
    /// computed. Collective.
    fn report(
        world: &SimpleCommunicator,
        part: &RankAttention<SimpleCommunicator>,
        s: &AttnShape,
        (dtype, mode): (DType, Mode),
        cost: &RankCost,
        total: &str,
    ) {
        let rows = block_rows(s.m, world.size() as usize);
        let cuts = part.cuts();
        let keys: Vec<usize> = cuts.windows(2).map(|w| w[1] - w[0]).collect();
        let bytes = RowBytes::of(s, dtype);
        let model: Vec<Traffic> = match mode {
            Mode::Lv => lv_bytes(bytes, &rows, 0),
            Mode::Ring => ring_bytes(bytes, &rows, &keys, 0),
        };
        let what = format!("{s} {dtype} over {} ranks, {mode}: {total}", rows.len());
        report_table(world, cuts, cost, &model, &what);
    }

    /// The M query rows cut into one even block per rank, as the rings cut them.
    fn block_rows(m: usize, ranks: usize) -> Vec<usize> {
        (0..ranks)
            .map(|p| (p + 1) * m / ranks - p * m / ranks)
            .collect()
    }

    /// Rank 0 prints `what`, then one line per rank: its keys, bytes sent and received
    /// (counted, and `model`'s), compute and waiting times and overlap. Collective.
    fn report_table(
        world: &SimpleCommunicator,
        cuts: &[usize],
        cost: &RankCost,
        model: &[Traffic],
        what: &str,
    ) {
        let ranks = world.size() as usize;
        let t = cost.traffic;
        let mine = [
            t.sent,
            t.received,
            cost.compute.as_micros() as u64,
            cost.wait.as_micros() as u64,
            cost.overlapped,
        ];
        let mut all = vec![0u64; mine.len() * ranks];
        world.all_gather_into(&mine[..], &mut all[..]);
        if world.rank() != 0 {
            return;
        }
        eprintln!("xattn: {what}");
        eprintln!(
            "rank  keys              sent B (model)            received B (model)        compute ms  wait ms  overlap"
        );
        for (p, r) in all.chunks(mine.len()).enumerate() {
            let m = model[p];
            let ms = |us: u64| Duration::from_micros(us).as_secs_f64() * 1e3;
            let overlap = if r[0] == 0 {
                "-".to_string()
            } else {
                format!("{:.0}% of sent", 100.0 * r[4] as f64 / r[0] as f64)
            };
            eprintln!(
                "{p:<5} {:<17} {:<25} {:<25} {:<11.1} {:<8.1} {overlap}",
                format!("{}..{}", cuts[p], cuts[p + 1]),
                format!("{} ({})", r[0], m.sent),
                format!("{} ({})", r[1], m.received),
                ms(r[2]),
                ms(r[3]),
            );
        }
    }
}
