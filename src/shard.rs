//! Attention with K and V sharded along the key axis over several devices of one process.
//!
//! Each device ([`Engine`], on its own [`Context`](crate::Context)) holds one shard of the keys
//! and computes, for the query rows it is given, the partial result of attention over its keys
//! alone: O in f32 and the LSE. Partials over disjoint keys merge exactly
//! (`LSE = log Σ exp(LSE_i)`, `O = Σ exp(LSE_i − LSE)·O_i`, [`Engine::merge`]), so the sharded
//! call equals the single-device call up to f32 rounding (see the README for the bound).
//! Tensors move between devices through host memory.
//!
//! Masks speak of the whole call, in global positions: each shard computes the block of the
//! whole call its rows and keys make ([`crate::mask::Block`]): lengths, causal and window
//! diagonals and key segments stay global, the bool mask and the bias are cut to the block's
//! rows and keys. A row that sees no key of a shard gives that shard an LSE of −∞ (it weighs
//! 0); a row that sees no key at all gives zeros and LSE −∞, as the single-device call does.
//!
//! Three schedules of the same per-block compute and merge, which differ only in what moves:
//! - [`ShardedAttention::attention`] (and [`ShardedAttention::attention_kv`] on resident
//!   shards): Q goes to every device, each sends its partial (O, LSE) to the device the caller
//!   names, which merges them ([`star_bytes`]);
//! - [`ShardedAttention::lv_ring`], LV-XAttn: the rows are cut into R query blocks; each block
//!   visits every device in turn with its running (O, LSE), merged at each step; K and V never
//!   move ([`lv_bytes`]);
//! - [`ShardedAttention::kv_ring`], Ring Attention: each device keeps its query block and the K/V
//!   shards circulate ([`ring_bytes`]).
//!
//! The per-block compute (`partial`, `step`) and the merge are device-local; only the moves
//! (`carry`: one tensor from one device to another) differ between one process and several
//! ranks, so a transport between processes replaces `carry` and keeps the rest. Counters of the bytes each device sent and
//! received come with every result ([`ShardedOutput::traffic`]) and equal the byte models.
//!
//! [`ShardedAttention::backward`] (and [`ShardedAttention::backward_kv`]) splits exactly by key
//! shard too: each device runs the backward of its keys with the whole call's O, LSE and dO;
//! dK and dV stay per shard, the partial dQs are summed in f32 ([`ShardedGrads`]).
//!
//! [`ShardedLayer`] is the multi-head layer on the same schedule: each device projects the
//! source rows it holds, so K/V are never gathered; the merging device projects Q and applies W^O.
//!
//! ```no_run
//! # fn main() -> xattn::Result<()> {
//! use xattn::shard::{ShardedAttention, Split};
//! let (a, b) = (xattn::Context::new()?, xattn::Context::new()?);
//! let (ea, eb) = (xattn::Engine::new(&a), xattn::Engine::new(&b));
//! let s = xattn::AttnShape { batch: 1, m: 4, n: 1000, q_heads: 8, kv_heads: 8, d_k: 64, d_v: 64 };
//! let sharded = ShardedAttention::new(&[&ea, &eb], Split::Even)?;
//! let (q, k, v) = (vec![0.1; 4 * 8 * 64], vec![0.2; 1000 * 8 * 64], vec![0.3; 1000 * 8 * 64]);
//! let kv = sharded.upload_kv(&k, &v, &s)?;          // each device keeps its shard
//! let out = sharded.attention_kv(&q, &kv, &s, &xattn::Attention::default(), 0)?;
//! println!("{:?}", out.traffic);                      // bytes each device sent and received
//! # Ok(()) }
//! ```

use crate::dtype::DType;
use crate::engine::{Attention, Engine};
use crate::error::{Error, Result};
use crate::gpu::tensor::Tensor;
use crate::plan::shard::{even_cuts, lv_holder, ring_shard, Tile};
use crate::shape::{check_len, AttnShape};

mod backward;
mod layer;

#[cfg(feature = "mpi")]
pub(crate) use backward::block_backward;
pub use backward::ShardedGrads;
pub use layer::ShardedLayer;

