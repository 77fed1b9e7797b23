//! Edge-list attention (`xattn::graph`): against the f64 reference built from the edge list,
//! on random graphs with isolated nodes, hubs, self-loops, duplicate edges and bipartite node
//! sets; whole and split neighbour lists; edge features and heads averaged (PyG's
//! `TransformerConv` `edge_attr` and `concat=False`) in every dtype; the dense-mask
//! equivalence; the CPU executor; typed errors for bad input.

mod common;

use common::{assert_close, engine, poison, random, CAPS};
use rand::{Rng, SeedableRng};
use xattn::cpu::budget::{graph_budget, graph_stats_budget};
use xattn::cpu::graph_reference::{
    graph_attention as reference, graph_stats, GraphDims, GraphReference, GraphStatsReference,
    GraphTerms,
};
use xattn::cpu::program::{floats, run, words, HostBuffers};
use xattn::graph::graph_request;
use xattn::plan::graph::{GraphPlan, GraphSplit};
use xattn::{Attention, DType, DeviceCaps, Engine, Error, Graph, GraphAttention, Tensor};

/// A test graph: its edges as given, as `(source, destination)`.
struct Case {
    dims: GraphDims,
    edges: Vec<(usize, usize)>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn dims(m: usize, n: usize, heads: usize, kv_heads: usize, d_k: usize, d_v: usize) -> GraphDims {
    GraphDims {
        m,
        n,
        heads,
        kv_heads,
        d_k,
        d_v,
    }
}

impl Case {
    /// Seeded inputs for `edges`.
    fn new(dims: GraphDims, edges: Vec<(usize, usize)>, seed: u64) -> Self {
        Self {
            q: random(dims.m * dims.heads * dims.d_k, 1.0, seed),
            k: random(dims.n * dims.kv_heads * dims.d_k, 1.0, seed + 1),
            v: random(dims.n * dims.kv_heads * dims.d_v, 1.0, seed + 2),
            dims,
            edges,
        }
    }

    /// `e` random edges into the first `reach` destinations (the rest isolated), with
    /// duplicates of some and, where the node sets coincide, self-loops.
    fn random(dims: GraphDims, e: usize, reach: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut edges: Vec<(usize, usize)> = (0..e)
            .map(|_| (rng.random_range(0..dims.n), rng.random_range(0..reach)))
            .collect();
        for i in 0..e / 10 {
            edges.push(edges[i * 7 % e]);
        }
        if dims.m == dims.n {
            edges.extend((0..reach).step_by(3).map(|i| (i, i)));
        }
        Self::new(dims, edges, seed + 10)
    }

    fn graph(&self) -> Graph {
        let (src, dst): (Vec<i64>, Vec<i64>) = self
            .edges
            .iter()
            .map(|&(s, d)| (s as i64, d as i64))
            .unzip();
        Graph::from_coo(self.dims.n, self.dims.m, &src, &dst).unwrap()
    }

    /// Seeded edge features `[E, heads, d_k]` for this case's edges.
    fn edge_features(&self, seed: u64) -> Vec<f32> {
        random(
            self.edges.len() * self.dims.heads * self.dims.d_k,
            0.5,
            seed,
        )
    }

    /// Q, K and V rounded to `dtype`, so that the reference sees what the device reads.
    fn rounded_to(mut self, dtype: DType) -> Self {
        for x in [&mut self.q, &mut self.k, &mut self.v] {
            *x = dtype.decode(&dtype.encode(x), x.len());
        }
        self
    }

    fn stats_reference(&self, opts: &GraphAttention) -> GraphStatsReference {
        let scale = f64::from(opts.scale_for(self.dims.d_k));
        graph_stats(
            self.dims,
            (&self.q, &self.k),
            &self.edges,
            opts.terms(),
            scale,
        )
    }

    /// Budgets of entropy, focus and coverage.
    fn stats_budget(&self, opts: &GraphAttention) -> (f64, f64, f64) {
        let mut out = vec![0usize; self.dims.n];
        for &(src, _) in &self.edges {
            out[src] += 1;
        }
        let max_out = out.into_iter().max().unwrap_or(0);
        graph_stats_budget(self.budget(opts).1, self.max_degree(), max_out)
    }

    /// Checks the statistics `got` (entropy, focus, coverage) against the reference.
    fn check_stats(&self, what: &str, opts: &GraphAttention, got: [&[f32]; 3]) {
        let r = self.stats_reference(opts);
        let (te, tf, tc) = self.stats_budget(opts);
        assert_close(&format!("{what} entropy"), got[0], &r.entropy, te);
        assert_close(&format!("{what} focus"), got[1], &r.focus, tf);
        assert_close(&format!("{what} coverage"), got[2], &r.coverage, tc);
    }

