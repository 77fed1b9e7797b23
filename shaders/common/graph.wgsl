// What the edge-list attention kernels share (graph_attention, graph_merge; semantics:
// src/graph.rs). Mirrors `GraphParams` in src/params.rs; tests/shaders.rs checks size and
// offsets.
struct GraphParams {
    m: u32,
    n: u32,
    heads: u32,
    kv_heads: u32,
    d_k: u32,
    d_v: u32,
    scale: f32,
    flags: u32,
    items: u32,
    max_len: u32,
    edges: u32,
    offset: u32,
}

// flags bit (src/params.rs graph_flags::BIAS): a per-edge, per-head bias [E, heads] is bound.
const GRAPH_BIAS: u32 = 1u;
// flags bit (graph_flags::EDGE_FEATURES): edge features [E, heads, d] (d = d_k = d_v) are
// bound and added to each edge's key and value rows.
const GRAPH_EDGE_FEATURES: u32 = 2u;
// A bias at or below this removes its edge (src/mask.rs BIAS_REMOVES, as on the dense paths).
const GRAPH_BIAS_REMOVES: f32 = -1.0e30;
// flags bit (graph_flags::MEAN_HEADS, the backward's): O was averaged over heads, so dO is
// [M, 1, d_v], each head's share dO / heads, and graph_grad_q's delta passes sum D.
const GRAPH_MEAN_HEADS: u32 = 4u;
// flags bit (graph_flags::ACCUMULATE, the backward's): a pass after the first over chunks of
// long lists adds its sums to what the earlier passes wrote.
const GRAPH_ACCUMULATE: u32 = 8u;
