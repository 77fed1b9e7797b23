//! The multi-head layer ([`MultiHeadAttention`]) with its source sharded along the key axis:
//! each device projects the source rows it holds into its K/V shard (W^K, W^V and their
//! biases run where the shard lives, so K/V are never gathered), the device that merges
//! projects the queries and applies W^O to the merged heads. The attention in between is
//! [`ShardedAttention::attention_kv`]'s, exact up to the merge's f32 rounding.

use super::{Counter, ShardedAttention, ShardedKv, ShardedOutput, Split};
use crate::dtype::DType;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::gpu::tensor::Tensor;
use crate::mha::{MhaConfig, MhaOptions, MhaWeights, MultiHeadAttention, NeedWeights, Proj};
use crate::plan::shard::Traffic;
use crate::shape::{check_len, AttnShape};

/// A multi-head attention layer over several devices, the source cut along its rows: each
/// device projects the source rows it holds into its K/V shard (W^K, W^V and their biases run
/// where the shard lives, K/V are never gathered); the merging device projects the queries and
/// applies W^O to the merged heads. Every device keeps the whole layer's weights.
#[derive(Debug)]
pub struct ShardedLayer {
    /// Source rows stored as the weights' type.
    source: ShardedAttention,
    /// The attention on the projected, f32 K/V.
    attention: ShardedAttention,
    /// Per device, the layer's weights there.
    layers: Vec<MultiHeadAttention>,
}

impl ShardedLayer {
    /// The layer of `config` with `weights` on every one of `engines` (device `p` projects
    /// source shard `p`, keys cut as `split` says), weights and inputs stored as `dtype`
    /// (rounded once; the projections accumulate in f32 and write f32).
    pub fn new(
        engines: &[&Engine],
        split: Split,
        config: MhaConfig,
        weights: &MhaWeights,
        dtype: DType,
    ) -> Result<Self> {
        let attention = ShardedAttention::new(engines, split.clone())?;
        let layers = engines
            .iter()
            .map(|e| MultiHeadAttention::new_as(e, config, weights, dtype))
            .collect::<Result<_>>()?;
        Ok(ShardedLayer {
            source: ShardedAttention::new(engines, split)?.with_dtype(dtype),
            attention,
            layers,
        })
    }

    fn config(&self) -> MhaConfig {
        *self.layers[0].config()
    }

    /// Projects `key [batch, N, kdim]` and `value [batch, N, vdim]` once, each device its
    /// rows: K/V `[batch, N, kv_heads, head_dim]` stay sharded on the devices, for any number
    /// of [`ShardedLayer::forward_kv`] calls.
    pub fn project_source(
        &self,
        key: &[f32],
        value: &[f32],
        (batch, n): (usize, usize),
    ) -> Result<ShardedKv> {
        let mut count = Counter(vec![Traffic::default(); self.layers.len()]);
        self.project_counted(key, value, (batch, n), &mut count)
    }

    fn project_counted(
        &self,
        key: &[f32],
        value: &[f32],
        (batch, n): (usize, usize),
        count: &mut Counter,
    ) -> Result<ShardedKv> {
        let c = self.config();
        // The raw source as K/V of one "head" as wide as a row, cut and uploaded as any K/V.
        let rows = AttnShape {
            kv_heads: 1,
            d_k: c.kdim,
            d_v: c.vdim,
            ..c.attn_shape(batch, 0, n)
        };
        let raw = self.source.upload_kv_counted(key, value, &rows, count)?;
        let mut shards = Vec::with_capacity(raw.shards.len());
        for (p, shard) in raw.shards.iter().enumerate() {
            let dims = [
                batch,
                raw.cuts[p + 1] - raw.cuts[p],
                c.kv_heads,
                c.head_dim(),
            ];
            shards.push(match shard {
                None => None,
                Some((k, v)) => {
                    let jobs = [(Proj::K, k, &dims[..]), (Proj::V, v, &dims[..])];
                    let [k, v] = self.layers[p].project(&jobs)?.try_into().expect("two");
                    Some((k, v))
                }
            });
        }
        Ok(ShardedKv {
            cuts: raw.cuts,
            dims: [batch, n, c.kv_heads, c.head_dim(), c.head_dim()],
            dtype: DType::F32,
            shards,
        })
    }

