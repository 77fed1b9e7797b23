//! Attention over a graph's edge list: [`Graph`], [`GraphAttention`] and
//! [`Engine::graph_attention`]. Planned by [`crate::plan::graph`].
//!
//! # Semantics
//! Queries are the destination nodes, keys and values the source nodes (two node sets: a
//! bipartite graph has M ≠ N; a graph on one node set passes the same features, or their
//! projections, as both). Destination `i` attends to its in-neighbours only:
//!
//! `O[i, h] = Σ_{e: dst(e) = i} softmax_e(scale·q[i, h]·(k[src(e), h / group] + f[e, h]) + bias[e, h]) · (v[src(e), h / group] + f[e, h])`
//!
//! - layouts as for dense attention with batch 1: Q `[1, M, heads, d_k]`, K `[1, N, kv_heads,
//!   d_k]`, V `[1, N, kv_heads, d_v]`, O `[1, M, heads, d_v]` (f32), LSE `[1, heads, M]` (f32,
//!   natural log); query head h reads K/V head `h / (heads / kv_heads)` (GQA). Heads are
//!   returned side by side ("concatenated" as in PyG's `concat=True`), or averaged into O
//!   `[1, M, 1, d_v]` ([`GraphAttention::with_heads_averaged`], PyG's `concat=False`; LSE
//!   stays per head). Batches of graphs are one graph of their disjoint union (batch 1 only).
//! - scale `1/√d_k` by default ([`GraphAttention::with_scale`]), as PyG's `TransformerConv`;
//! - the bias ([`GraphAttention::with_bias`]) is per edge and head, `[E, heads]` in the order
//!   the edges were given; a value ≤ −1e30 ([`crate::mask::BIAS_REMOVES`]) or −∞ removes its
//!   edge, as on the dense paths;
//! - edge features f ([`GraphAttention::with_edge_features`]) are per edge and head, `[E,
//!   heads, d]` (f32, d = d_k = d_v) in the order the edges were given, added to the edge's
//!   key row in its logit and to its value row, as PyG's `TransformerConv` adds its projected
//!   `edge_attr` (`lin_edge(edge_attr)` viewed as `[E, heads, out_channels]`);
//! - duplicate edges count as often as they appear, self-loops as any edge; none are added;
//! - a destination with no (kept) in-edge outputs 0 and LSE −∞. PyG's `TransformerConv`
//!   outputs 0 there too (its scatter softmax has no entries and the aggregation sums
//!   nothing), before its skip connection and bias terms;
//! - statistics ([`GraphAttention::with_stats`]) as for dense attention ([`crate::stats`]),
//!   over the edges: entropy `−Σ P ln P` and focus `max P` per destination over its in-edges,
//!   coverage `Σ P` per source over its out-edges, `[1, heads, M]` and `[1, heads, N]` (f32;
//!   0 for a node without kept edges), each weight `P = exp(logit − LSE)` rebuilt from Q, K
//!   and the LSE, never stored;
//! - work and memory grow with E·d, never with M·N: no mask and no score matrix exist.
//!
//! Gradients: [`Engine::graph_attention_backward`] (see [`backward`]) returns dQ, dK, dV and,
//! where the call has them, d edge features and d bias, in the given edge order.
//!
//! Topology features for GTAT's graph cross-attention, each node's graphlet-orbit counts, come
//! from [`orbits::graphlet_orbits`] (on the host); the layer itself is
//! [`gca::GraphCrossAttention`].

pub mod backward;
pub mod gca;
pub mod orbits;

use std::collections::HashMap;

use crate::call::Prepared;
use crate::cpu::graph_reference::{GraphDims, GraphTerms};
use crate::dtype::DType;
use crate::engine::{dims4, same_dtype, Engine, Scratch};
use crate::error::{Error, Result};
use crate::gpu::executor::Bindings;
use crate::gpu::tensor::Tensor;
use crate::mask::{BIAS_REMOVES, LOGIT_FACTOR_MAX};
use crate::plan::graph::{GraphPlan, GraphRequest};
use crate::program::BufferId;