    fn max_degree(&self) -> usize {
        let mut deg = vec![0usize; self.dims.m];
        for &(_, d) in &self.edges {
            deg[d] += 1;
        }
        deg.into_iter().max().unwrap_or(0)
    }

    fn qkv_dims(&self) -> [[usize; 4]; 3] {
        let s = self.dims;
        [
            [1, s.m, s.heads, s.d_k],
            [1, s.n, s.kv_heads, s.d_k],
            [1, s.n, s.kv_heads, s.d_v],
        ]
    }

    fn reference(&self, opts: &GraphAttention) -> GraphReference {
        let scale = f64::from(opts.scale_for(self.dims.d_k));
        reference(
            self.dims,
            (&self.q, &self.k, &self.v),
            &self.edges,
            opts.terms(),
            scale,
        )
    }

    fn budget(&self, opts: &GraphAttention) -> (f64, f64) {
        graph_budget(
            (opts.scale_for(self.dims.d_k), self.dims.d_k),
            (&self.q, &self.k, &self.v),
            opts.terms(),
            self.max_degree(),
        )
    }
}

/// Runs on the device with O and LSE poisoned first; returns the plan, O and LSE.
fn run_gpu(
    engine: &Engine,
    c: &Case,
    opts: &GraphAttention,
    dtype: DType,
) -> xattn::Result<(GraphPlan, Vec<f32>, Vec<f32>)> {
    let [qd, kd, vd] = c.qkv_dims();
    let up = |x: &[f32], d: [usize; 4]| Tensor::upload_as(engine.context(), "in", x, &d, dtype);
    let (q, k, v) = (up(&c.q, qd)?, up(&c.k, kd)?, up(&c.v, vd)?);
    let graph = c.graph();
    let plan = engine.plan_graph((&q, &k, &v), &graph, opts)?;
    let call = engine.prepare_graph((&q, &k, &v), &graph, opts)?;
    poison(&call.output().o)?;
    poison(&call.output().lse)?;
    call.run()?;
    let out = call.into_output();
    Ok((plan, out.o.to_host()?, out.lse.to_host()?))
}

/// Runs `c` on the device and checks O and LSE against the reference; returns the plan.
fn check(engine: &Engine, what: &str, c: &Case, opts: &GraphAttention) -> GraphPlan {
    check_as(engine, what, c, opts, DType::F32)
}

/// [`check`] with Q, K, V uploaded as `dtype` (`c`'s values must be exact in it).
fn check_as(
    engine: &Engine,
    what: &str,
    c: &Case,
    opts: &GraphAttention,
    dtype: DType,
) -> GraphPlan {
    let (plan, o, lse) = run_gpu(engine, c, opts, dtype).unwrap();
    let r = c.reference(opts);
    let (tol_o, tol_lse) = c.budget(opts);
    assert_close(&format!("{what} O"), &o, &r.o, tol_o);
    assert_close(&format!("{what} LSE"), &lse, &r.lse, tol_lse);
    plan
}

#[test]
fn random_graphs_match_the_reference() {
    let Some(engine) = engine() else { return };
    let cases = [
        // One node set: self-loops, duplicates, a third of the nodes isolated.
        (
            "square",
            Case::random(dims(37, 37, 2, 2, 16, 16), 300, 25, 1),
        ),
        // Bipartite, GQA, d_k ≠ d_v.
        (
            "bipartite",
            Case::random(dims(50, 23, 4, 2, 8, 12), 400, 50, 2),
        ),
        // Head dims 1 and 3, N = 1.
        ("tiny", Case::random(dims(5, 1, 1, 1, 1, 3), 9, 4, 3)),
        // Wide values (four dims per invocation), odd d_k, M = 1.
        ("wide", Case::random(dims(1, 90, 2, 1, 3, 200), 150, 1, 4)),
    ];
    for (what, c) in &cases {
        let plan = check(engine, what, c, &GraphAttention::default());
        assert_eq!(plan.split, GraphSplit::Whole, "{what}: {plan}");
    }
}

#[test]
fn forced_chunks_match_the_reference() {
    let Some(engine) = engine() else { return };
    // Lists of up to ~300 edges in chunks of 64, merged; isolated destinations included.
    let c = Case::random(dims(40, 40, 2, 1, 8, 8), 3000, 30, 5);
    let opts = GraphAttention::default().with_chunk_len(64);
    let plan = check(engine, "chunks of 64", &c, &opts);
    let GraphSplit::Chunks { hubs, .. } = plan.split else {
        panic!("{plan}")
    };
    assert!(hubs > 20, "{plan}");
}

#[test]
fn a_hub_is_split_and_merged() {
    let Some(engine) = engine() else { return };
    // Destination 0 has 70,000 in-edges: more than one workgroup may walk under llvmpipe's
    // loop cap (and over the balance threshold anywhere); the others a few each.
    let d = dims(300, 2000, 2, 2, 8, 8);
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut edges: Vec<(usize, usize)> =
        (0..70_000).map(|_| (rng.random_range(0..d.n), 0)).collect();
    edges.extend((0..3000).map(|_| (rng.random_range(0..d.n), rng.random_range(1..250))));
    let c = Case::new(d, edges, 60);
    let plan = check(engine, "hub", &c, &GraphAttention::default());
    let GraphSplit::Chunks {
        hubs, max_chunks, ..
    } = plan.split
    else {
        panic!("a 70,000-edge hub must be split: {plan}")
    };
    assert!(hubs >= 1 && max_chunks >= 3, "{plan}");
    let text = plan.to_string();
    assert!(text.contains("graph_merge"), "{text}");
}

#[test]
fn a_small_loop_cap_splits_lists() {
    let Some(engine) = engine() else { return };
    // A cap of 1000 iterations leaves 7 tiles (448 edges) per workgroup at d_k = 16: each
    // tile of 64 edges costs 1 + 5 (d_k in vec4s, exit test included) + 2 × 65 iterations.
    let caps = DeviceCaps {
        loop_cap: Some(1000),
        ..*engine.caps()
    };
    let small = Engine::with_caps(engine.context(), caps);
    let c = Case::random(dims(20, 60, 1, 1, 16, 5), 4000, 6, 7);
    let plan = check(&small, "capped", &c, &GraphAttention::default());
    let GraphSplit::Chunks { chunk_len, .. } = plan.split else {
        panic!("{plan}")
    };
    assert_eq!(chunk_len, 448, "{plan}");
}

#[test]
fn bias_shifts_and_removes_edges() {
    let Some(engine) = engine() else { return };
    let c = Case::random(dims(30, 30, 2, 2, 8, 8), 200, 30, 8);
    let e = c.edges.len();
    let mut bias = random(e * 2, 2.0, 80);
    // Every edge into destination 3 removed (−∞ or ≤ −1e30): it outputs 0 and LSE −∞.
    for (i, &(_, d)) in c.edges.iter().enumerate() {
        if d == 3 {
            bias[2 * i] = f32::NEG_INFINITY;
            bias[2 * i + 1] = -2e30;
        }
    }
    bias[1] = f32::NEG_INFINITY;
    let opts = GraphAttention::default().with_bias(bias);
    let r = c.reference(&opts);
    assert_eq!(r.lse[3], f64::NEG_INFINITY);
    check(engine, "bias", &c, &opts);
    check(engine, "bias, chunks", &c, &opts.clone().with_chunk_len(64));
}

#[test]
fn edge_features_and_averaged_heads_match_the_reference() {
    let Some(engine) = engine() else { return };
    let cases = [
        // Self-loops, duplicates, a third of the destinations isolated.
        (
            "square",
            Case::random(dims(37, 37, 2, 2, 16, 16), 300, 25, 13),
        ),
        // Bipartite, GQA (a query head's features added to its shared K/V head), odd d.
        (
            "bipartite",
            Case::random(dims(50, 23, 4, 2, 7, 7), 400, 50, 14),
        ),
        // d = 1, N = 1.
        ("tiny", Case::random(dims(5, 1, 3, 1, 1, 1), 9, 4, 15)),
        // Four value dims per invocation, M = 1.
        (
            "wide",
            Case::random(dims(1, 90, 2, 1, 200, 200), 150, 1, 16),
        ),
    ];
    for (what, c) in &cases {
        let features = GraphAttention::default().with_edge_features(c.edge_features(130));
        let bias = random(c.edges.len() * c.dims.heads, 1.0, 131);
        for (how, opts) in [
            ("features", features.clone()),
            ("features, mean", features.clone().with_heads_averaged()),
            ("mean", GraphAttention::default().with_heads_averaged()),
            (
                "features, bias, mean, chunks",
                features
                    .with_bias(bias)
                    .with_heads_averaged()
                    .with_chunk_len(64),
            ),
        ] {
            let plan = check(engine, &format!("{what}, {how}"), c, &opts);
            assert!(plan.to_string().contains("with "), "{plan}");
        }
    }
}

#[test]
fn a_hub_with_edge_features_is_split_and_merged() {
    let Some(engine) = engine() else { return };
    // Destination 0 has 5,000 in-edges among lists of about 10: split for balance.
    let d = dims(200, 300, 2, 2, 8, 8);
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut edges: Vec<(usize, usize)> = (0..5000).map(|_| (rng.random_range(0..d.n), 0)).collect();
    edges.extend((0..2000).map(|_| (rng.random_range(0..d.n), rng.random_range(1..190))));
    let c = Case::new(d, edges, 170);
    let opts = GraphAttention::default()
        .with_edge_features(c.edge_features(171))
        .with_heads_averaged();
    let plan = check(engine, "hub, features, mean", &c, &opts);
    assert!(
        matches!(plan.split, GraphSplit::Chunks { hubs: 1.., .. }),
        "{plan}"
    );
}

#[test]
fn every_dtype_with_edge_features_and_averaged_heads() {
    let Some(engine) = engine() else { return };
    for dtype in DType::ALL {
        let c = Case::random(dims(25, 31, 2, 2, 12, 12), 300, 20, 18).rounded_to(dtype);
        let opts = GraphAttention::default().with_edge_features(c.edge_features(180));
        for opts in [opts.clone(), opts.with_heads_averaged()] {
            check_as(engine, &format!("{dtype:?}"), &c, &opts, dtype);
        }
    }
}

#[test]
fn an_isolated_destination_outputs_zero_with_averaged_heads() {
    let Some(engine) = engine() else { return };
    // Destinations 1 and 3 have no in-edge; edge features must not leak into them.
    let c = Case::new(
        dims(4, 3, 2, 1, 4, 4),
        vec![(0, 0), (2, 0), (1, 2), (2, 2)],
        19,
    );
    let opts = GraphAttention::default()
        .with_edge_features(c.edge_features(190))
        .with_heads_averaged();
    let (_, o, lse) = run_gpu(engine, &c, &opts, DType::F32).unwrap();
    for i in [1, 3] {
        assert_eq!(&o[i * 4..][..4], &[0.0; 4], "O of destination {i}");
        assert_eq!(lse[i], f32::NEG_INFINITY, "LSE of destination {i}, head 0");
        assert_eq!(
            lse[4 + i],
            f32::NEG_INFINITY,
            "LSE of destination {i}, head 1"
        );
    }
}

#[test]
fn statistics_match_the_reference() {
    let Some(engine) = engine() else { return };
    let square = Case::random(dims(37, 37, 2, 2, 16, 16), 300, 25, 20);
    let bipartite = Case::random(dims(50, 23, 4, 2, 7, 7), 400, 50, 21);
    let features = bipartite.edge_features(210);
    let mut bias = random(bipartite.edges.len() * 4, 1.0, 211);
    bias[5] = f32::NEG_INFINITY;
    // A source of 3,000 out-edges (several lane steps) into 100 destinations.
    let d = dims(100, 40, 1, 1, 8, 8);
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let mut edges: Vec<(usize, usize)> = (0..3000).map(|_| (0, rng.random_range(0..100))).collect();
    edges.extend((0..500).map(|_| (rng.random_range(1..40), rng.random_range(0..90))));
    let fan_out = Case::new(d, edges, 220);
    let stats = GraphAttention::default().with_stats();
    for (what, c, opts) in [
        ("square", &square, stats.clone()),
        (
            "bipartite, features, bias, chunks",
            &bipartite,
            stats
                .clone()
                .with_edge_features(features)
                .with_bias(bias)
                .with_heads_averaged()
                .with_chunk_len(64),
        ),
        ("fan-out", &fan_out, stats.clone()),
    ] {
        let [qd, kd, vd] = c.qkv_dims();
        let up = |x: &[f32], d: [usize; 4]| engine.upload(x, &d).unwrap();
        let (q, k, v) = (up(&c.q, qd), up(&c.k, kd), up(&c.v, vd));
        let call = engine
            .prepare_graph((&q, &k, &v), &c.graph(), &opts)
            .unwrap();
        let st = call.output().stats.as_ref().expect("asked for");
        for t in [&st.entropy, &st.focus, &st.coverage] {
            poison(t).unwrap();
        }
        call.run().unwrap();
        let got = call.into_output().stats.unwrap().to_host().unwrap();
        c.check_stats(what, &opts, [&got.entropy, &got.focus, &got.coverage]);
        if what == "square" {
            // Destinations 25.. have no in-edge: entropy and focus exactly 0, not poison.
            for i in 25..37 {
                assert_eq!(
                    (got.entropy[i], got.focus[i]),
                    (0.0, 0.0),
                    "destination {i}"
                );
            }
        }
    }
}

#[test]
fn the_dense_masked_path_agrees() {
    let Some(engine) = engine() else { return };
    // Unique edges (a mask cannot hold duplicates), isolated destinations included.
    let mut c = Case::random(dims(45, 33, 2, 1, 16, 16), 500, 40, 9);
    c.edges.sort_unstable();
    c.edges.dedup();
    let s = c.dims;
    let mut mask = vec![false; s.m * s.n];
    for &(src, dst) in &c.edges {
        mask[dst * s.n + src] = true;
    }
    let [qd, kd, vd] = c.qkv_dims();
    let dense = engine
        .attention_host(
            (&c.q, qd),
            (&c.k, kd),
            (&c.v, vd),
            &Attention::default().with_mask([1, 1, s.m, s.n], mask),
        )
        .unwrap();
    let (_, o, lse) = run_gpu(engine, &c, &GraphAttention::default(), DType::F32).unwrap();
    let (tol_o, tol_lse) = c.budget(&GraphAttention::default());
    let to64 = |x: &[f32]| x.iter().map(|&y| f64::from(y)).collect::<Vec<f64>>();
    // Each within budget of the reference, so within twice it of each other.
    assert_close("graph vs dense O", &o, &to64(&dense.o), 2.0 * tol_o);
    assert_close("graph vs dense LSE", &lse, &to64(&dense.lse), 2.0 * tol_lse);
}

#[test]
fn half_inputs_accumulate_in_f32() {
    let Some(engine) = engine() else { return };
    let mut c = Case::random(dims(25, 31, 2, 2, 12, 8), 300, 20, 10);
    let dtype = DType::F16;
    for x in [&mut c.q, &mut c.k, &mut c.v] {
        *x = dtype.decode(&dtype.encode(x), x.len());
    }
    let opts = GraphAttention::default();
    let (_, o, lse) = run_gpu(engine, &c, &opts, dtype).unwrap();
    let r = c.reference(&opts);
    let (tol_o, tol_lse) = c.budget(&opts);
    assert_close("f16 O", &o, &r.o, tol_o);
    assert_close("f16 LSE", &lse, &r.lse, tol_lse);
}

#[test]
fn csr_and_coo_agree() {
    let Some(engine) = engine() else { return };
    let c = Case::random(dims(20, 20, 1, 1, 4, 4), 100, 15, 11);
    let coo = c.graph();
    // The stable sort keeps each destination's edges (duplicates too) in the given order.
    let mut by_dst: Vec<Vec<u32>> = vec![Vec::new(); 20];
    for &(s, d) in &c.edges {
        by_dst[d].push(s as u32);
    }
    let col: Vec<u32> = by_dst.concat();
    assert_eq!(coo.col_idx(), col.as_slice());
    let mut row_ptr = vec![0u32];
    for l in &by_dst {
        row_ptr.push(row_ptr.last().unwrap() + l.len() as u32);
    }
    let csr = Graph::from_csr(20, row_ptr, col).unwrap();
    let [qd, kd, vd] = c.qkv_dims();
    let opts = GraphAttention::default();
    let a = engine
        .graph_attention_host((&c.q, qd), (&c.k, kd), (&c.v, vd), &coo, &opts)
        .unwrap();
    let b = engine
        .graph_attention_host((&c.q, qd), (&c.k, kd), (&c.v, vd), &csr, &opts)
        .unwrap();
    assert_eq!(a, b);
}

/// The planned programs through the CPU executor (the kernels' twins): whole and split, with
/// bias, edge features and averaged heads.
#[test]
fn the_cpu_executor_runs_the_graph_program() {
    let wide = Case::random(dims(33, 41, 4, 2, 8, 70), 900, 30, 12);
    let even = Case::random(dims(33, 41, 4, 2, 8, 8), 900, 30, 13);
    let bias = random(wide.graph().edges() * 4, 1.0, 120);
    let features = even.edge_features(121);
    for (c, opts) in [
        (&wide, GraphAttention::default()),
        (
            &wide,
            GraphAttention::default().with_bias(bias).with_chunk_len(64),
        ),
        (
            &even,
            GraphAttention::default()
                .with_edge_features(features)
                .with_heads_averaged()
                .with_stats()
                .with_chunk_len(64),
        ),
    ] {
        let graph = c.graph();
        let req = graph_request(c.qkv_dims().into(), DType::F32, &graph, &opts).unwrap();
        let plan = GraphPlan::new(&req, (graph.row_ptr(), graph.col_idx()), &CAPS).unwrap();
        let io = plan.io;
        let mut inputs: HostBuffers = [
            (io.q, words(&c.q)),
            (io.k, words(&c.k)),
            (io.v, words(&c.v)),
        ]
        .into_iter()
        .collect();
        inputs.extend(plan.index_inputs(graph.row_ptr(), graph.col_idx()));
        if let Some(b) = opts.bias() {
            inputs.insert(io.bias, words(&graph.to_csr_order(b, 4)));
        }
        if let Some(f) = opts.edge_features() {
            inputs.insert(io.edge_attr, words(&graph.to_csr_order(f, 4 * 8)));
        }
        let mut got = run(plan.program(), &inputs).unwrap();
        let r = c.reference(&opts);
        let (tol_o, tol_lse) = c.budget(&opts);
        assert_close("twin O", &floats(&got.remove(&io.o).unwrap()), &r.o, tol_o);
        assert_close(
            "twin LSE",
            &floats(&got.remove(&io.lse).unwrap()),
            &r.lse,
            tol_lse,
        );
        if let Some(st) = io.stats {
            let [e, f, cov] = [st.entropy, st.focus, st.coverage]
                .map(|id| floats(&got.remove(&id).expect("an output")));
            c.check_stats("twin", &opts, [&e, &f, &cov]);
        }
    }
}

/// The reference backward (dQ, dK, dV, d edge features, d bias) against central finite
/// differences of the forward reference: Q, K, V perturbed in f64, edge features and bias in
/// f32 steps (their exact difference taken as the step). Without a device.
#[test]
fn the_reference_backward_matches_finite_differences() {
    use xattn::cpu::graph_grad_reference::graph_attention_backward;
    // GQA, self-loops, a duplicate, an isolated destination (4), a removed edge (bias −∞).
    let d = dims(5, 4, 2, 1, 3, 3);
    let edges = vec![
        (0, 0),
        (1, 0),
        (1, 0),
        (2, 1),
        (3, 1),
        (1, 1),
        (2, 2),
        (0, 3),
        (3, 3),
    ];
    let to64 = |x: Vec<f32>| x.into_iter().map(f64::from).collect::<Vec<f64>>();
    let q = to64(random(d.m * d.heads * d.d_k, 1.0, 30));
    let k = to64(random(d.n * d.kv_heads * d.d_k, 1.0, 31));
    let v = to64(random(d.n * d.kv_heads * d.d_v, 1.0, 32));
    let mut bias = random(edges.len() * d.heads, 1.0, 33);
    bias[2 * 4 + 1] = f32::NEG_INFINITY;
    let features = random(edges.len() * d.heads * d.d_k, 0.5, 34);
    let scale = 0.7;
    for mean_heads in [false, true] {
        let out_heads = if mean_heads { 1 } else { d.heads };
        let d_o = to64(random(d.m * out_heads * d.d_v, 1.0, 35));
        let loss = |q: &[f64], k: &[f64], v: &[f64], bias: &[f32], features: &[f32]| -> f64 {
            let terms = GraphTerms {
                bias: Some(bias),
                edge_attr: Some(features),
                mean_heads,
            };
            let r = reference(d, (q, k, v), &edges, terms, scale);
            r.o.iter().zip(&d_o).map(|(o, g)| o * g).sum()
        };
        let terms = GraphTerms {
            bias: Some(&bias),
            edge_attr: Some(&features),
            mean_heads,
        };
        let g = graph_attention_backward(d, (&q, &k, &v), &edges, terms, scale, &d_o);
        let close = |what: &str, i: usize, got: f64, want: f64, tol: f64| {
            assert!(
                (got - want).abs() <= tol * (1.0 + want.abs()),
                "{what}[{i}] (mean {mean_heads}): backward {got}, finite difference {want}"
            );
        };
        let h = 1e-6;
        for (what, x, grad) in [("dq", &q, &g.dq), ("dk", &k, &g.dk), ("dv", &v, &g.dv)] {
            for i in 0..x.len() {
                let at = |delta: f64| {
                    let mut y = x.clone();
                    y[i] += delta;
                    match what {
                        "dq" => loss(&y, &k, &v, &bias, &features),
                        "dk" => loss(&q, &y, &v, &bias, &features),
                        _ => loss(&q, &k, &y, &bias, &features),
                    }
                };
                close(what, i, grad[i], (at(h) - at(-h)) / (2.0 * h), 1e-6);
            }
        }
        let step = 1.0 / 1024.0;
        let df = g.d_edge_attr.as_ref().expect("features given");
        let db = g.d_bias.as_ref().expect("bias given");
        for (what, x, grad) in [("df", &features, df), ("dbias", &bias, db)] {
            for i in 0..x.len() {
                if !x[i].is_finite() {
                    assert_eq!(grad[i], 0.0, "a removed edge has no gradient");
                    continue;
                }
                let at = |delta: f32| {
                    let mut y = x.clone();
                    y[i] += delta;
                    let l = match what {
                        "df" => loss(&q, &k, &v, &bias, &y),
                        _ => loss(&q, &k, &v, &y, &features),
                    };
                    (l, f64::from(y[i]))
                };
                let ((hi, xh), (lo, xl)) = (at(step), at(-step));
                close(what, i, grad[i], (hi - lo) / (xh - xl), 1e-5);
            }
        }
        // The isolated destination 4 has no gradient.
        assert!(g.dq[4 * d.heads * d.d_k..].iter().all(|&x| x == 0.0));
    }
}

/// PyTorch Geometric's `TransformerConv` in float64 (`tests/fixtures/generate_graph.py`:
/// edge features on keys and values, heads concatenated and averaged, isolated destinations)
/// against the device and the f64 reference, each within the f32 budget.
#[test]
fn pyg_transformer_conv_fixtures_agree() {
    let Some(engine) = engine() else { return };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/graph");
    let mut cases = 0;
    for dir in std::fs::read_dir(&root).expect("tests/fixtures/graph") {
        let dir = dir.unwrap().path();
        let read = |f: &str| common::files::read_npy::<f32>(&dir.join(format!("{f}.npy")));
        let ((q, qs), (k, ks), (v, _), (features, _)) =
            (read("q"), read("k"), read("v"), read("edge_attr"));
        let (ei, es) = common::files::read_npy::<i64>(&dir.join("edge_index.npy"));
        let e = es[1];
        let edges: Vec<(usize, usize)> = (0..e)
            .map(|i| (ei[i] as usize, ei[e + i] as usize))
            .collect();
        let c = Case {
            dims: dims(qs[0], ks[0], qs[1], ks[1], qs[2], qs[2]),
            edges,
            q,
            k,
            v,
        };
        let features = GraphAttention::default().with_edge_features(features);
        for (file, opts) in [
            ("o_concat", features.clone()),
            ("o_mean", features.clone().with_heads_averaged()),
        ] {
            let (want, _) = common::files::read_npy::<f64>(&dir.join(format!("{file}.npy")));
            let what = format!("{} {file}", dir.display());
            let (_, o, _) = run_gpu(engine, &c, &opts, DType::F32).unwrap();
            let (tol_o, _) = c.budget(&opts);
            assert_close(&format!("{what}: device"), &o, &want, tol_o);
            // PyG's scale 1/√d in f64 (the calls' default is that in f32).
            let scale = 1.0 / (c.dims.d_k as f64).sqrt();
            let qkv = (&c.q[..], &c.k[..], &c.v[..]);
            let r = reference(c.dims, qkv, &c.edges, opts.terms(), scale).o;
            // The reference within the f64 rounding of PyG's own sums (and its 1e-16).
            let worst = r
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-12, "{what}: reference off by {worst:e}");
        }
        cases += 1;
    }
    assert!(
        cases >= 2,
        "the fixtures are missing: run tests/fixtures/generate_graph.py"
    );
}