    /// The layer's forward call, `query [batch, M, embed_dim]`, `key [batch, N, kdim]`,
    /// `value [batch, N, vdim]` (host slices), merged on device `out`: the result's `o` is the
    /// layer's output `[batch, M, embed_dim]` in f32, `lse` the attention's `[batch, heads,
    /// M]`. Masks in `opts` speak of the whole call; weights are not returned.
    pub fn forward(
        &self,
        query: &[f32],
        key: &[f32],
        value: &[f32],
        (batch, m, n): (usize, usize, usize),
        opts: &MhaOptions,
        out: usize,
    ) -> Result<ShardedOutput> {
        let mut count = Counter(vec![Traffic::default(); self.layers.len()]);
        self.check(query, (batch, m, n), opts, out, None)?;
        let kv = self.project_counted(key, value, (batch, n), &mut count)?;
        self.forward_counted(query, &kv, m, opts, out, count)
    }

    /// [`ShardedLayer::forward`] on a source projected before ([`ShardedLayer::project_source`]).
    pub fn forward_kv(
        &self,
        query: &[f32],
        kv: &ShardedKv,
        m: usize,
        opts: &MhaOptions,
        out: usize,
    ) -> Result<ShardedOutput> {
        let count = Counter(vec![Traffic::default(); self.layers.len()]);
        self.forward_counted(query, kv, m, opts, out, count)
    }

    /// What the layer checks before any device works: the query's length, the options, the
    /// merging device and `kv` (as [`ShardedAttention::attention_kv`] checks them on the
    /// projected Q).
    fn check(
        &self,
        query: &[f32],
        (batch, m, n): (usize, usize, usize),
        opts: &MhaOptions,
        out: usize,
        kv: Option<&ShardedKv>,
    ) -> Result<()> {
        let c = self.config();
        check_len("query", &[batch, m, c.embed_dim], query.len())?;
        if opts.need_weights != NeedWeights::None {
            return Err(Error::Unsupported(
                "a sharded layer returns its output only (weights are per key over the whole \
                 source)"
                    .into(),
            ));
        }
        let s = c.attn_shape(batch, m, n);
        let projected = vec![0.0; s.q_dims().iter().product()];
        let attention = opts.attention_for(batch, n)?;
        self.attention.check(&projected, &s, &attention, out, kv)
    }

    fn forward_counted(
        &self,
        query: &[f32],
        kv: &ShardedKv,
        m: usize,
        opts: &MhaOptions,
        out: usize,
        mut count: Counter,
    ) -> Result<ShardedOutput> {
        let c = self.config();
        let [batch, n, ..] = kv.dims;
        self.check(query, (batch, m, n), opts, out, Some(kv))?;
        let s = c.attn_shape(batch, m, n);
        let attention = opts.attention_for(batch, n)?;
        let engine = &self.attention.engines[out];
        let layer = &self.layers[out];
        let upload = |name, data: &[f32], dims: &[usize], dtype, count: &mut Counter| {
            let t = Tensor::upload_as(engine.context(), name, data, dims, dtype)?;
            count.0[out].loaded += Counter::bytes(&t);
            Ok::<_, Error>(t)
        };
        let x_dims = [batch, m, c.embed_dim];
        let x = upload("layer_query", query, &x_dims, self.source.dtype, &mut count)?;
        let [q] = layer
            .project(&[(Proj::Q, &x, &s.q_dims())])?
            .try_into()
            .expect("one");
        let q = q.to_host()?;
        let merged = self.attention.star(&q, kv, &s, &attention, out, count)?;
        let mut count = Counter(merged.traffic);
        let heads_dims = [batch, m, c.inner_dim];
        let heads = upload(
            "layer_heads",
            &merged.o,
            &heads_dims,
            DType::F32,
            &mut count,
        )?;
        let [o] = layer
            .project(&[(Proj::O, &heads, &x_dims)])?
            .try_into()
            .expect("one");
        count.0[out].returned += Counter::bytes(&o);
        Ok(ShardedOutput {
            o: o.to_host()?,
            lse: merged.lse,
            traffic: count.0,
        })
    }
}
