//! LV-XAttn and Ring Attention across processes and hosts over MPI (the `mpi` feature): each
//! rank owns one device ([`Engine`]) and one shard of the keys.
//!
//! The schedules, the per-block compute and the byte models are those of the in-process
//! [`crate::shard`]; only the moves differ: here a block travels as bytes between ranks
//! through MPI's non-blocking sends and receives, and the bytes each rank sent and received
//! are counted where they are posted ([`RankOutput::traffic`], equal to [`lv_bytes`] and
//! [`ring_bytes`]).
//!
//! - [`Mode::Lv`], LV-XAttn: the M query rows are cut into R even blocks, block r starting on
//!   rank r. At each step a rank computes the partial of the block it holds over its own
//!   shard, merges it into the block's running (O, LSE) with [`Engine::merge`], and passes Q,
//!   O and LSE to the next rank; K and V never move. The next block's Q is received while the
//!   current block is computed (it does not depend on the result); its running O and LSE are
//!   the previous rank's result of this very step, so they cannot be in flight before it ends.
//! - [`Mode::Ring`], Ring Attention: rank p keeps query block p and the K/V shards circulate;
//!   the next shard is received while the current one is computed (the whole transfer can
//!   overlap the compute).
//!
//! After the last step every finished block goes to rank `out` ([`RankAttention::attention`]),
//! which alone returns O and LSE. Every rank passes the same global Q, shape and options (masks
//! in global key positions) and its own K/V shard; the result equals the single-device call up
//! to the merge's f32 rounding (the README states the bound).
//!
//! Faults: a call first checks everything locally, then every rank learns whether every rank
//! is ready and agrees on the call ([`agree`]); a failed or disagreeing rank makes the call
//! return an error on every rank before any compute, naming the rank ([`Error::Rank`]). A
//! device error in the middle of the ring, where the other ranks are already waiting on this
//! one, is printed to stderr and aborts the communicator (`MPI_Abort`), so `mpirun` ends with
//! a non-zero status rather than hanging.
//!
//! ```no_run
//! # fn main() -> xattn::Result<()> {
//! use xattn::distributed::mpi::{self, traits::*};
//! use xattn::distributed::{agree, Mode, RankAttention};
//! use xattn::shard::Split;
//! let universe = mpi::initialize().expect("MPI initializes once");
//! let world = universe.world();
//! let s = xattn::AttnShape { batch: 1, m: 64, n: 100_000, q_heads: 8, kv_heads: 8, d_k: 64, d_v: 64 };
//! let q = vec![0.1; 64 * 8 * 64];                       // the whole Q, on every rank
//! let ready = (|| {
//!     let engine = xattn::Engine::new(&xattn::Context::new()?);
//!     let rank = RankAttention::new(&world, &engine, Split::Even, s.n)?;
//!     let (n0, n1) = rank.keys();                       // this rank's shard of the keys
//!     let k = vec![0.2; (n1 - n0) * 8 * 64];            // read from where it lives
//!     let v = vec![0.3; (n1 - n0) * 8 * 64];
//!     let kv = rank.upload_kv(&k, &v, &s)?;
//!     Ok((rank, kv))
//! })();
//! let (rank, kv) = agree(&world, ready)?;               // every rank ready, or none computes
//! let out = rank.attention(Mode::Lv, &q, &kv, &s, &xattn::Attention::default(), 0)?;
//! if world.rank() == 0 {
//!     println!("{} outputs, {:?}", out.o.len(), out.traffic);
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use mpi::point_to_point::send_receive_into_with_tags;
use mpi::request::scope;
use mpi::traits::*;

use crate::dtype::DType;
use crate::engine::{Attention, Engine};
use crate::error::{Error, Result};
use crate::gpu::tensor::Tensor;
use crate::plan::shard::{even_cuts, Split, Tile, Traffic};
use crate::shape::{check_len, AttnShape};
use crate::shard::{block_partial, check_call, put_axis, slice_axis};