/// The planner's choice from the degree distribution, without a device.
#[test]
fn the_planner_splits_skewed_degrees_only() {
    let d = dims(1000, 1000, 2, 2, 32, 32);
    let req = |chunk_len| xattn::plan::graph::GraphRequest {
        dims: d,
        scale: 0.1,
        dtype: DType::F32,
        bias: false,
        edge_features: false,
        mean_heads: false,
        stats: false,
        chunk_len,
    };
    // Uniform: 20 edges each.
    let uniform: Vec<u32> = (0..=1000).map(|i| 20 * i).collect();
    let plan = GraphPlan::new(&req(None), (&uniform, &vec![0; 20_000]), &CAPS).unwrap();
    assert_eq!(plan.split, GraphSplit::Whole, "{plan}");
    assert!(plan.to_string().contains("split: none"), "{plan}");
    // One hub of 5000 edges among lists of 2: over 8 × mean, split for balance.
    let mut skewed = vec![0u32, 5000];
    skewed.extend((1..1000).map(|i| 5000 + 2 * i));
    let plan = GraphPlan::new(&req(None), (&skewed, &vec![0; 6998]), &CAPS).unwrap();
    let GraphSplit::Chunks {
        chunk_len, hubs, ..
    } = plan.split
    else {
        panic!("{plan}")
    };
    assert_eq!((chunk_len, hubs), (1024, 1), "{plan}");
    assert!(
        plan.to_string().contains("for balance") || plan.to_string().contains("over max"),
        "{plan}"
    );
    // A forced chunk length must be a multiple of 64.
    assert!(matches!(
        GraphPlan::new(&req(Some(100)), (&uniform, &vec![0; 20_000]), &CAPS),
        Err(Error::Argument(_))
    ));
}

