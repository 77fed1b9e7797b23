//! The backward of sharded attention: it splits exactly by key shard. With the whole call's
//! O, LSE and dO, D = rowsum(dO ∘ O) is the whole call's, and P = exp(s − LSE) of a shard's
//! keys is their part of the whole softmax (the kernels take the LSE given, they recompute no
//! row statistic; a row that sees no key of a shard gets P = 0 there, one that sees no key at
//! all has LSE −∞ and zero gradients). So each device runs the single-device backward of its
//! block (masks in global positions, as the forward's) on its own keys: dK and dV of its keys
//! are final, dQ is the sum over the shards of their partials.
//!
//! The partial dQs (f32, all M rows) come back through host memory and are summed there in
//! f32, in shard order: R partials add at most (R − 1)·ε·Σ_s |dQ_s| to the single-device
//! error, and Σ_s |dQ_s| ≤ Σ_j |dS_ij|·|scale|·max|K| ≤ 2·d_v·max|dO|·max|V|·|scale|·max|K|
//! per element (ε = 2⁻²³).

use crate::dtype::DType;
use crate::engine::{Attention, Engine};
use crate::error::{Error, Result};
use crate::gpu::tensor::Tensor;
use crate::grad::Grads;
use crate::plan::shard::{Tile, Traffic};
use crate::shape::{check_len, AttnShape};

use super::{block_options, put_axis, Counter, ShardedAttention, ShardedKv};

/// The gradients of a sharded call on the host, and what each device moved to get them.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardedGrads {
    /// dQ `[batch, M, q_heads, d_k]`, f32: the sum of the shards' partials.
    pub dq: Vec<f32>,
    /// Per device, dK `[batch, n_p, kv_heads, d_k]` of its n_p keys (f32; empty where it
    /// holds none).
    pub dk: Vec<Vec<f32>>,
    /// Per device, dV `[batch, n_p, kv_heads, d_v]` of its keys, likewise.
    pub dv: Vec<Vec<f32>>,
    /// Shard boundaries: device `p` holds keys `cuts[p] .. cuts[p + 1]`.
    pub cuts: Vec<usize>,
    /// Per device, the bytes it loaded from the host (Q, O, dO, LSE; K and V where the call
    /// uploads them) and returned to it (its partial dQ, dK, dV): [`super::backward_bytes`].
    pub traffic: Vec<Traffic>,
    /// `[batch, N, kv_heads, d_k, d_v]` of the whole K/V.
    dims: [usize; 5],
}

impl ShardedGrads {
    /// dK `[batch, N, kv_heads, d_k]` and dV `[batch, N, kv_heads, d_v]` of the whole source,
    /// the shards' gradients put in their key ranges.
    pub fn gathered_kv(&self) -> (Vec<f32>, Vec<f32>) {
        let [b, n, h, dk, dv] = self.dims;
        let mut k = vec![0.0; b * n * h * dk];
        let mut v = vec![0.0; b * n * h * dv];
        for (p, (gk, gv)) in self.dk.iter().zip(&self.dv).enumerate() {
            put_axis(&mut k, (b, n, h * dk), self.cuts[p], gk);
            put_axis(&mut v, (b, n, h * dv), self.cuts[p], gv);
        }
        (k, v)
    }
}

/// The gradients (f32) of `tile`'s block (non-empty) of the whole call `s` with options
/// `opts` on `engine`: Q of the tile's rows, K and V of its keys, and the whole call's O, LSE
/// and dO of the tile's rows. dK and dV are the block's share of its keys' gradients, dQ its
/// share of its rows' (see the module docs: they add over the blocks).
pub(crate) fn block_backward(
    engine: &Engine,
    qkv: (&Tensor, &Tensor, &Tensor),
    (o, lse, d_o): (&Tensor, &Tensor, &Tensor),
    s: &AttnShape,
    tile: Tile,
    opts: &Attention,
) -> Result<Grads> {
    let block_opts = block_options(s, tile, opts).with_grad_dtype(DType::F32);
    engine.attention_backward(qkv, (o, lse), d_o, &block_opts)
}

/// Where a backward call's K and V come from.
#[derive(Clone, Copy)]
enum Kv<'a> {
    Host(&'a [f32], &'a [f32]),
    Resident(&'a ShardedKv),
}