#[cfg(doc)]
use crate::plan::shard::{lv_bytes, ring_bytes};

mod backward;

pub use backward::RankGrads;

/// The `mpi` crate this module is built on: communicators and `mpi::initialize` come from it,
/// re-exported so that a program uses the same version.
pub use mpi;

/// Which schedule a distributed call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// LV-XAttn: query blocks with their running (O, LSE) circulate, K/V stay.
    Lv,
    /// Ring Attention: K/V shards circulate, query blocks stay.
    Ring,
}

impl FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lv" => Ok(Mode::Lv),
            "ring" => Ok(Mode::Ring),
            _ => Err(Error::Argument(format!("unknown mode `{s}` (lv or ring)"))),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Lv => "lv",
            Mode::Ring => "ring",
        })
    }
}

/// Whether every rank of `comm` is ready: `local` on every rank if all are `Ok`, else an error
/// on every rank (a failed rank keeps its own; the others get [`Error::Rank`] naming the first
/// rank that failed). Collective: every rank calls it, ready or not.
pub fn agree<C: Communicator, T>(comm: &C, local: Result<T>) -> Result<T> {
    agree_on(comm, local, &[])
}

/// [`agree`], also checking that every rank gives the same `facts` (shape, type, mode, …).
fn agree_on<C: Communicator, T>(comm: &C, local: Result<T>, facts: &[u64]) -> Result<T> {
    let ranks = comm.size() as usize;
    let mut mine = vec![u64::from(local.is_ok())];
    mine.extend_from_slice(facts);
    let mut all = vec![0u64; mine.len() * ranks];
    comm.all_gather_into(&mine[..], &mut all[..]);
    let x = local?;
    let rows: Vec<&[u64]> = all.chunks(mine.len()).collect();
    if let Some(rank) = rows.iter().position(|r| r[0] == 0) {
        return Err(Error::Rank {
            rank,
            ranks,
            reason: "failed before the call (its error is on its stderr)".into(),
        });
    }
    if let Some(rank) = rows.iter().position(|r| r[1..] != rows[0][1..]) {
        return Err(Error::Rank {
            rank,
            ranks,
            reason: format!(
                "the call differs from rank 0's (batch, M, N, q_heads, kv_heads, d_k, d_v, \
                 type, mode, out, backward: {:?} there, {:?} on rank 0)",
                &rows[rank][1..],
                &rows[0][1..]
            ),
        });
    }
    Ok(x)
}

/// One rank's part of a distributed call: its device and the cut of the keys into one shard
/// per rank of the communicator.
pub struct RankAttention<'c, C: Communicator> {
    comm: &'c C,
    engine: Engine,
    cuts: Vec<usize>,
    dtype: DType,
}

/// This rank's K and V shard on its device.
#[derive(Debug)]
pub struct RankKv {
    /// `[batch, N, kv_heads, d_k, d_v]` of the whole K/V.
    dims: [usize; 5],
    dtype: DType,
    /// `None` where this rank holds no key.
    shard: Option<(Tensor, Tensor)>,
}

/// What one rank returns: on rank `out` the merged result, and on every rank what it moved
/// and where its time went.
#[derive(Clone, Debug, PartialEq)]
pub struct RankOutput {
    /// O `[batch, M, q_heads, d_v]` in f32 on rank `out`; empty elsewhere.
    pub o: Vec<f32>,
    /// LSE `[batch, q_heads, M]` on rank `out`; empty elsewhere.
    pub lse: Vec<f32>,
    /// What this rank moved and where its time went.
    pub cost: RankCost,
}