/// A directed graph as CSR by destination: destination `i`'s in-edges are positions
/// `row_ptr[i] .. row_ptr[i + 1]`, their sources `col_idx[..]`. Built by [`Graph::from_csr`]
/// or [`Graph::from_coo`], which validate every index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    sources: usize,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    /// The given index of the edge at each CSR position (per-edge data such as the bias comes
    /// in the given order).
    order: Option<Vec<u32>>,
}

impl Graph {
    /// A graph from CSR by destination: `row_ptr` (M + 1 entries, from 0, never decreasing,
    /// ending at E) and `col_idx` (E source indices, each < `sources`). Edges keep this order.
    pub fn from_csr(sources: usize, row_ptr: Vec<u32>, col_idx: Vec<u32>) -> Result<Self> {
        if row_ptr.len() < 2 {
            return Err(Error::Shape(format!(
                "row_ptr needs M + 1 ≥ 2 entries (one destination at least), got {}",
                row_ptr.len()
            )));
        }
        if row_ptr[0] != 0 {
            return Err(Error::Shape(format!(
                "row_ptr must start at 0, got {}",
                row_ptr[0]
            )));
        }
        if let Some(i) = row_ptr.windows(2).position(|w| w[1] < w[0]) {
            return Err(Error::Shape(format!(
                "row_ptr decreases at destination {i}: {} then {}",
                row_ptr[i],
                row_ptr[i + 1]
            )));
        }
        let last = *row_ptr.last().expect("two entries at least") as usize;
        if last != col_idx.len() {
            return Err(Error::Shape(format!(
                "row_ptr ends at {last} but col_idx holds {} edges",
                col_idx.len()
            )));
        }
        Self::check_sources(sources)?;
        if let Some(e) = col_idx.iter().position(|&j| j as usize >= sources) {
            return Err(Error::Argument(format!(
                "edge {e} has source {} but there are {sources} source nodes",
                col_idx[e]
            )));
        }
        Ok(Self {
            sources,
            row_ptr,
            col_idx,
            order: None,
        })
    }

    fn check_sources(sources: usize) -> Result<()> {
        if sources == 0 || sources > u32::MAX as usize {
            return Err(Error::Shape(format!(
                "a graph needs 1 to 2³² − 1 source nodes, got {sources}"
            )));
        }
        Ok(())
    }

    /// A graph from a COO edge list as PyTorch Geometric's `edge_index [2, E]` (flow
    /// source → target): `src[e]` sends to `dst[e]`, each checked against `sources` and
    /// `destinations`. Sorted into CSR by destination on the host with a stable counting sort
    /// (duplicates keep their order); the sort on the device is not done yet.
    pub fn from_coo(sources: usize, destinations: usize, src: &[i64], dst: &[i64]) -> Result<Self> {
        if src.len() != dst.len() {
            return Err(Error::Shape(format!(
                "edge_index rows differ in length: {} sources, {} destinations",
                src.len(),
                dst.len()
            )));
        }
        if destinations == 0 || destinations >= u32::MAX as usize {
            return Err(Error::Shape(format!(
                "a graph needs 1 to 2³² − 2 destination nodes, got {destinations}"
            )));
        }
        Self::check_sources(sources)?;
        if src.len() > u32::MAX as usize {
            return Err(Error::Shape(format!(
                "{} edges; at most 2³² − 1 fit u32 indices",
                src.len()
            )));
        }
        let index = |row: &str, e: usize, x: i64, bound: usize| -> Result<usize> {
            usize::try_from(x)
                .ok()
                .filter(|&x| x < bound)
                .ok_or_else(|| {
                    Error::Argument(format!("edge {e}: {row} index {x} is outside 0..{bound}"))
                })
        };
        let mut row_ptr = vec![0u32; destinations + 1];
        for (e, &d) in dst.iter().enumerate() {
            row_ptr[index("destination", e, d, destinations)? + 1] += 1;
        }
        for i in 0..destinations {
            row_ptr[i + 1] += row_ptr[i];
        }
        let mut next = row_ptr.clone();
        let mut col_idx = vec![0u32; src.len()];
        let mut order = vec![0u32; src.len()];
        for (e, (&s, &d)) in src.iter().zip(dst).enumerate() {
            let s = index("source", e, s, sources)?;
            let at = &mut next[d as usize];
            col_idx[*at as usize] = s as u32;
            order[*at as usize] = e as u32;
            *at += 1;
        }
        Ok(Self {
            sources,
            row_ptr,
            col_idx,
            order: Some(order),
        })
    }