impl ShardedAttention {
    /// The gradients of [`ShardedAttention::attention`] (host slices, `s` the whole call's
    /// shape, `opts` its options): K and V cut and uploaded to their devices, then
    /// [`ShardedAttention::backward_kv`].
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (o, lse): (&[f32], &[f32]),
        d_o: &[f32],
        s: &AttnShape,
        opts: &Attention,
    ) -> Result<ShardedGrads> {
        self.shard_backward(Kv::Host(k, v), (q, o, lse, d_o), s, opts)
    }

    /// The gradients of a sharded call on resident K/V: Q, K, V and the options of the
    /// forward, the whole call's O and LSE (the forward's [`super::ShardedOutput`]) and dO
    /// `[batch, M, q_heads, d_v]`. Each device runs the backward of its keys (see the module
    /// docs of `shard::backward`); dQ is summed on the host. A bias gradient is not supported.
    pub fn backward_kv(
        &self,
        q: &[f32],
        kv: &ShardedKv,
        (o, lse): (&[f32], &[f32]),
        d_o: &[f32],
        s: &AttnShape,
        opts: &Attention,
    ) -> Result<ShardedGrads> {
        self.shard_backward(Kv::Resident(kv), (q, o, lse, d_o), s, opts)
    }

    /// Checks the call, uploads K and V where they come from the host, and runs each shard's
    /// backward.
    fn shard_backward(
        &self,
        kv: Kv,
        (q, o, lse, d_o): (&[f32], &[f32], &[f32], &[f32]),
        s: &AttnShape,
        opts: &Attention,
    ) -> Result<ShardedGrads> {
        let resident = match kv {
            Kv::Resident(kv) => Some(kv),
            Kv::Host(..) => None,
        };
        // Device 0 always exists (the backward merges nothing on one device).
        self.check(q, s, opts, 0, resident)?;
        check_len("o", &s.o_dims(), o.len())?;
        check_len("d_o", &s.o_dims(), d_o.len())?;
        check_len("lse", &s.lse_dims(), lse.len())?;
        if opts.bias_grad() {
            return Err(Error::Unsupported(
                "the bias gradient of a sharded call".into(),
            ));
        }
        let mut count = Counter(vec![Traffic::default(); self.engines.len()]);
        let uploaded;
        let kv = match kv {
            Kv::Host(k, v) => {
                uploaded = self.upload_kv_counted(k, v, s, &mut count)?;
                &uploaded
            }
            Kv::Resident(kv) => kv,
        };
        let mut dq = vec![0.0f32; s.q_dims().iter().product()];
        let (mut dk, mut dv) = (Vec::new(), Vec::new());
        for (p, shard) in kv.shards.iter().enumerate() {
            let Some((k, v)) = shard else {
                dk.push(Vec::new());
                dv.push(Vec::new());
                continue;
            };
            let tile = Tile {
                rows: (0, s.m),
                keys: (kv.cuts[p], kv.cuts[p + 1]),
            };
            let qp = self.load_q(p, q, s, tile.rows, &mut count)?;
            let mut load = |name: &'static str, data: &[f32], dims: &[usize]| -> Result<Tensor> {
                let t = Tensor::upload(self.engines[p].context(), name, data, dims)?;
                count.0[p].loaded += Counter::bytes(&t);
                Ok(t)
            };
            let o_t = load("shard_o", o, &s.o_dims())?;
            let lse_t = load("shard_lse", lse, &s.lse_dims())?;
            let d_o_t = load("shard_d_o", d_o, &s.o_dims())?;
            let g = block_backward(
                &self.engines[p],
                (&qp, k, v),
                (&o_t, &lse_t, &d_o_t),
                s,
                tile,
                opts,
            )?;
            for (x, y) in dq.iter_mut().zip(g.dq.to_host()?) {
                *x += y;
            }
            dk.push(g.dk.to_host()?);
            dv.push(g.dv.to_host()?);
            count.0[p].returned += [&g.dq, &g.dk, &g.dv]
                .map(Counter::bytes)
                .iter()
                .sum::<u64>();
        }
        Ok(ShardedGrads {
            dq,
            dk,
            dv,
            cuts: kv.cuts.clone(),
            traffic: count.0,
            dims: kv.dims,
        })
    }
}