/// What one rank of a distributed call moved and where its time went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RankCost {
    /// Bytes this rank sent to and received from the other ranks (`loaded` and `returned`
    /// stay 0: the caller's inputs are already on the rank).
    pub traffic: Traffic,
    /// Time on the device: uploads, the block's attention (or backward), the merge, the
    /// download.
    pub compute: Duration,
    /// Time blocked on transfers after the compute of a step (and on the final gather).
    pub wait: Duration,
    /// Bytes this rank sent that were in flight while it computed (posted before the compute
    /// of the step they belong to).
    pub overlapped: u64,
}

/// Message tags: a block's Q (or K), its running O and LSE (or V), the finished result.
const TAG_A: i32 = 1;
const TAG_B: i32 = 2;
const TAG_DONE: i32 = 3;
const TAG_KEYS: i32 = 4;

/// A running partial on the host: O `[batch, rows, q_heads, d_v]` and LSE `[batch, q_heads,
/// rows]`, f32.
struct Run {
    o: Vec<f32>,
    lse: Vec<f32>,
}

impl Run {
    /// Rows that saw no key yet: O = 0, LSE = −∞.
    fn nothing(s: &AttnShape, rows: usize) -> Run {
        Run {
            o: vec![0.0; s.batch * rows * s.q_heads * s.d_v],
            lse: vec![f32::NEG_INFINITY; s.batch * s.q_heads * rows],
        }
    }

    /// O then LSE, as sent.
    fn bytes(&self) -> Vec<u8> {
        let mut b = DType::F32.encode(&self.o);
        b.extend(DType::F32.encode(&self.lse));
        b
    }

    fn from_bytes(bytes: &[u8], s: &AttnShape, rows: usize) -> Run {
        let n_o = s.batch * rows * s.q_heads * s.d_v;
        Run {
            o: DType::F32.decode(bytes, n_o),
            lse: DType::F32.decode(&bytes[n_o * 4..], s.batch * s.q_heads * rows),
        }
    }
}

impl<'c, C: Communicator> RankAttention<'c, C> {
    /// This rank's part of a call over the ranks of `comm`, on `engine`, with the N keys cut
    /// as `split` says (rank p holds shard p). Inputs are stored as f32 unless
    /// [`RankAttention::with_dtype`] says otherwise. Local: no message is sent.
    pub fn new(comm: &'c C, engine: &Engine, split: Split, n: usize) -> Result<Self> {
        let cuts = split.cuts(n, comm.size() as usize)?;
        Ok(RankAttention {
            comm,
            engine: engine.clone(),
            cuts,
            dtype: DType::F32,
        })
    }

    /// Stores Q, K and V (and sends them) as `dtype`; partials and the merge stay f32.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// This rank's keys: `keys().0 .. keys().1` of the N.
    pub fn keys(&self) -> (usize, usize) {
        let p = self.rank();
        (self.cuts[p], self.cuts[p + 1])
    }

    /// The cut of the keys: rank p holds keys `cuts[p] .. cuts[p + 1]`.
    pub fn cuts(&self) -> &[usize] {
        &self.cuts
    }

    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn ranks(&self) -> usize {
        self.comm.size() as usize
    }

    /// Uploads this rank's shard: `k` `[batch, n1 − n0, kv_heads, d_k]` and `v` `[batch,
    /// n1 − n0, kv_heads, d_v]` for its keys `(n0, n1)` ([`RankAttention::keys`]) of the call
    /// of shape `s`. Local.
    pub fn upload_kv(&self, k: &[f32], v: &[f32], s: &AttnShape) -> Result<RankKv> {
        self.check_n(s)?;
        let (n0, n1) = self.keys();
        let shard = AttnShape { n: n1 - n0, ..*s };
        check_len("k shard", &shard.k_dims(), k.len())?;
        check_len("v shard", &shard.v_dims(), v.len())?;
        let shard = if n0 == n1 {
            None
        } else {
            let ctx = self.engine.context();
            Some((
                Tensor::upload_as(ctx, "rank_k", k, &shard.k_dims(), self.dtype)?,
                Tensor::upload_as(ctx, "rank_v", v, &shard.v_dims(), self.dtype)?,
            ))
        };
        Ok(RankKv {
            dims: [s.batch, s.n, s.kv_heads, s.d_k, s.d_v],
            dtype: self.dtype,
            shard,
        })
    }

