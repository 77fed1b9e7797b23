//! The reference backward of edge-list attention ([`crate::graph`]): naive, f64, from the edge
//! list as given, sharing nothing with the kernels (with the forward reference: its types and
//! its edge logit). The gradients the
//! device backward must match (dQ per destination; dK, dV per source; d edge features and d
//! bias per edge), checked here against finite differences of the forward reference.

use crate::cpu::graph_reference::{destination_weights, incoming, GraphDims, GraphTerms};

/// Gradients in f64, in the inputs' layouts and edge order.
#[derive(Clone, Debug)]
pub struct GraphGrads {
    /// dQ `[M, heads, d_k]`.
    pub dq: Vec<f64>,
    /// dK `[N, kv_heads, d_k]`.
    pub dk: Vec<f64>,
    /// dV `[N, kv_heads, d_v]`.
    pub dv: Vec<f64>,
    /// d edge features `[E, heads, d]`, where the call has them.
    pub d_edge_attr: Option<Vec<f64>>,
    /// d bias `[E, heads]`, where the call has one (0 for a removed edge).
    pub d_bias: Option<Vec<f64>>,
}

/// The gradients of `Σ dO ∘ O` for the call of [`crate::cpu::graph_reference::graph_attention`]
/// with the same arguments, `d_o` in O's layout (`[M, 1, d_v]` with heads averaged).
///
/// With `P_e` edge e's weight in its destination i's softmax (head h), `u_e = v_j + f_e` its
/// value row and `D_i = Σ_e P_e·(dO_i·u_e)`: `dS_e = P_e·(dO_i·u_e − D_i)`, `dQ_i = scale·Σ_e
/// dS_e·(k_j + f_e)`, `dK_j = scale·Σ_e dS_e·q_i`, `dV_j = Σ_e P_e·dO_i`, `df_e = scale·dS_e·q_i
/// + P_e·dO_i`, `dbias_e = dS_e`; K/V heads sum over their query heads.
pub fn graph_attention_backward<T: Copy + Into<f64>>(
    s: GraphDims,
    (q, k, v): (&[T], &[T], &[T]),
    edges: &[(usize, usize)],
    terms: GraphTerms,
    scale: f64,
    d_o: &[f64],
) -> GraphGrads {
    let group = s.heads / s.kv_heads;
    let d = s.d_k;
    let f = |e: usize, h: usize, x: usize| {
        terms
            .edge_attr
            .map_or(0.0, |f| f64::from(f[(e * s.heads + h) * d + x]))
    };
    let mut g = GraphGrads {
        dq: vec![0.0; s.m * s.heads * s.d_k],
        dk: vec![0.0; s.n * s.kv_heads * s.d_k],
        dv: vec![0.0; s.n * s.kv_heads * s.d_v],
        d_edge_attr: terms
            .edge_attr
            .map(|_| vec![0.0; edges.len() * s.heads * d]),
        d_bias: terms.bias.map(|_| vec![0.0; edges.len() * s.heads]),
    };
    // dO of destination i, head h (a share of the mean's where heads are averaged).
    let grad_out = |i: usize, h: usize, x: usize| {
        if terms.mean_heads {
            d_o[i * s.d_v + x] / s.heads as f64
        } else {
            d_o[(i * s.heads + h) * s.d_v + x]
        }
    };
    for (i, ins) in incoming(s.m, edges).iter().enumerate() {
        for h in 0..s.heads {
            let kh = h / group;
            let qi = |x: usize| q[(i * s.heads + h) * s.d_k + x].into();
            let kj = |j: usize, x: usize| k[(j * s.kv_heads + kh) * s.d_k + x].into();
            let vj = |j: usize, x: usize| v[(j * s.kv_heads + kh) * s.d_v + x].into();
            let Some((weights, _)) = destination_weights(s, (q, k), edges, terms, scale, (ins, h))
            else {
                continue;
            };
            // (edge, P, dO·u) of each kept edge, and D = Σ P·(dO·u).
            let rows: Vec<(usize, f64, f64)> = weights
                .iter()
                .map(|&(e, p)| {
                    let j = edges[e].0;
                    let dp: f64 = (0..s.d_v)
                        .map(|x| grad_out(i, h, x) * (vj(j, x) + f(e, h, x)))
                        .sum();
                    (e, p, dp)
                })
                .collect();
            let big_d: f64 = rows.iter().map(|r| r.1 * r.2).sum();
            for &(e, p, dp) in &rows {
                let j = edges[e].0;
                let ds = p * (dp - big_d);
                for x in 0..s.d_k {
                    g.dq[(i * s.heads + h) * s.d_k + x] += scale * ds * (kj(j, x) + f(e, h, x));
                    g.dk[(j * s.kv_heads + kh) * s.d_k + x] += scale * ds * qi(x);
                }
                for x in 0..s.d_v {
                    g.dv[(j * s.kv_heads + kh) * s.d_v + x] += p * grad_out(i, h, x);
                }
                if let Some(df) = &mut g.d_edge_attr {
                    for x in 0..d {
                        df[(e * s.heads + h) * d + x] += scale * ds * qi(x) + p * grad_out(i, h, x);
                    }
                }
                if let Some(db) = &mut g.d_bias {
                    db[e * s.heads + h] += ds;
                }
            }
        }
    }
    g
}
