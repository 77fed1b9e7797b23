//! The backward of LV-XAttn across ranks: the forward's ring carries the gradients.
//!
//! Query block r starts on rank r with its Q, the forward's O and LSE, the loss's dO and a
//! running dQ of zeros, and travels the same ring as the forward's blocks. At each step a
//! rank runs the single-device backward of the block it holds over its own keys (P
//! recomputed from Q, K and the block's LSE: nothing of the forward is stored but O and LSE),
//! adds the block's dQ partial to the running dQ it passes on, and adds the dK/dV partials
//! to its own keys' gradients, which never move. After R steps every block's dQ is whole; the
//! blocks go to rank `out`. This is exact for the reason the in-process sharded backward is
//! ([`crate::shard`]'s `backward` module): with the whole call's O, LSE and dO,
//! D = rowsum(dO ∘ O) and P = exp(s − LSE) of a shard's keys are the whole call's, so the
//! gradients add over key shards (dQ) and over query blocks (dK, dV).
//!
//! Q, O, LSE and dO do not depend on a step's result: they are in flight while the step
//! computes; the running dQ is that step's result and moves after it.
//!
//! Rounding: the partials add in f32 on the host, in ring order: dQ over R key shards adds
//! at most (R − 1)·ε·Σ_s |dQ_s| to the single-device error, and dK, dV over R query blocks
//! at most (R − 1)·ε·Σ_b |dK_b| (likewise dV), where Σ_b |dK_b| ≤ scale·Σ_i |dS_ij|·max|Q| ≤
//! 2·M·g·d_v·max|dO|·max|V|·|scale|·max|Q| and Σ_b |dV_b| ≤ M·g·max|dO| per element (ε = 2⁻²³,
//! g query heads per K/V head, each row's weights summing to 1).

use std::time::Instant;

use mpi::point_to_point::send_receive_into_with_tags;
use mpi::request::scope;
use mpi::traits::*;

use super::{agree, agree_on, from_wire, wire, RankAttention, RankCost, RankKv, RingState};
use super::{Mode, TAG_A, TAG_B};
use crate::dtype::DType;
use crate::engine::Attention;
use crate::error::{Error, Result};
use crate::gpu::tensor::Tensor;
use crate::plan::shard::{even_cuts, Tile};
use crate::shape::{check_len, AttnShape};
use crate::shard::{block_backward, put_axis, slice_axis};

#[cfg(doc)]
use crate::plan::shard::lv_backward_bytes;

/// What one rank returns from [`RankAttention::backward`]: on rank `out` the whole dQ, on
/// every rank the gradients of its own keys and what it moved.
#[derive(Clone, Debug, PartialEq)]
pub struct RankGrads {
    /// dQ `[batch, M, q_heads, d_k]`, f32, on rank `out`; empty elsewhere.
    pub dq: Vec<f32>,
    /// dK `[batch, n1 − n0, kv_heads, d_k]` of this rank's keys `(n0, n1)`
    /// ([`RankAttention::keys`]), f32; empty where it holds none.
    pub dk: Vec<f32>,
    /// dV `[batch, n1 − n0, kv_heads, d_v]` of this rank's keys, likewise.
    pub dv: Vec<f32>,
    /// What this rank moved (equal to [`lv_backward_bytes`]) and where its time went.
    pub cost: RankCost,
}