    /// [`RankAttention::upload_kv`] from the whole `k` `[batch, N, kv_heads, d_k]` and `v`
    /// `[batch, N, kv_heads, d_v]`: this rank takes its keys (where every rank can read the
    /// whole source, as `xattn run --distributed` does). Local.
    pub fn upload_kv_of_whole(&self, k: &[f32], v: &[f32], s: &AttnShape) -> Result<RankKv> {
        self.check_n(s)?;
        check_len("k", &s.k_dims(), k.len())?;
        check_len("v", &s.v_dims(), v.len())?;
        let (n0, n1) = self.keys();
        let keys = |x: &[f32], d: usize| slice_axis(x, (s.batch, s.n, s.kv_heads * d), n0, n1);
        self.upload_kv(&keys(k, s.d_k), &keys(v, s.d_v), s)
    }

    /// The inverse of [`RankAttention::upload_kv_of_whole`] for a per-key result such as
    /// [`RankGrads::dk`]: every rank's `part` `[batch, n1 − n0, width]` of its keys sent to
    /// rank `out`, which returns the whole `[batch, N, width]`; the others return an empty
    /// vector. Collective (the ranks first agree on the call, as [`RankAttention::attention`]
    /// does); not counted in any [`RankCost`].
    pub fn gather_keys(
        &self,
        part: &[f32],
        width: usize,
        s: &AttnShape,
        out: usize,
    ) -> Result<Vec<f32>> {
        let keys = |p: usize| self.cuts[p + 1] - self.cuts[p];
        let local = self.check_n(s).and_then(|()| {
            check_len(
                "the keys' part",
                &[s.batch, keys(self.rank()), width],
                part.len(),
            )?;
            if out >= self.ranks() {
                return Err(Error::Argument(format!(
                    "the keys are gathered on rank {out}, but there are {} ranks",
                    self.ranks()
                )));
            }
            Ok(())
        });
        let facts = [s.batch, s.n, width, out].map(|x| x as u64);
        agree_on(self.comm, local, &facts)?;
        if self.rank() != out {
            let bytes = wire(DType::F32, part);
            self.comm
                .process_at_rank(out as i32)
                .send_with_tag(&bytes[..], TAG_KEYS);
            return Ok(Vec::new());
        }
        let mut whole = vec![f32::NAN; s.batch * s.n * width];
        for p in 0..self.ranks() {
            let data = if p == out {
                part.to_vec()
            } else {
                let mut bytes = vec![0u8; s.batch * keys(p) * width * 4];
                self.comm
                    .process_at_rank(p as i32)
                    .receive_into_with_tag(&mut bytes[..], TAG_KEYS);
                DType::F32.decode(&bytes, bytes.len() / 4)
            };
            put_axis(&mut whole, (s.batch, s.n, width), self.cuts[p], &data);
        }
        Ok(whole)
    }

    fn check_n(&self, s: &AttnShape) -> Result<()> {
        let n = self.cuts[self.ranks()];
        if s.n != n {
            return Err(Error::Shape(format!(
                "the keys were cut for N = {n}, the call has N = {}",
                s.n
            )));
        }
        Ok(())
    }

