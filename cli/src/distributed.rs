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
    /// its shard, rank 0 writes --out (in the inputs' type, or --out-dtype) and --lse.
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
}

#[cfg(feature = "mpi")]
pub use ranks::{bench, run};

#[cfg(feature = "mpi")]
mod ranks {
    use std::time::{Duration, Instant};

    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use xattn::distributed::{agree, Mode, RankAttention, RankKv, RankOutput};
    use xattn::shard::{lv_bytes, ring_bytes, RowBytes, Split, Traffic};
    use xattn::{Attention, AttnShape, Context, DType, Engine};

    use super::*;
    use crate::inputs::out_dims;
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
            let outputs = if world.rank() == 0 {
                Some(Outputs::create(&[
                    ("--out", inputs.out),
                    ("--lse", inputs.lse),
                ])?)
            } else {
                None
            };
            let engine = Engine::new(&Context::new()?);
            let part = RankAttention::new(world, &engine, split(dist), input.shape.n)?
                .with_dtype(input.dtype);
            let kv = part.upload_kv_of_whole(&input.k, &input.v, &input.shape)?;
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
            &out,
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
        let mut times = Vec::new();
        let mut last = None;
        for i in 0..timed.warmup + timed.runs {
            world.barrier();
            let t = Instant::now();
            let out = ready
                .part
                .attention(mode, &ready.rest, &ready.kv, s, &opts, 0)?;
            if i >= timed.warmup {
                times.push(t.elapsed());
                last = Some(out);
            }
        }
        times.sort();
        let median = times[times.len() / 2];
        let out = last.expect("at least one timed run");
        report(
            &world,
            &ready.part,
            s,
            (dtype, mode),
            &out,
            &format!(
                "median of {} runs {:.1} ms (the last run's counters and times below)",
                timed.runs,
                median.as_secs_f64() * 1e3
            ),
        );
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
        out: &RankOutput,
        total: &str,
    ) {
        let ranks = world.size() as usize;
        let t = out.traffic;
        let mine = [
            t.sent,
            t.received,
            out.compute.as_micros() as u64,
            out.wait.as_micros() as u64,
            out.overlapped,
        ];
        let mut all = vec![0u64; mine.len() * ranks];
        world.all_gather_into(&mine[..], &mut all[..]);
        if world.rank() != 0 {
            return;
        }
        let rows: Vec<usize> = (0..ranks)
            .map(|p| (p + 1) * s.m / ranks - p * s.m / ranks)
            .collect();
        let cuts = part.cuts();
        let keys: Vec<usize> = cuts.windows(2).map(|w| w[1] - w[0]).collect();
        let bytes = RowBytes::of(s, dtype);
        let model: Vec<Traffic> = match mode {
            Mode::Lv => lv_bytes(bytes, &rows, 0),
            Mode::Ring => ring_bytes(bytes, &rows, &keys, 0),
        };
        eprintln!("xattn: {s} {dtype} over {ranks} ranks, {mode}: {total}");
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