    /// Destination nodes M.
    pub fn destinations(&self) -> usize {
        self.row_ptr.len() - 1
    }

    /// Source nodes N.
    pub fn sources(&self) -> usize {
        self.sources
    }

    /// Edges E.
    pub fn edges(&self) -> usize {
        self.col_idx.len()
    }

    /// The CSR row pointers by destination, `[M + 1]`.
    pub fn row_ptr(&self) -> &[u32] {
        &self.row_ptr
    }

    /// The source of each edge in CSR order, `[E]`.
    pub fn col_idx(&self) -> &[u32] {
        &self.col_idx
    }

    /// The given index of the edge at each CSR position, `[E]` (where per-edge data in CSR
    /// order goes back to in the given order).
    pub fn edge_ids(&self) -> Vec<u32> {
        match &self.order {
            None => (0..self.col_idx.len() as u32).collect(),
            Some(order) => order.clone(),
        }
    }

    /// Per-edge data `[E, width]` in the given edge order, rearranged into CSR order.
    pub fn to_csr_order(&self, data: &[f32], width: usize) -> Vec<f32> {
        match &self.order {
            None => data.to_vec(),
            Some(order) => order
                .iter()
                .flat_map(|&e| &data[e as usize * width..][..width])
                .copied()
                .collect(),
        }
    }
}

/// Options of an edge-list attention ([`Engine::graph_attention`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GraphAttention {
    scale: Option<f32>,
    bias: Option<Vec<f32>>,
    edge_attr: Option<Vec<f32>>,
    mean_heads: bool,
    stats: bool,
    chunk_len: Option<usize>,
}

impl GraphAttention {
    /// Logit scale instead of `1/√d_k`; finite, |scale| ≤ 1e30.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// An additive bias per edge and head, `[E, heads]` in the order the edges were given
    /// (a value ≤ −1e30 or −∞ removes its edge; NaN, +∞ and values over 1e30 are refused).
    pub fn with_bias(mut self, bias: Vec<f32>) -> Self {
        self.bias = Some(bias);
        self
    }

    /// Edge features `[E, heads, d]` (f32, finite, d = d_k = d_v) in the order the edges were
    /// given, added to each edge's key row in its logit and to its value row, as PyG's
    /// `TransformerConv` adds its projected `edge_attr`.
    pub fn with_edge_features(mut self, edge_attr: Vec<f32>) -> Self {
        self.edge_attr = Some(edge_attr);
        self
    }

    /// O averaged over heads, `[1, M, 1, d_v]` (PyG's `concat=False`), instead of the heads
    /// side by side; LSE stays per head.
    pub fn with_heads_averaged(mut self) -> Self {
        self.mean_heads = true;
        self
    }

    /// Also computes the weights' entropy and focus per destination and coverage per source
    /// ([`GraphOutput::stats`]).
    pub fn with_stats(mut self) -> Self {
        self.stats = true;
        self
    }

    /// Cuts every neighbour list into chunks of `len` edges (a positive multiple of 64 that
    /// fits the device's loop cap) merged exactly, instead of the planner's choice: for tests
    /// and benchmarks of the split path. The backward ([`Engine::graph_attention_backward`])
    /// then walks in- and out-lists in passes over chunks of `len` edges too.
    pub fn with_chunk_len(mut self, len: usize) -> Self {
        self.chunk_len = Some(len);
        self
    }

