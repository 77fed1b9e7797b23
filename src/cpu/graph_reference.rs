//! The reference of edge-list attention ([`crate::graph`]): naive, f64 accumulation,
//! max-subtracted softmax, built from the edge list as given (pairs of source and destination
//! in the caller's order), sharing nothing with the kernels, their CSR or their chunking.

use crate::mask::BIAS_REMOVES;

/// The sizes of an edge-list attention: M destinations, N sources, heads and head dims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphDims {
    /// Destination nodes (query rows).
    pub m: usize,
    /// Source nodes (key/value rows).
    pub n: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Query/key head dim.
    pub d_k: usize,
    /// Value head dim.
    pub d_v: usize,
}

/// What a call adds to plain attention over the edges.
#[derive(Clone, Copy, Debug, Default)]
pub struct GraphTerms<'a> {
    /// Additive logit bias `[E, heads]` in the order of the edges; a value ≤ [`BIAS_REMOVES`]
    /// removes the edge.
    pub bias: Option<&'a [f32]>,
    /// Edge features `[E, heads, d]` (d = d_k = d_v) in the order of the edges, added to the
    /// edge's key row in its logit and to its value row (PyG `TransformerConv`'s `edge_attr`).
    pub edge_attr: Option<&'a [f32]>,
    /// O averaged over heads (`[M, 1, d_v]`, PyG's `concat=False`) instead of side by side.
    pub mean_heads: bool,
}

/// Reference results in f64: O `[M, heads, d_v]` (`[M, 1, d_v]` with heads averaged), LSE
/// `[heads, M]` (−∞ and O = 0 for a destination with no kept in-edge).
#[derive(Clone, Debug)]
pub struct GraphReference {
    /// O.
    pub o: Vec<f64>,
    /// LSE.
    pub lse: Vec<f64>,
}

/// The logit of edge e (in the order of `edges`) for head h, `scale·q_i·(k_j + f_e) + bias`
/// in f64; `None` where its bias removes the edge.
pub fn edge_logit<T: Copy + Into<f64>>(
    s: GraphDims,
    (q, k): (&[T], &[T]),
    edges: &[(usize, usize)],
    terms: GraphTerms,
    scale: f64,
    (e, h): (usize, usize),
) -> Option<f64> {
    let (j, i) = edges[e];
    let b = terms.bias.map_or(0.0, |b| b[e * s.heads + h]);
    if b <= BIAS_REMOVES {
        return None;
    }
    let (qrow, kh) = ((i * s.heads + h) * s.d_k, h / (s.heads / s.kv_heads));
    let krow = (j * s.kv_heads + kh) * s.d_k;
    let dot: f64 = (0..s.d_k)
        .map(|d| {
            let f = terms
                .edge_attr
                .map_or(0.0, |f| f64::from(f[(e * s.heads + h) * s.d_k + d]));
            q[qrow + d].into() * (k[krow + d].into() + f)
        })
        .sum();
    Some(dot * scale + f64::from(b))
}

/// The softmax of one destination's kept in-edges `ins` (edge ids) for head h: each kept
/// edge's weight `(edge, P)` and the LSE; `None` where no edge is kept.
pub fn destination_weights<T: Copy + Into<f64>>(
    s: GraphDims,
    qk: (&[T], &[T]),
    edges: &[(usize, usize)],
    terms: GraphTerms,
    scale: f64,
    (ins, h): (&[usize], usize),
) -> Option<(Vec<(usize, f64)>, f64)> {
    let logits: Vec<(usize, f64)> = ins
        .iter()
        .filter_map(|&e| edge_logit(s, qk, edges, terms, scale, (e, h)).map(|l| (e, l)))
        .collect();
    if logits.is_empty() {
        return None;
    }
    let max = logits.iter().map(|l| l.1).fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|l| (l.1 - max).exp()).sum();
    let weights = logits.iter().map(|&(e, l)| (e, (l - max).exp() / sum));
    Some((weights.collect(), max + sum.ln()))
}