pub use crate::plan::shard::{
    backward_bytes, lv_backward_bytes, lv_bytes, ring_bytes, star_bytes, RowBytes, Split, Traffic,
};

/// Attention over several devices, K and V split along the key axis (see the [module
/// docs](self)).
#[derive(Debug)]
pub struct ShardedAttention {
    engines: Vec<Engine>,
    split: Split,
    dtype: DType,
}

/// K and V resident on the devices, one shard each, uploaded once and reused across calls
/// (decoding: the source stays, the queries change).
#[derive(Debug)]
pub struct ShardedKv {
    cuts: Vec<usize>,
    /// `[batch, N, kv_heads, d_k, d_v]` of the whole K/V.
    dims: [usize; 5],
    dtype: DType,
    /// Per device: its K and V shard, `None` where it holds no key.
    shards: Vec<Option<(Tensor, Tensor)>>,
}

impl ShardedKv {
    /// Shard boundaries: device `p` holds keys `cuts[p] .. cuts[p + 1]`.
    pub fn cuts(&self) -> &[usize] {
        &self.cuts
    }
}

/// The merged result on the host and what each device moved to get it.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardedOutput {
    /// O `[batch, M, q_heads, d_v]`, f32 (the merge's type, whatever the inputs').
    pub o: Vec<f32>,
    /// LSE `[batch, q_heads, M]`.
    pub lse: Vec<f32>,
    /// Per device, the bytes it sent to and received from the other devices, loaded from the
    /// caller's host memory (Q, K, V) and returned to it.
    pub traffic: Vec<Traffic>,
}

/// Bytes moved, per device, counted where the moves happen.
struct Counter(Vec<Traffic>);

impl Counter {
    fn bytes(t: &Tensor) -> u64 {
        t.len() as u64 * t.dtype().size()
    }
}

/// Elements `lo..hi` of axis 1 of a row-major `[outer, len, inner]` array.
pub(crate) fn slice_axis<T: Copy>(
    data: &[T],
    (outer, len, inner): (usize, usize, usize),
    lo: usize,
    hi: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(outer * (hi - lo) * inner);
    for o in 0..outer {
        out.extend_from_slice(&data[(o * len + lo) * inner..(o * len + hi) * inner]);
    }
    out
}

/// Writes `part` (`[outer, hi − lo, inner]`) into elements `lo..hi` of axis 1 of `data`.
pub(crate) fn put_axis<T: Copy>(
    data: &mut [T],
    (outer, len, inner): (usize, usize, usize),
    lo: usize,
    part: &[T],
) {
    let w = part.len() / outer.max(1);
    for o in 0..outer {
        data[(o * len + lo) * inner..][..w].copy_from_slice(&part[o * w..][..w]);
    }
}

/// Checks what every sharded call checks, on each device or rank alike: Q's length, the
/// options as a single-device call of shape `s` and inputs of type `dtype` would, and what a
/// sharded call cannot return.
pub(crate) fn check_call(q: &[f32], s: &AttnShape, dtype: DType, opts: &Attention) -> Result<()> {
    check_len("q", &s.q_dims(), q.len())?;
    let req = opts.request_typed(*s, dtype)?;
    if req.weights || req.stats.any() || req.pool.is_some() {
        return Err(Error::Unsupported(
            "a sharded call returns O and LSE only (weights and statistics are per key \
                 over the whole source)"
                .into(),
        ));
    }
    if req.masks.dropout.is_some() {
        return Err(Error::Unsupported("dropout in a sharded call".into()));
    }
    if opts.masking().block.is_some() {
        return Err(Error::Argument(
            "a sharded call makes its own blocks; give the whole call's options".into(),
        ));
    }
    Ok(())
}

/// The partial (O in f32, LSE) of `tile` (non-empty) on `engine`: attention of the tile's Q
/// rows `q` over the tile's keys `kv`, as the block of the whole call `s` with options `opts`.
pub(crate) fn block_partial(
    engine: &Engine,
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    s: &AttnShape,
    tile: Tile,
    opts: &Attention,
) -> Result<(Tensor, Tensor)> {
    let out = engine.attention(q, k, v, &block_options(s, tile, opts))?;
    Ok((out.o, out.lse))
}