/// Where a rank's backward ends: the rows of the block it holds and their whole dQ, and the
/// dK and dV of its own keys.
struct Ended {
    rows: (usize, usize),
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl<C: Communicator> RankAttention<'_, C> {
    /// The gradients of [`RankAttention::attention`] (collective: every rank calls it with
    /// the same whole `q`, the whole call's `o` `[batch, M, q_heads, d_v]` and `lse`
    /// `[batch, q_heads, M]` (the forward's result on rank `out`, given to every rank), the
    /// loss's `d_o` in O's layout, `s`, `opts` and `out`, and its own shard `kv`). Rank p
    /// reads only its own block's rows of them. Runs LV-XAttn's schedule (see the module docs
    /// of `distributed::backward`); `mode` must be [`Mode::Lv`] (Ring Attention's backward
    /// would move dK and dV with their shards, the larger tensors: not offered). A bias
    /// gradient and dropout are not supported, as in the in-process sharded backward.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        mode: Mode,
        q: &[f32],
        kv: &RankKv,
        (o, lse): (&[f32], &[f32]),
        d_o: &[f32],
        s: &AttnShape,
        opts: &Attention,
        out: usize,
    ) -> Result<RankGrads> {
        let local = self.check_backward(mode, q, kv, (o, lse), d_o, s, opts, out);
        agree_on(self.comm, local, &self.facts(s, mode, out, true))?;
        let mut ring = RingState {
            moved: true,
            ..RingState::default()
        };
        let Ended { rows, dq, dk, dv } =
            self.or_abort(self.lv_backward((q, o, lse, d_o), kv, s, opts, &mut ring));
        let row_bytes = s.batch * s.q_heads * s.d_k * 4;
        let blocks = self.gather_blocks(
            s.m,
            (rows, wire(DType::F32, &dq)),
            row_bytes,
            out,
            &mut ring,
        );
        let mut whole = Vec::new();
        if !blocks.is_empty() {
            whole = vec![f32::NAN; s.q_dims().iter().product()];
            for ((r0, r1), bytes) in blocks {
                let block = DType::F32.decode(&bytes, (r1 - r0) * row_bytes / 4);
                put_axis(&mut whole, (s.batch, s.m, s.q_heads * s.d_k), r0, &block);
            }
        }
        // Every rank finished: rank `out` may write what it holds.
        agree(self.comm, Ok(()))?;
        Ok(RankGrads {
            dq: whole,
            dk,
            dv,
            cost: ring.cost,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn check_backward(
        &self,
        mode: Mode,
        q: &[f32],
        kv: &RankKv,
        (o, lse): (&[f32], &[f32]),
        d_o: &[f32],
        s: &AttnShape,
        opts: &Attention,
        out: usize,
    ) -> Result<()> {
        self.check(q, kv, s, opts, out)?;
        if mode != Mode::Lv {
            return Err(Error::Unsupported(format!(
                "the distributed backward runs LV-XAttn's schedule (mode lv), not {mode}"
            )));
        }
        check_len("o", &s.o_dims(), o.len())?;
        check_len("lse", &s.lse_dims(), lse.len())?;
        check_len("d_o", &s.o_dims(), d_o.len())?;
        if opts.bias_grad() {
            return Err(Error::Unsupported(
                "the bias gradient of a distributed call".into(),
            ));
        }
        Ok(())
    }

    /// Rows `rows` of Q (as stored), O, LSE and dO (f32), as they travel.
    fn held_bytes(
        &self,
        (q, o, lse, d_o): (&[f32], &[f32], &[f32], &[f32]),
        s: &AttnShape,
        (r0, r1): (usize, usize),
    ) -> Vec<u8> {
        let mut bytes = self.q_bytes(q, s, (r0, r1));
        let o_rows = |x: &[f32]| slice_axis(x, (s.batch, s.m, s.q_heads * s.d_v), r0, r1);
        let mut f = o_rows(o);
        f.extend(slice_axis(lse, (s.batch * s.q_heads, s.m, 1), r0, r1));
        f.extend(o_rows(d_o));
        bytes.extend(wire(DType::F32, &f));
        bytes
    }

    /// Bytes of the fixed part of a block of `rows` rows ([`RankAttention::held_bytes`]).
    fn held_len(&self, s: &AttnShape, rows: usize) -> usize {
        let heads = rows * s.batch * s.q_heads;
        heads * s.d_k * self.dtype.size() as usize + heads * (2 * s.d_v + 1) * 4
    }

    /// LV-XAttn's backward on this rank; returns the block it ends with (block p + 1) and its
    /// dQ, and the dK and dV of its own keys.
    fn lv_backward(
        &self,
        whole: (&[f32], &[f32], &[f32], &[f32]),
        kv: &RankKv,
        s: &AttnShape,
        opts: &Attention,
        ring: &mut RingState,
    ) -> Result<Ended> {
        let (p, r_n) = (self.rank(), self.ranks());
        let row_cuts = even_cuts(s.m, r_n);
        let rows = |b: usize| (row_cuts[b], row_cuts[b + 1]);
        let (next, prev) = (self.neighbour(1), self.neighbour(r_n - 1));
        let (n0, n1) = self.keys();
        let mine = AttnShape { n: n1 - n0, ..*s };
        let len = |dims: [usize; 4]| if n0 == n1 { 0 } else { dims.iter().product() };
        let (mut dk, mut dv) = (
            vec![0.0f32; len(mine.k_dims())],
            vec![0.0f32; len(mine.v_dims())],
        );
        let dq_len = |r: (usize, usize)| (r.1 - r.0) * s.batch * s.q_heads * s.d_k;
        let mut held = self.held_bytes(whole, s, rows(p));
        let mut dq = vec![0.0f32; dq_len(rows(p))];
        for step in 0..r_n {
            // Rank p holds block p − step at this step.
            let b = (p + r_n - step) % r_n;
            let tile = Tile {
                rows: rows(b),
                keys: (n0, n1),
            };
            let last = step + 1 == r_n;
            let b_next = (b + r_n - 1) % r_n;
            let mut held_next = vec![0u8; self.held_len(s, rows(b_next).1 - rows(b_next).0)];
            let partial = scope(|sc| -> Result<Option<[Vec<f32>; 3]>> {
                // The block's inputs do not depend on this step's result: in flight during
                // the compute.
                let reqs = if last {
                    None
                } else {
                    ring.sent(held.len(), true);
                    ring.received(held_next.len());
                    Some((
                        next.immediate_send_with_tag(sc, &held[..], TAG_A),
                        prev.immediate_receive_into_with_tag(sc, &mut held_next[..], TAG_A),
                    ))
                };
                let t = Instant::now();
                let partial = self.grad_step(&held, kv, s, tile, opts);
                ring.cost.compute += t.elapsed();
                let t = Instant::now();
                if let Some((send, receive)) = reqs {
                    send.wait();
                    receive.wait();
                }
                ring.cost.wait += t.elapsed();
                partial
            })?;
            if let Some([dq_b, dk_b, dv_b]) = partial {
                for (acc, part) in [(&mut dq, dq_b), (&mut dk, dk_b), (&mut dv, dv_b)] {
                    acc.iter_mut().zip(part).for_each(|(a, x)| *a += x);
                }
            }
            if last {
                return Ok(Ended {
                    rows: tile.rows,
                    dq,
                    dk,
                    dv,
                });
            }
            // The running dQ is this step's result: it moves after it.
            let sending = wire(DType::F32, &dq);
            let mut dq_next = vec![0u8; dq_len(rows(b_next)) * 4];
            ring.sent(sending.len(), false);
            ring.received(dq_next.len());
            let t = Instant::now();
            send_receive_into_with_tags(&sending[..], &next, TAG_B, &mut dq_next[..], &prev, TAG_B);
            ring.cost.wait += t.elapsed();
            held = held_next;
            dq = DType::F32.decode(&dq_next, dq_next.len() / 4);
        }
        unreachable!("the last step returns")
    }

    /// One step's gradients (dQ of the tile's rows, dK and dV of this rank's keys, f32 on the
    /// host) from the block's travelling inputs `held` ([`RankAttention::held_bytes`]), or
    /// `None` where the tile is empty.
    fn grad_step(
        &self,
        held: &[u8],
        kv: &RankKv,
        s: &AttnShape,
        tile: Tile,
        opts: &Attention,
    ) -> Result<Option<[Vec<f32>; 3]>> {
        let Some((k, v)) = kv.shard.as_ref().filter(|_| !tile.is_empty()) else {
            return Ok(None);
        };
        let ctx = self.engine.context();
        let bs = AttnShape {
            m: tile.rows.1 - tile.rows.0,
            ..*s
        };
        let q_len = bs.q_dims().iter().product::<usize>() * self.dtype.size() as usize;
        let q = from_wire(ctx, "rank_q", &held[..q_len], &bs.q_dims(), self.dtype)?;
        let (n_o, n_lse) = (
            bs.o_dims().iter().product::<usize>(),
            bs.batch * bs.q_heads * bs.m,
        );
        let f = DType::F32.decode(&held[q_len..], 2 * n_o + n_lse);
        let o = Tensor::upload(ctx, "rank_o", &f[..n_o], &bs.o_dims())?;
        let lse = Tensor::upload(ctx, "rank_lse", &f[n_o..n_o + n_lse], &bs.lse_dims())?;
        let d_o = Tensor::upload(ctx, "rank_d_o", &f[n_o + n_lse..], &bs.o_dims())?;
        let g = block_backward(&self.engine, (&q, k, v), (&o, &lse, &d_o), s, tile, opts)?;
        Ok(Some([g.dq.to_host()?, g.dk.to_host()?, g.dv.to_host()?]))
    }
}