/// Each destination's in-edges, by edge id, in the given order.
pub fn incoming(m: usize, edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); m];
    for (e, &(_, dst)) in edges.iter().enumerate() {
        out[dst].push(e);
    }
    out
}

/// Attention of `q [M, heads, d_k]` over `k [N, kv_heads, d_k]`, `v [N, kv_heads, d_v]` along
/// `edges` (`(source, destination)` pairs; duplicates count twice, self-loops as any edge),
/// with logit `scale·q_i·(k_j + f_e)` plus `bias [E, heads]` and value `v_j + f_e`, where
/// `terms` gives them (f = 0 otherwise).
pub fn graph_attention<T: Copy + Into<f64>>(
    s: GraphDims,
    (q, k, v): (&[T], &[T], &[T]),
    edges: &[(usize, usize)],
    terms: GraphTerms,
    scale: f64,
) -> GraphReference {
    let feature = |e: usize, h: usize, d: usize| {
        terms
            .edge_attr
            .map_or(0.0, |f| f64::from(f[(e * s.heads + h) * s.d_k + d]))
    };
    let group = s.heads / s.kv_heads;
    let mut o = vec![0.0; s.m * s.heads * s.d_v];
    let mut lse = vec![f64::NEG_INFINITY; s.heads * s.m];
    for (i, ins) in incoming(s.m, edges).iter().enumerate() {
        for h in 0..s.heads {
            let kh = h / group;
            let Some((weights, l)) = destination_weights(s, (q, k), edges, terms, scale, (ins, h))
            else {
                continue;
            };
            lse[h * s.m + i] = l;
            let orow = &mut o[(i * s.heads + h) * s.d_v..][..s.d_v];
            for &(e, p) in &weights {
                let vrow = &v[(edges[e].0 * s.kv_heads + kh) * s.d_v..][..s.d_v];
                for (d, acc) in orow.iter_mut().enumerate() {
                    *acc += p * (vrow[d].into() + feature(e, h, d));
                }
            }
        }
    }
    if terms.mean_heads {
        o = o
            .chunks(s.heads * s.d_v)
            .flat_map(|row| {
                (0..s.d_v).map(move |d| {
                    (0..s.heads).map(|h| row[h * s.d_v + d]).sum::<f64>() / s.heads as f64
                })
            })
            .collect();
    }
    GraphReference { o, lse }
}

/// Reference statistics of the weights in f64: entropy `−Σ P ln P` and focus `max P` per
/// destination `[heads, M]` over its in-edges, coverage `Σ P` per source `[heads, N]` over its
/// out-edges (0 where a node has no kept edge).
#[derive(Clone, Debug)]
pub struct GraphStatsReference {
    /// Entropy per destination.
    pub entropy: Vec<f64>,
    /// Focus per destination.
    pub focus: Vec<f64>,
    /// Coverage per source.
    pub coverage: Vec<f64>,
}

/// The weights of [`graph_attention`]'s call, reduced per destination and per source.
pub fn graph_stats<T: Copy + Into<f64>>(
    s: GraphDims,
    (q, k): (&[T], &[T]),
    edges: &[(usize, usize)],
    terms: GraphTerms,
    scale: f64,
) -> GraphStatsReference {
    let mut out = GraphStatsReference {
        entropy: vec![0.0; s.heads * s.m],
        focus: vec![0.0; s.heads * s.m],
        coverage: vec![0.0; s.heads * s.n],
    };
    for (i, ins) in incoming(s.m, edges).iter().enumerate() {
        for h in 0..s.heads {
            let Some((weights, _)) = destination_weights(s, (q, k), edges, terms, scale, (ins, h))
            else {
                continue;
            };
            for (e, p) in weights {
                if p > 0.0 {
                    out.entropy[h * s.m + i] -= p * p.ln();
                }
                out.focus[h * s.m + i] = out.focus[h * s.m + i].max(p);
                out.coverage[h * s.n + edges[e].0] += p;
            }
        }
    }
    out
}
