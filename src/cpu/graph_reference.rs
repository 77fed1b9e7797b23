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
    // Each destination's in-edges, by edge id, in the given order.
    let mut incoming: Vec<Vec<usize>> = vec![Vec::new(); s.m];
    for (e, &(_, dst)) in edges.iter().enumerate() {
        incoming[dst].push(e);
    }
    for (i, ins) in incoming.iter().enumerate() {
        for h in 0..s.heads {
            let kh = h / group;
            let qrow = &q[(i * s.heads + h) * s.d_k..][..s.d_k];
            // (edge, logit) of each kept edge.
            let logits: Vec<(usize, f64)> = ins
                .iter()
                .filter_map(|&e| {
                    let j = edges[e].0;
                    let b = terms.bias.map_or(0.0, |b| b[e * s.heads + h]);
                    if b <= BIAS_REMOVES {
                        return None;
                    }
                    let krow = &k[(j * s.kv_heads + kh) * s.d_k..][..s.d_k];
                    let dot: f64 = (0..s.d_k)
                        .map(|d| qrow[d].into() * (krow[d].into() + feature(e, h, d)))
                        .sum();
                    Some((e, dot * scale + f64::from(b)))
                })
                .collect();
            if logits.is_empty() {
                continue;
            }
            let max = logits.iter().map(|l| l.1).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|l| (l.1 - max).exp()).sum();
            lse[h * s.m + i] = max + sum.ln();
            let orow = &mut o[(i * s.heads + h) * s.d_v..][..s.d_v];
            for &(e, logit) in &logits {
                let p = (logit - max).exp() / sum;
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
    let group = s.heads / s.kv_heads;
    // Each edge's logit per head, None where its bias removes it.
    let logit = |e: usize, h: usize| -> Option<f64> {
        let (j, i) = edges[e];
        let b = terms.bias.map_or(0.0, |b| b[e * s.heads + h]);
        if b <= BIAS_REMOVES {
            return None;
        }
        let dot: f64 = (0..s.d_k)
            .map(|d| {
                let f = terms
                    .edge_attr
                    .map_or(0.0, |f| f64::from(f[(e * s.heads + h) * s.d_k + d]));
                q[(i * s.heads + h) * s.d_k + d].into()
                    * (k[(j * s.kv_heads + h / group) * s.d_k + d].into() + f)
            })
            .sum();
        Some(dot * scale + f64::from(b))
    };
    let mut out = GraphStatsReference {
        entropy: vec![0.0; s.heads * s.m],
        focus: vec![0.0; s.heads * s.m],
        coverage: vec![0.0; s.heads * s.n],
    };
    for h in 0..s.heads {
        let logits: Vec<Option<f64>> = (0..edges.len()).map(|e| logit(e, h)).collect();
        let mut max = vec![f64::NEG_INFINITY; s.m];
        for (e, l) in logits.iter().enumerate() {
            if let Some(l) = l {
                max[edges[e].1] = max[edges[e].1].max(*l);
            }
        }
        let mut sum = vec![0.0; s.m];
        for (e, l) in logits.iter().enumerate() {
            if let Some(l) = l {
                sum[edges[e].1] += (l - max[edges[e].1]).exp();
            }
        }
        for (e, l) in logits.iter().enumerate() {
            let Some(l) = l else { continue };
            let (j, i) = edges[e];
            let p = (l - max[i]).exp() / sum[i];
            if p > 0.0 {
                out.entropy[h * s.m + i] -= p * p.ln();
            }
            out.focus[h * s.m + i] = out.focus[h * s.m + i].max(p);
            out.coverage[h * s.n + j] += p;
        }
    }
    out
}