#[test]
fn bad_graphs_are_typed_errors() {
    let shape = |r: xattn::Result<Graph>| matches!(r, Err(Error::Shape(_)));
    let arg = |r: xattn::Result<Graph>| matches!(r, Err(Error::Argument(_)));
    assert!(
        arg(Graph::from_csr(3, vec![0, 1, 2], vec![0, 3])),
        "source ≥ N"
    );
    assert!(
        shape(Graph::from_csr(3, vec![0, 2, 1], vec![0, 1])),
        "row_ptr decreases"
    );
    assert!(
        shape(Graph::from_csr(3, vec![0, 1, 3], vec![0, 1])),
        "E mismatch"
    );
    assert!(
        shape(Graph::from_csr(3, vec![1, 1, 2], vec![0, 1])),
        "row_ptr[0] ≠ 0"
    );
    assert!(shape(Graph::from_csr(3, vec![0], vec![])), "no destination");
    assert!(shape(Graph::from_csr(0, vec![0, 0], vec![])), "no source");
    assert!(
        arg(Graph::from_coo(3, 2, &[0, -1], &[0, 1])),
        "negative source"
    );
    assert!(
        arg(Graph::from_coo(3, 2, &[0, 1], &[0, 2])),
        "destination ≥ M"
    );
    assert!(
        shape(Graph::from_coo(3, 2, &[0, 1], &[0])),
        "rows of different length"
    );
    assert!(
        Graph::from_coo(3, 2, &[], &[]).is_ok(),
        "no edges: every destination isolated"
    );
}