/// The whole call's options `opts` made those of `tile`'s block: its masks in global
/// positions, the whole call's scale, O in f32.
fn block_options(s: &AttnShape, tile: Tile, opts: &Attention) -> Attention {
    let masking = tile.masking(s, opts.masking());
    opts.clone()
        .with_scale(opts.scale_for(s.d_k))
        .with_out_dtype(DType::F32)
        .with_masking(masking)
}

/// A running partial result on one device: O `[batch, rows, q_heads, d_v]` f32 and LSE
/// `[batch, q_heads, rows]`.
struct Partial {
    o: Tensor,
    lse: Tensor,
}

impl ShardedAttention {
    /// A sharded call over `engines` (device `p` holds shard `p`), keys cut as `split` says.
    /// Inputs are stored as f32 unless [`ShardedAttention::with_dtype`] says otherwise.
    pub fn new(engines: &[&Engine], split: Split) -> Result<Self> {
        if engines.is_empty() {
            return Err(Error::Argument(
                "a sharded call needs at least one engine".into(),
            ));
        }
        Ok(ShardedAttention {
            engines: engines.iter().map(|&e| e.clone()).collect(),
            split,
            dtype: DType::F32,
        })
    }

    /// Stores Q, K and V on the devices as `dtype` (rounded once on the host); partials and
    /// the merge stay f32.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The devices, in shard order.
    pub fn engines(&self) -> &[Engine] {
        &self.engines
    }

    /// Uploads each device's shard of `k` `[batch, N, kv_heads, d_k]` and `v`
    /// `[batch, N, kv_heads, d_v]` (dims from `s`).
    pub fn upload_kv(&self, k: &[f32], v: &[f32], s: &AttnShape) -> Result<ShardedKv> {
        self.upload_kv_counted(
            k,
            v,
            s,
            &mut Counter(vec![Traffic::default(); self.engines.len()]),
        )
    }

    fn upload_kv_counted(
        &self,
        k: &[f32],
        v: &[f32],
        s: &AttnShape,
        count: &mut Counter,
    ) -> Result<ShardedKv> {
        check_len("k", &s.k_dims(), k.len())?;
        check_len("v", &s.v_dims(), v.len())?;
        let cuts = self.split.cuts(s.n, self.engines.len())?;
        let mut shards = Vec::with_capacity(self.engines.len());
        for (p, e) in self.engines.iter().enumerate() {
            let (n0, n1) = (cuts[p], cuts[p + 1]);
            if n0 == n1 {
                shards.push(None);
                continue;
            }
            let rows = |d: usize| (s.batch, s.n, s.kv_heads * d);
            let ks = slice_axis(k, rows(s.d_k), n0, n1);
            let vs = slice_axis(v, rows(s.d_v), n0, n1);
            let kt = Tensor::upload_as(
                e.context(),
                "shard_k",
                &ks,
                &[s.batch, n1 - n0, s.kv_heads, s.d_k],
                self.dtype,
            )?;
            let vt = Tensor::upload_as(
                e.context(),
                "shard_v",
                &vs,
                &[s.batch, n1 - n0, s.kv_heads, s.d_v],
                self.dtype,
            )?;
            count.0[p].loaded += Counter::bytes(&kt) + Counter::bytes(&vt);
            shards.push(Some((kt, vt)));
        }
        Ok(ShardedKv {
            cuts,
            dims: [s.batch, s.n, s.kv_heads, s.d_k, s.d_v],
            dtype: self.dtype,
            shards,
        })
    }

    /// Validates a call: the options (as a single-device call of shape `s` would), what a
    /// sharded call cannot return, the output device, and `kv` against `s`.
    fn check(
        &self,
        q: &[f32],
        s: &AttnShape,
        opts: &Attention,
        out: usize,
        kv: Option<&ShardedKv>,
    ) -> Result<()> {
        check_call(q, s, self.dtype, opts)?;
        if out >= self.engines.len() {
            return Err(Error::Argument(format!(
                "the result is merged on device {out}, but there are {} devices",
                self.engines.len()
            )));
        }
        if let Some(kv) = kv {
            let want = [s.batch, s.n, s.kv_heads, s.d_k, s.d_v];
            if kv.dims != want || kv.shards.len() != self.engines.len() {
                return Err(Error::Shape(format!(
                    "the resident K/V is [batch, N, kv_heads, d_k, d_v] = {:?} over {} devices; \
                     the call needs {want:?} over {}",
                    kv.dims,
                    kv.shards.len(),
                    self.engines.len()
                )));
            }
            if kv.dtype != self.dtype {
                return Err(Error::Argument(format!(
                    "the resident K/V is {} but Q is stored as {}",
                    kv.dtype, self.dtype
                )));
            }
        }
        Ok(())
    }