    /// The logit scale for head dim `d_k`.
    pub fn scale_for(&self, d_k: usize) -> f32 {
        self.scale.unwrap_or(1.0 / (d_k as f32).sqrt())
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The edge features, if any.
    pub fn edge_features(&self) -> Option<&[f32]> {
        self.edge_attr.as_deref()
    }

    /// The bias, edge features and head averaging, as the reference takes them.
    pub fn terms(&self) -> GraphTerms<'_> {
        GraphTerms {
            bias: self.bias(),
            edge_attr: self.edge_features(),
            mean_heads: self.mean_heads,
        }
    }
}

/// Results of an edge-list attention on the device.
#[derive(Debug)]
pub struct GraphOutput {
    /// O `[1, M, heads, d_v]` (f32; `[1, M, 1, d_v]` with heads averaged).
    pub o: Tensor,
    /// LSE `[1, heads, M]` (f32; −∞ for a destination with no kept in-edge).
    pub lse: Tensor,
    /// The weights' statistics, where asked for ([`GraphAttention::with_stats`]).
    pub stats: Option<GraphStatsOutput>,
}

/// Statistics of an edge-list attention's weights (f32; 0 for a node without kept edges).
#[derive(Debug)]
pub struct GraphStatsOutput {
    /// Entropy `−Σ P ln P` per destination over its in-edges, `[1, heads, M]`.
    pub entropy: Tensor,
    /// Focus `max P` per destination, `[1, heads, M]`.
    pub focus: Tensor,
    /// Coverage `Σ P` per source over its out-edges, `[1, heads, N]`.
    pub coverage: Tensor,
}

/// [`GraphStatsOutput`] on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphHostStats {
    /// Entropy `[1, heads, M]`.
    pub entropy: Vec<f32>,
    /// Focus `[1, heads, M]`.
    pub focus: Vec<f32>,
    /// Coverage `[1, heads, N]`.
    pub coverage: Vec<f32>,
}

impl GraphStatsOutput {
    /// The statistics on the host.
    pub fn to_host(&self) -> Result<GraphHostStats> {
        Ok(GraphHostStats {
            entropy: self.entropy.to_host()?,
            focus: self.focus.to_host()?,
            coverage: self.coverage.to_host()?,
        })
    }
}

/// [`GraphOutput`] on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphHostOutput {
    /// O `[1, M, heads, d_v]` (`[1, M, 1, d_v]` with heads averaged).
    pub o: Vec<f32>,
    /// LSE `[1, heads, M]`.
    pub lse: Vec<f32>,
    /// The statistics, where asked for.
    pub stats: Option<GraphHostStats>,
}