    /// Distributed attention (collective: every rank calls it with the same `q` (the whole
    /// Q, `[batch, M, q_heads, d_k]`), `s`, `opts` (masks in global positions), `mode` and
    /// `out`, and its own shard `kv`). Checks locally, agrees ([`agree`]), runs the ring, and
    /// gathers the finished blocks on rank `out`, whose [`RankOutput`] alone holds O and LSE.
    pub fn attention(
        &self,
        mode: Mode,
        q: &[f32],
        kv: &RankKv,
        s: &AttnShape,
        opts: &Attention,
        out: usize,
    ) -> Result<RankOutput> {
        let local = self.check(q, kv, s, opts, out);
        agree_on(self.comm, local, &self.facts(s, mode, out, false))?;
        let mut ring = RingState {
            moved: mode == Mode::Lv,
            ..RingState::default()
        };
        let blocks = match mode {
            Mode::Lv => self.or_abort(self.lv(q, kv, s, opts, &mut ring)),
            Mode::Ring => self.or_abort(self.ring(q, kv, s, opts, &mut ring)),
        };
        let (o, lse) = self.or_abort(self.gather(s, blocks, out, &mut ring));
        // Every rank finished: rank `out` may write what it holds.
        agree(self.comm, Ok(()))?;
        Ok(RankOutput {
            o,
            lse,
            cost: ring.cost,
        })
    }

    /// What every rank of one call gives alike (checked by [`agree_on`]): the shape, the
    /// stored type, the mode, the gathering rank and whether the call is a backward.
    fn facts(&self, s: &AttnShape, mode: Mode, out: usize, backward: bool) -> Vec<u64> {
        let dims = [s.batch, s.m, s.n, s.q_heads, s.kv_heads, s.d_k, s.d_v];
        let call = [
            self.dtype.size(),
            mode as u64,
            out as u64,
            u64::from(backward),
        ];
        dims.iter().map(|&x| x as u64).chain(call).collect()
    }

    fn check(
        &self,
        q: &[f32],
        kv: &RankKv,
        s: &AttnShape,
        opts: &Attention,
        out: usize,
    ) -> Result<()> {
        check_call(q, s, self.dtype, opts)?;
        if out >= self.ranks() {
            return Err(Error::Argument(format!(
                "the result is gathered on rank {out}, but there are {} ranks",
                self.ranks()
            )));
        }
        let want = [s.batch, s.n, s.kv_heads, s.d_k, s.d_v];
        if kv.dims != want || kv.dtype != self.dtype {
            return Err(Error::Shape(format!(
                "the resident K/V shard is of [batch, N, kv_heads, d_k, d_v] = {:?} in {}; \
                 the call needs {want:?} in {}",
                kv.dims, kv.dtype, self.dtype
            )));
        }
        Ok(())
    }

    /// The result of a step that fails while the other ranks wait on this one: printed, then
    /// the communicator aborted (no rank may be left waiting).
    fn or_abort<T>(&self, r: Result<T>) -> T {
        r.unwrap_or_else(|e| {
            eprintln!(
                "xattn: error: rank {} of {}: {e}; aborting the communicator",
                self.rank(),
                self.ranks()
            );
            self.comm.abort(1)
        })
    }

    /// Q rows `rows` of the whole `q`, stored as this call's type, as sent.
    fn q_bytes(&self, q: &[f32], s: &AttnShape, (r0, r1): (usize, usize)) -> Vec<u8> {
        let rows = slice_axis(q, (s.batch, s.m, s.q_heads * s.d_k), r0, r1);
        wire(self.dtype, &rows)
    }

    /// One step on this rank: the partial of `tile` over `kv` (Q rows from `q`, in this
    /// call's type) merged into `run`; `None` stays `None` where the tile is empty.
    fn step(
        &self,
        q: &[u8],
        kv: Option<&(Tensor, Tensor)>,
        s: &AttnShape,
        tile: Tile,
        opts: &Attention,
        run: Option<Run>,
    ) -> Result<Option<Run>> {
        let Some(kv) = kv.filter(|_| !tile.is_empty()) else {
            return Ok(run);
        };
        let ctx = self.engine.context();
        let rows = tile.rows.1 - tile.rows.0;
        let bs = AttnShape { m: rows, ..*s };
        let qt = from_wire(ctx, "rank_q", q, &bs.q_dims(), self.dtype)?;
        let (o, lse) = block_partial(&self.engine, &qt, (&kv.0, &kv.1), s, tile, opts)?;
        let (o, lse) = match run {
            None => (o, lse),
            Some(run) => {
                let ro = Tensor::upload(ctx, "rank_run_o", &run.o, &bs.o_dims())?;
                let rl = Tensor::upload(ctx, "rank_run_lse", &run.lse, &bs.lse_dims())?;
                self.engine.merge(&[(&ro, &rl), (&o, &lse)])?
            }
        };
        Ok(Some(Run {
            o: o.to_host()?,
            lse: lse.to_host()?,
        }))
    }