    /// The partial of `tile` (non-empty) on device `p`: attention of the tile's Q rows `q` over
    /// the tile's keys `kv`, as the block of the whole call.
    fn partial(
        &self,
        p: usize,
        q: &Tensor,
        (k, v): (&Tensor, &Tensor),
        s: &AttnShape,
        tile: Tile,
        opts: &Attention,
    ) -> Result<Partial> {
        let (o, lse) = block_partial(&self.engines[p], q, (k, v), s, tile, opts)?;
        Ok(Partial { o, lse })
    }

    /// The partial of rows that saw no key yet on device `p`: O = 0, LSE = −∞.
    fn nothing(&self, p: usize, s: &AttnShape, rows: usize) -> Result<Partial> {
        let ctx = self.engines[p].context();
        let d = AttnShape { m: rows, ..*s };
        let lse = vec![f32::NEG_INFINITY; d.lse_dims().iter().product()];
        Ok(Partial {
            o: Tensor::upload(
                ctx,
                "shard_o",
                &vec![0.0; d.o_dims().iter().product()],
                &d.o_dims(),
            )?,
            lse: Tensor::upload(ctx, "shard_lse", &lse, &d.lse_dims())?,
        })
    }

    /// `t` moved from device `from` to device `to` through host memory, counted.
    /// [`ShardedAttention::carry`] of a partial's O and LSE.
    fn carry_partial(
        &self,
        part: &Partial,
        route: (usize, usize),
        count: &mut Counter,
    ) -> Result<Partial> {
        Ok(Partial {
            o: self.carry(&part.o, route, count)?,
            lse: self.carry(&part.lse, route, count)?,
        })
    }

    fn carry(&self, t: &Tensor, (from, to): (usize, usize), count: &mut Counter) -> Result<Tensor> {
        if from == to {
            return Ok(t.clone());
        }
        let host = t.to_host()?;
        let moved = Tensor::upload_as(
            self.engines[to].context(),
            "carried",
            &host,
            t.dims(),
            t.dtype(),
        )?;
        count.0[from].sent += Counter::bytes(t);
        count.0[to].received += Counter::bytes(t);
        Ok(moved)
    }

    /// Q rows `r0..r1` uploaded to device `p`, counted.
    fn load_q(
        &self,
        p: usize,
        q: &[f32],
        s: &AttnShape,
        (r0, r1): (usize, usize),
        count: &mut Counter,
    ) -> Result<Tensor> {
        let rows = slice_axis(q, (s.batch, s.m, s.q_heads * s.d_k), r0, r1);
        let t = Tensor::upload_as(
            self.engines[p].context(),
            "shard_q",
            &rows,
            &[s.batch, r1 - r0, s.q_heads, s.d_k],
            self.dtype,
        )?;
        count.0[p].loaded += Counter::bytes(&t);
        Ok(t)
    }

    /// Block results (rows, partial on device `out`) assembled on the host.
    fn gather(
        &self,
        s: &AttnShape,
        blocks: Vec<((usize, usize), Partial)>,
        out: usize,
        count: &mut Counter,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut o = vec![f32::NAN; s.o_dims().iter().product()];
        let mut lse = vec![f32::NAN; s.lse_dims().iter().product()];
        for ((r0, _), part) in blocks {
            let (bo, bl) = (part.o.to_host()?, part.lse.to_host()?);
            count.0[out].returned += Counter::bytes(&part.o) + Counter::bytes(&part.lse);
            put_axis(&mut o, (s.batch, s.m, s.q_heads * s.d_v), r0, &bo);
            put_axis(&mut lse, (s.batch * s.q_heads, s.m, 1), r0, &bl);
        }
        Ok((o, lse))
    }