/// The planner's request for `q`, `k`, `v` over `graph` with `opts`, validated.
pub fn graph_request(
    (q, k, v): ([usize; 4], [usize; 4], [usize; 4]),
    dtype: DType,
    graph: &Graph,
    opts: &GraphAttention,
) -> Result<GraphRequest> {
    let [qb, m, heads, d_k] = q;
    let [kb, n, kv_heads, kd] = k;
    let [vb, vn, vh, d_v] = v;
    if qb != 1 || kb != 1 || vb != 1 {
        return Err(Error::Unsupported(format!(
            "edge-list attention takes batch 1 (a batch of graphs is their disjoint union); \
             got batches q {qb}, k {kb}, v {vb}"
        )));
    }
    for (name, dims) in [("q", q), ("k", k), ("v", v)] {
        if dims.contains(&0) {
            return Err(Error::Shape(format!(
                "{name} has a zero dimension: {dims:?}"
            )));
        }
    }
    if vn != n || vh != kv_heads || kd != d_k {
        return Err(Error::Shape(format!(
            "k {k:?} and v {v:?} disagree with each other or with q {q:?} ([1, N, kv_heads, d])"
        )));
    }
    if heads % kv_heads != 0 {
        return Err(Error::Shape(format!(
            "q heads ({heads}) must be a multiple of k/v heads ({kv_heads})"
        )));
    }
    if graph.destinations() != m || graph.sources() != n {
        return Err(Error::Shape(format!(
            "the graph has {} destinations and {} sources but q has {m} rows and k {n}",
            graph.destinations(),
            graph.sources()
        )));
    }
    for (name, elems) in [("q", m * heads * d_k), ("o", m * heads * d_v)] {
        if elems > u32::MAX as usize {
            return Err(Error::Shape(format!(
                "{name} has {elems} elements; indices are u32"
            )));
        }
    }
    let e = graph.edges();
    if e.checked_mul(heads).is_none_or(|x| x > u32::MAX as usize) {
        return Err(Error::Shape(format!(
            "{e} edges × {heads} heads overflow u32 indices"
        )));
    }
    let scale = opts.scale_for(d_k);
    if !scale.is_finite() || scale.abs() > LOGIT_FACTOR_MAX {
        return Err(Error::Argument(format!(
            "scale is {scale:e}; it must be finite and within ±{LOGIT_FACTOR_MAX:e}"
        )));
    }
    if let Some(b) = &opts.bias {
        if b.len() != e * heads {
            return Err(Error::Length {
                name: "bias",
                shape: vec![e, heads],
                expected: e * heads,
                got: b.len(),
            });
        }
        if let Some(x) = b.iter().find(|x| x.is_nan() || **x > LOGIT_FACTOR_MAX) {
            return Err(Error::Argument(format!(
                "bias holds {x}; each value must be at most {LOGIT_FACTOR_MAX:e} (−∞ or ≤ \
                 {BIAS_REMOVES:e} removes its edge)"
            )));
        }
    }
    if let Some(f) = &opts.edge_attr {
        if d_k != d_v {
            return Err(Error::Shape(format!(
                "edge features are added to keys and values, so d_k ({d_k}) must equal d_v \
                 ({d_v})"
            )));
        }
        if f.len() != e * heads * d_k {
            return Err(Error::Length {
                name: "edge features",
                shape: vec![e, heads, d_k],
                expected: e * heads * d_k,
                got: f.len(),
            });
        }
        if let Some(i) = f.iter().position(|x| !x.is_finite()) {
            return Err(Error::Argument(format!(
                "edge features hold {} at {i}; they must be finite",
                f[i]
            )));
        }
    }
    Ok(GraphRequest {
        dims: GraphDims {
            m,
            n,
            heads,
            kv_heads,
            d_k,
            d_v,
        },
        scale,
        dtype,
        bias: opts.bias.is_some(),
        edge_features: opts.edge_attr.is_some(),
        mean_heads: opts.mean_heads,
        stats: opts.stats,
        chunk_len: opts.chunk_len,
    })
}

/// The graph's index arrays (`index`: binding and words) and the call's per-edge inputs (bias
/// `[E, heads]`, edge features `[E, heads, d_k]`, put in CSR order) uploaded for the bindings
/// `bias` and `edge_attr` name (`heads` and `d_k` of the call); what the call lacks is not
/// uploaded.
pub(crate) fn upload_graph_inputs(
    ctx: &crate::Context,
    graph: &Graph,
    opts: &GraphAttention,
    index: Vec<(BufferId, Vec<u32>)>,
    (bias, edge_attr): (BufferId, BufferId),
    (heads, d_k): (usize, usize),
) -> Result<Vec<(BufferId, Tensor)>> {
    let mut owned = Vec::new();
    for (id, words) in index {
        owned.push((
            id,
            Tensor::upload_u32(ctx, "graph_index", &words, &[words.len()])?,
        ));
    }
    for (id, name, data, width) in [
        (bias, "graph_bias", opts.bias(), heads),
        (
            edge_attr,
            "graph_edge_attr",
            opts.edge_features(),
            heads * d_k,
        ),
    ] {
        let Some(data) = data else { continue };
        let mut csr = graph.to_csr_order(data, width);
        if csr.is_empty() {
            // A binding cannot be empty; no edge reads it.
            csr.push(0.0);
        }
        owned.push((id, Tensor::upload(ctx, name, &csr, &[csr.len()])?));
    }
    Ok(owned)
}

impl Engine {
    /// What [`Engine::graph_attention`] would run: whole lists or chunks, why, and the bytes.
    pub fn plan_graph(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        graph: &Graph,
        opts: &GraphAttention,
    ) -> Result<GraphPlan> {
        same_dtype(q, k, v)?;
        let dims = (dims4(q, "q")?, dims4(k, "k")?, dims4(v, "v")?);
        let req = graph_request(dims, q.dtype(), graph, opts)?;
        GraphPlan::new(&req, (graph.row_ptr(), graph.col_idx()), self.caps())
    }