    /// LV-XAttn on this rank; returns the block it ends with (block p + 1) and its result.
    fn lv(
        &self,
        q: &[f32],
        kv: &RankKv,
        s: &AttnShape,
        opts: &Attention,
        ring: &mut RingState,
    ) -> Result<((usize, usize), Run)> {
        let (p, r_n) = (self.rank(), self.ranks());
        let row_cuts = even_cuts(s.m, r_n);
        let rows = |b: usize| (row_cuts[b], row_cuts[b + 1]);
        let (next, prev) = (self.neighbour(1), self.neighbour(r_n - 1));
        let mut q_held = self.q_bytes(q, s, rows(p));
        let mut run: Option<Run> = None;
        for step in 0..r_n {
            // Rank p holds block p − step at this step.
            let b = (p + r_n - step) % r_n;
            let tile = Tile {
                rows: rows(b),
                keys: self.keys(),
            };
            let last = step + 1 == r_n;
            let b_next = (b + r_n - 1) % r_n;
            let n_next = rows(b_next).1 - rows(b_next).0;
            let mut q_next =
                vec![0u8; n_next * s.batch * s.q_heads * s.d_k * self.dtype.size() as usize];
            let mut run_next = vec![0u8; n_next * s.batch * s.q_heads * (s.d_v + 1) * 4];
            let stepped = scope(|sc| -> Result<Option<Run>> {
                // Q does not depend on this step's result: in flight during the compute.
                let q_reqs = if last {
                    None
                } else {
                    ring.sent(q_held.len(), true);
                    ring.received(q_next.len());
                    Some((
                        next.immediate_send_with_tag(sc, &q_held[..], TAG_A),
                        prev.immediate_receive_into_with_tag(sc, &mut q_next[..], TAG_A),
                    ))
                };
                let t = Instant::now();
                let stepped = self.step(&q_held, kv.shard.as_ref(), s, tile, opts, run.take());
                ring.cost.compute += t.elapsed();
                let t = Instant::now();
                if let Some((send, receive)) = q_reqs {
                    send.wait();
                    receive.wait();
                }
                ring.cost.wait += t.elapsed();
                stepped
            })?;
            let stepped = stepped.unwrap_or_else(|| Run::nothing(s, tile.rows.1 - tile.rows.0));
            if last {
                return Ok((tile.rows, stepped));
            }
            // The running O and LSE are this step's result: they move after it.
            let sending = stepped.bytes();
            ring.sent(sending.len(), false);
            ring.received(run_next.len());
            let t = Instant::now();
            send_receive_into_with_tags(
                &sending[..],
                &next,
                TAG_B,
                &mut run_next[..],
                &prev,
                TAG_B,
            );
            ring.cost.wait += t.elapsed();
            q_held = q_next;
            run = Some(Run::from_bytes(&run_next, s, n_next));
        }
        unreachable!("the last step returns")
    }