#[test]
fn bad_calls_are_typed_errors() {
    let graph = Graph::from_coo(4, 3, &[0, 1, 3], &[0, 0, 2]).unwrap();
    let d = [[1, 3, 2, 8], [1, 4, 2, 8], [1, 4, 2, 8]];
    let req = |dims: [[usize; 4]; 3], opts: &GraphAttention| {
        graph_request(dims.into(), DType::F32, &graph, opts)
    };
    let ok = GraphAttention::default();
    assert!(req(d, &ok).is_ok());
    assert!(matches!(
        req([[2, 3, 2, 8], [2, 4, 2, 8], [2, 4, 2, 8]], &ok),
        Err(Error::Unsupported(_))
    ));
    assert!(
        matches!(req([[1, 5, 2, 8], d[1], d[2]], &ok), Err(Error::Shape(_))),
        "M ≠ graph"
    );
    assert!(
        matches!(
            req([d[0], [1, 5, 2, 8], [1, 5, 2, 8]], &ok),
            Err(Error::Shape(_))
        ),
        "N ≠ graph"
    );
    assert!(
        matches!(req([[1, 3, 3, 8], d[1], d[2]], &ok), Err(Error::Shape(_))),
        "heads"
    );
    let short = GraphAttention::default().with_bias(vec![0.0; 5]);
    assert!(matches!(req(d, &short), Err(Error::Length { .. })));
    let nan = GraphAttention::default().with_bias(vec![f32::NAN; 6]);
    assert!(matches!(req(d, &nan), Err(Error::Argument(_))));
    let inf = GraphAttention::default().with_bias(vec![f32::INFINITY; 6]);
    assert!(matches!(req(d, &inf), Err(Error::Argument(_))));
    let scale = GraphAttention::default().with_scale(f32::NAN);
    assert!(matches!(req(d, &scale), Err(Error::Argument(_))));
    // Edge features: [E, heads, d] and finite, with d_k = d_v.
    let features = |x: f32, len| GraphAttention::default().with_edge_features(vec![x; len]);
    assert!(req(d, &features(0.5, 3 * 2 * 8)).is_ok());
    assert!(matches!(
        req(d, &features(0.5, 3 * 2 * 8 - 1)),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        req(d, &features(f32::NAN, 3 * 2 * 8)),
        Err(Error::Argument(_))
    ));
    assert!(matches!(
        req(d, &features(f32::INFINITY, 3 * 2 * 8)),
        Err(Error::Argument(_))
    ));
    assert!(
        matches!(
            req([d[0], d[1], [1, 4, 2, 6]], &features(0.5, 3 * 2 * 8)),
            Err(Error::Shape(_))
        ),
        "d_k ≠ d_v"
    );
    // Through the engine: a value head dim over 256, a chunk length off 64.
    let Some(engine) = engine() else { return };
    let up = |dims: &[usize]| {
        engine
            .upload(&random(dims.iter().product(), 1.0, 1), dims)
            .unwrap()
    };
    let (q, k) = (up(&[1, 3, 2, 8]), up(&[1, 4, 2, 8]));
    let wide = up(&[1, 4, 2, 300]);
    assert!(matches!(
        engine.graph_attention((&q, &k, &wide), &graph, &ok),
        Err(Error::Unsupported(_))
    ));
    let v = up(&[1, 4, 2, 8]);
    let odd = GraphAttention::default().with_chunk_len(100);
    assert!(matches!(
        engine.graph_attention((&q, &k, &v), &graph, &odd),
        Err(Error::Argument(_))
    ));
}