    /// Validates and plans one edge-list attention (see [`crate::graph`] for its semantics)
    /// and binds it to `q`, `k`, `v`, the graph's indices (uploaded now), the bias, new
    /// outputs and scratch of its own.
    pub fn prepare_graph(
        &self,
        qkv: (&Tensor, &Tensor, &Tensor),
        graph: &Graph,
        opts: &GraphAttention,
    ) -> Result<Prepared<GraphOutput>> {
        self.bind_graph(qkv, graph, opts, Scratch::Own)
    }

    /// Attention of destination nodes `q` over source nodes `k`, `v` along `graph`'s edges
    /// (see [`crate::graph`]): [`Engine::prepare_graph`] and one run, scratch from the pool.
    pub fn graph_attention(
        &self,
        qkv: (&Tensor, &Tensor, &Tensor),
        graph: &Graph,
        opts: &GraphAttention,
    ) -> Result<GraphOutput> {
        self.bind_graph(qkv, graph, opts, Scratch::Pool)?.finish()
    }

    /// [`Engine::graph_attention`] on host slices (f32), dims as the tensors'.
    pub fn graph_attention_host(
        &self,
        q: (&[f32], [usize; 4]),
        k: (&[f32], [usize; 4]),
        v: (&[f32], [usize; 4]),
        graph: &Graph,
        opts: &GraphAttention,
    ) -> Result<GraphHostOutput> {
        let ctx = self.context();
        let q = Tensor::upload(ctx, "q", q.0, &q.1)?;
        let k = Tensor::upload(ctx, "k", k.0, &k.1)?;
        let v = Tensor::upload(ctx, "v", v.0, &v.1)?;
        let out = self.graph_attention((&q, &k, &v), graph, opts)?;
        Ok(GraphHostOutput {
            o: out.o.to_host()?,
            lse: out.lse.to_host()?,
            stats: out.stats.as_ref().map(|s| s.to_host()).transpose()?,
        })
    }

    fn bind_graph(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        graph: &Graph,
        opts: &GraphAttention,
        scratch: Scratch,
    ) -> Result<Prepared<GraphOutput>> {
        let plan = self.plan_graph((q, k, v), graph, opts)?;
        let s = plan.req.dims;
        let ctx = self.context();
        let out = GraphOutput {
            o: Tensor::empty(ctx, "graph_o", &[1, s.m, plan.out_heads(), s.d_v])?,
            lse: Tensor::empty(ctx, "graph_lse", &[1, s.heads, s.m])?,
            stats: match plan.io.stats {
                Some(_) => Some(GraphStatsOutput {
                    entropy: Tensor::empty(ctx, "graph_entropy", &[1, s.heads, s.m])?,
                    focus: Tensor::empty(ctx, "graph_focus", &[1, s.heads, s.m])?,
                    coverage: Tensor::empty(ctx, "graph_coverage", &[1, s.heads, s.n])?,
                }),
                None => None,
            },
        };
        let io = plan.io;
        let owned = upload_graph_inputs(
            ctx,
            graph,
            opts,
            plan.index_inputs(graph.row_ptr(), graph.col_idx()),
            (io.bias, io.edge_attr),
            (s.heads, s.d_k),
        )?;
        let mut tensors: Bindings = HashMap::from([
            (io.q, q),
            (io.k, k),
            (io.v, v),
            (io.o, &out.o),
            (io.lse, &out.lse),
        ]);
        if let (Some(io), Some(t)) = (io.stats, &out.stats) {
            tensors.extend([
                (io.entropy, &t.entropy),
                (io.focus, &t.focus),
                (io.coverage, &t.coverage),
            ]);
        }
        for (id, t) in &owned {
            tensors.insert(*id, t);
        }
        let bound = self.bind_program(plan.program(), &tensors, scratch)?;
        drop(tensors);
        Ok(Prepared::new(ctx, bound, None, out))
    }
}