    /// Sharded attention on host slices (layouts of [`Engine`]; `s` the whole call's shape):
    /// K and V cut and uploaded to their devices, Q sent to every device, the partials merged
    /// on device `out`. `opts` are the whole call's options, masks in global positions.
    pub fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: &AttnShape,
        opts: &Attention,
        out: usize,
    ) -> Result<ShardedOutput> {
        self.check(q, s, opts, out, None)?;
        let mut count = Counter(vec![Traffic::default(); self.engines.len()]);
        let kv = self.upload_kv_counted(k, v, s, &mut count)?;
        self.star(q, &kv, s, opts, out, count)
    }

    /// [`ShardedAttention::attention`] on K/V shards already on the devices
    /// ([`ShardedAttention::upload_kv`]).
    pub fn attention_kv(
        &self,
        q: &[f32],
        kv: &ShardedKv,
        s: &AttnShape,
        opts: &Attention,
        out: usize,
    ) -> Result<ShardedOutput> {
        self.check(q, s, opts, out, Some(kv))?;
        let count = Counter(vec![Traffic::default(); self.engines.len()]);
        self.star(q, kv, s, opts, out, count)
    }

    fn star(
        &self,
        q: &[f32],
        kv: &ShardedKv,
        s: &AttnShape,
        opts: &Attention,
        out: usize,
        mut count: Counter,
    ) -> Result<ShardedOutput> {
        let mut partials = Vec::new();
        for (p, shard) in kv.shards.iter().enumerate() {
            let Some((k, v)) = shard else { continue };
            let tile = Tile {
                rows: (0, s.m),
                keys: (kv.cuts[p], kv.cuts[p + 1]),
            };
            let qp = self.load_q(p, q, s, tile.rows, &mut count)?;
            let part = self.partial(p, &qp, (k, v), s, tile, opts)?;
            partials.push(self.carry_partial(&part, (p, out), &mut count)?);
        }
        let pairs: Vec<(&Tensor, &Tensor)> = partials.iter().map(|x| (&x.o, &x.lse)).collect();
        let (o, lse) = self.engines[out].merge(&pairs)?;
        let (o, lse) = self.gather(s, vec![((0, s.m), Partial { o, lse })], out, &mut count)?;
        Ok(ShardedOutput {
            o,
            lse,
            traffic: count.0,
        })
    }

    /// LV-XAttn on resident K/V shards: the M query rows are cut into R even blocks, block r
    /// starting on device r; at each step every device computes the partial of the block it
    /// holds over its own shard and merges it into the block's running (O, LSE), then passes
    /// the block, Q with its running (O, LSE), to the next device. After R steps each block has
    /// seen every shard; its (O, LSE) goes to device `out`, and the result to the host. K and V
    /// never move; the bytes moved are [`lv_bytes`].
    pub fn lv_ring(
        &self,
        q: &[f32],
        kv: &ShardedKv,
        s: &AttnShape,
        opts: &Attention,
        out: usize,
    ) -> Result<ShardedOutput> {
        self.check(q, s, opts, out, Some(kv))?;
        let r_n = self.engines.len();
        let mut count = Counter(vec![Traffic::default(); r_n]);
        let row_cuts = even_cuts(s.m, r_n);
        let mut done = Vec::new();
        // Block by block: each block's steps depend on its own previous step only (devices
        // would run the blocks they hold side by side).
        for r in (0..r_n).filter(|&r| row_cuts[r] < row_cuts[r + 1]) {
            let rows = (row_cuts[r], row_cuts[r + 1]);
            let mut qb = self.load_q(r, q, s, rows, &mut count)?;
            let mut run: Option<Partial> = None;
            for step in 0..r_n {
                let p = lv_holder(r, step, r_n);
                if step > 0 {
                    let from = lv_holder(r, step - 1, r_n);
                    let prev = run.take().expect("set at step 0");
                    qb = self.carry(&qb, (from, p), &mut count)?;
                    run = Some(self.carry_partial(&prev, (from, p), &mut count)?);
                }
                let tile = Tile {
                    rows,
                    keys: (kv.cuts[p], kv.cuts[p + 1]),
                };
                run = Some(self.step(p, &qb, kv.shards[p].as_ref(), s, tile, opts, run)?);
            }
            let last = lv_holder(r, r_n - 1, r_n);
            let fin = run.expect("R ≥ 1 steps ran");
            done.push((rows, self.carry_partial(&fin, (last, out), &mut count)?));
        }
        let (o, lse) = self.gather(s, done, out, &mut count)?;
        Ok(ShardedOutput {
            o,
            lse,
            traffic: count.0,
        })
    }

    /// Ring Attention on resident K/V shards: device p keeps query block p (M cut as in
    /// [`ShardedAttention::lv_ring`]); the K/V shards circulate, shard s starting on device s,
    /// each device merging the partial over the shard it holds at each step. Copies move (the
    /// resident shards stay where they are); the bytes moved are [`ring_bytes`].
    pub fn kv_ring(
        &self,
        q: &[f32],
        kv: &ShardedKv,
        s: &AttnShape,
        opts: &Attention,
        out: usize,
    ) -> Result<ShardedOutput> {
        self.check(q, s, opts, out, Some(kv))?;
        let r_n = self.engines.len();
        let mut count = Counter(vec![Traffic::default(); r_n]);
        let row_cuts = even_cuts(s.m, r_n);
        let mut held: Vec<Option<(Tensor, Tensor)>> = kv.shards.clone();
        let mut qs = Vec::with_capacity(r_n);
        for p in 0..r_n {
            let rows = (row_cuts[p], row_cuts[p + 1]);
            qs.push(if rows.0 < rows.1 {
                Some(self.load_q(p, q, s, rows, &mut count)?)
            } else {
                None
            });
        }
        let mut runs: Vec<Option<Partial>> = (0..r_n).map(|_| None).collect();
        for step in 0..r_n {
            for p in 0..r_n {
                let Some(qb) = &qs[p] else { continue };
                let sh = ring_shard(p, step, r_n);
                let tile = Tile {
                    rows: (row_cuts[p], row_cuts[p + 1]),
                    keys: (kv.cuts[sh], kv.cuts[sh + 1]),
                };
                let prev = runs[p].take();
                runs[p] = Some(self.step(p, qb, held[p].as_ref(), s, tile, opts, prev)?);
            }
            if step + 1 < r_n {
                let mut next: Vec<Option<(Tensor, Tensor)>> = (0..r_n).map(|_| None).collect();
                for (p, shard) in held.iter().enumerate() {
                    let to = (p + 1) % r_n;
                    if let Some((k, v)) = shard {
                        next[to] = Some((
                            self.carry(k, (p, to), &mut count)?,
                            self.carry(v, (p, to), &mut count)?,
                        ));
                    }
                }
                held = next;
            }
        }
        let mut done = Vec::new();
        for (p, run) in runs.into_iter().enumerate() {
            let Some(fin) = run else { continue };
            done.push((
                (row_cuts[p], row_cuts[p + 1]),
                self.carry_partial(&fin, (p, out), &mut count)?,
            ));
        }
        let (o, lse) = self.gather(s, done, out, &mut count)?;
        Ok(ShardedOutput {
            o,
            lse,
            traffic: count.0,
        })
    }

    /// One step of a ring on device `p`: the partial of `tile` over the shard `kv` it holds
    /// (none where the tile has no key) merged into the running `run` (none before the first).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        p: usize,
        q: &Tensor,
        kv: Option<&(Tensor, Tensor)>,
        s: &AttnShape,
        tile: Tile,
        opts: &Attention,
        run: Option<Partial>,
    ) -> Result<Partial> {
        let part = match kv.filter(|_| !tile.is_empty()) {
            Some((k, v)) => Some(self.partial(p, q, (k, v), s, tile, opts)?),
            None => None,
        };
        Ok(match (run, part) {
            (None, Some(x)) | (Some(x), None) => x,
            (None, None) => self.nothing(p, s, tile.rows.1 - tile.rows.0)?,
            (Some(a), Some(b)) => {
                let (o, lse) = self.engines[p].merge(&[(&a.o, &a.lse), (&b.o, &b.lse)])?;
                Partial { o, lse }
            }
        })
    }
}