    /// Ring Attention on this rank; returns its own query block's rows and result.
    fn ring(
        &self,
        q: &[f32],
        kv: &RankKv,
        s: &AttnShape,
        opts: &Attention,
        ring: &mut RingState,
    ) -> Result<((usize, usize), Run)> {
        let (p, r_n) = (self.rank(), self.ranks());
        let row_cuts = even_cuts(s.m, r_n);
        let rows = (row_cuts[p], row_cuts[p + 1]);
        let (next, prev) = (self.neighbour(1), self.neighbour(r_n - 1));
        let q_mine = self.q_bytes(q, s, rows);
        let shard_dims = |keys: usize| {
            let sh = AttnShape { n: keys, ..*s };
            (
                sh.k_dims().iter().product::<usize>(),
                sh.v_dims().iter().product::<usize>(),
            )
        };
        // The shard held, as sent: this rank's own first (downloaded once).
        let (mut k_held, mut v_held) = match &kv.shard {
            Some((k, v)) => (to_wire(k)?, to_wire(v)?),
            None => (Vec::new(), Vec::new()),
        };
        let mut resident = kv.shard.clone();
        let mut run: Option<Run> = None;
        for step in 0..r_n {
            let sh = (p + r_n - step) % r_n;
            let keys = (self.cuts[sh], self.cuts[sh + 1]);
            let tile = Tile { rows, keys };
            let last = step + 1 == r_n;
            let sh_next = (sh + r_n - 1) % r_n;
            let (nk, nv) = shard_dims(self.cuts[sh_next + 1] - self.cuts[sh_next]);
            let size = self.dtype.size() as usize;
            let (mut k_next, mut v_next) = (vec![0u8; nk * size], vec![0u8; nv * size]);
            run = scope(|sc| -> Result<Option<Run>> {
                // K and V do not depend on the compute: the whole transfer is in flight.
                let reqs = if last {
                    None
                } else {
                    ring.sent(k_held.len() + v_held.len(), true);
                    ring.received(k_next.len() + v_next.len());
                    Some([
                        next.immediate_send_with_tag(sc, &k_held[..], TAG_A),
                        next.immediate_send_with_tag(sc, &v_held[..], TAG_B),
                        prev.immediate_receive_into_with_tag(sc, &mut k_next[..], TAG_A),
                        prev.immediate_receive_into_with_tag(sc, &mut v_next[..], TAG_B),
                    ])
                };
                let t = Instant::now();
                let stepped = (|| {
                    let held = match (&resident, tile.is_empty()) {
                        (Some(kv), false) => Some(kv.clone()),
                        (None, false) => {
                            let ctx = self.engine.context();
                            let sh = AttnShape {
                                n: keys.1 - keys.0,
                                ..*s
                            };
                            Some((
                                from_wire(ctx, "rank_k", &k_held, &sh.k_dims(), self.dtype)?,
                                from_wire(ctx, "rank_v", &v_held, &sh.v_dims(), self.dtype)?,
                            ))
                        }
                        _ => None,
                    };
                    self.step(&q_mine, held.as_ref(), s, tile, opts, run.take())
                })();
                ring.cost.compute += t.elapsed();
                let t = Instant::now();
                for r in reqs.into_iter().flatten() {
                    r.wait();
                }
                ring.cost.wait += t.elapsed();
                stepped
            })?;
            if !last {
                (k_held, v_held) = (k_next, v_next);
                // Shards other than this rank's own are uploaded from their bytes when used.
                resident = None;
            }
        }
        let n_rows = rows.1 - rows.0;
        Ok((rows, run.unwrap_or_else(|| Run::nothing(s, n_rows))))
    }

