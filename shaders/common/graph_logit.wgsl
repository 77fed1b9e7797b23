// The logit of one edge as graph_attention and graph_stats compute it (CPU twin:
// src/cpu/graph_attention.rs edge_logit; semantics: src/graph.rs). Needs the including
// shader's `g: GraphParams`, `bias`, `edge_attr` and its loads `load4_q`, `load4_k`,
// `load4_edge_attr`.

// scale·q·(k + f[e, h]) (+ bias[e, h]) for the Q row at q_base and the K row at k_base of
// edge e (CSR position), head h; MASKED where the bias removes the edge.
fn edge_logit(q_base: u32, k_base: u32, e: u32, h: u32) -> f32 {
    let f_base = (e * g.heads + h) * g.d_k;
    var x = 0.0;
    for (var d = 0u; d < g.d_k; d += 4u) {
        var key = load4_k(k_base, d, g.d_k);
        if (g.flags & GRAPH_EDGE_FEATURES) != 0u {
            key += load4_edge_attr(f_base, d, g.d_k);
        }
        x += dot(load4_q(q_base, d, g.d_k), key);
    }
    var s = x * g.scale;
    if (g.flags & GRAPH_BIAS) != 0u {
        let b = bias[e * g.heads + h];
        s = select(s + b, MASKED, b <= GRAPH_BIAS_REMOVES);
    }
    return s;
}