    /// The process `step` ranks after this one, around the ring.
    fn neighbour(&self, step: usize) -> mpi::topology::Process<'_> {
        let r = (self.rank() + step) % self.ranks();
        self.comm.process_at_rank(r as i32)
    }

    /// Every rank's finished block sent to rank `out`, which assembles O and LSE (empty
    /// elsewhere).
    fn gather(
        &self,
        s: &AttnShape,
        (rows, run): ((usize, usize), Run),
        out: usize,
        ring: &mut RingState,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let row_bytes = s.batch * s.q_heads * (s.d_v + 1) * 4;
        let blocks = self.gather_blocks(s.m, (rows, run.bytes()), row_bytes, out, ring);
        if blocks.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut o = vec![f32::NAN; s.o_dims().iter().product()];
        let mut lse = vec![f32::NAN; s.lse_dims().iter().product()];
        for ((r0, r1), bytes) in blocks {
            let run = Run::from_bytes(&bytes, s, r1 - r0);
            put_axis(&mut o, (s.batch, s.m, s.q_heads * s.d_v), r0, &run.o);
            put_axis(&mut lse, (s.batch * s.q_heads, s.m, 1), r0, &run.lse);
        }
        Ok((o, lse))
    }

    /// Every rank's finished block of the M query rows (its rows and `row_bytes` bytes a row)
    /// sent to rank `out`, which returns all of them (its own included); the others return
    /// none.
    fn gather_blocks(
        &self,
        m: usize,
        (rows, bytes): ((usize, usize), Vec<u8>),
        row_bytes: usize,
        out: usize,
        ring: &mut RingState,
    ) -> Vec<((usize, usize), Vec<u8>)> {
        let (p, r_n) = (self.rank(), self.ranks());
        let t = Instant::now();
        if p != out {
            ring.sent(bytes.len(), false);
            self.comm
                .process_at_rank(out as i32)
                .send_with_tag(&bytes[..], TAG_DONE);
            ring.cost.wait += t.elapsed();
            return Vec::new();
        }
        let mut blocks = vec![(rows, bytes)];
        // The block rank `from` ends with: LV's p + 1, Ring's p.
        let row_cuts = even_cuts(m, r_n);
        for from in (0..r_n).filter(|&f| f != out) {
            let b = ring.block_of(from, r_n);
            let rows = (row_cuts[b], row_cuts[b + 1]);
            let mut bytes = vec![0u8; (rows.1 - rows.0) * row_bytes];
            self.comm
                .process_at_rank(from as i32)
                .receive_into_with_tag(&mut bytes[..], TAG_DONE);
            ring.received(bytes.len());
            blocks.push((rows, bytes));
        }
        ring.cost.wait += t.elapsed();
        blocks
    }
}

/// `data` in `dtype` as it travels: exactly `len · size` bytes (no padding to whole words).
fn wire(dtype: DType, data: &[f32]) -> Vec<u8> {
    let mut b = dtype.encode(data);
    b.truncate(data.len() * dtype.size() as usize);
    b
}

/// A tensor's elements as they travel ([`wire`]), copied as stored (no conversion).
fn to_wire(t: &Tensor) -> Result<Vec<u8>> {
    let mut b = t.to_host_bytes()?;
    b.truncate(t.len() * t.dtype().size() as usize);
    Ok(b)
}

/// Elements as they travel ([`wire`]) uploaded as stored: `dims` of `dtype`.
fn from_wire(
    ctx: &crate::Context,
    name: &'static str,
    bytes: &[u8],
    dims: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    check_len(name, dims, bytes.len() / dtype.size() as usize)?;
    let mut words = bytes.to_vec();
    words.resize(dtype.bytes(bytes.len() / dtype.size() as usize) as usize, 0);
    Tensor::upload_bytes(ctx, name, &words, dims, dtype)
}

/// What a ring counted and timed on one rank.
#[derive(Default)]
struct RingState {
    cost: RankCost,
    /// Whether the blocks moved (LV: each rank ends with block p + 1) or stayed (Ring).
    moved: bool,
}

impl RingState {
    fn sent(&mut self, bytes: usize, during_compute: bool) {
        self.cost.traffic.sent += bytes as u64;
        if during_compute {
            self.cost.overlapped += bytes as u64;
        }
    }

    fn received(&mut self, bytes: usize) {
        self.cost.traffic.received += bytes as u64;
    }

    fn block_of(&self, rank: usize, ranks: usize) -> usize {
        if self.moved {
            (rank + 1) % ranks
        } else {
            rank
        }
    }
}
