//! The backward of edge-list attention (`Engine::graph_attention_backward`): dQ, dK, dV,
//! d edge features and d bias against the f64 reference backward
//! (`xattn::cpu::graph_grad_reference`, itself checked against finite differences in
//! tests/graph.rs), on random graphs with isolated destinations, a hub (long in- and
//! out-lists), self-loops, duplicate edges, bipartite node sets and GQA, with a bias that
//! removes edges, edge features and averaged heads, in every dtype; every output poisoned
//! first; within the budgets `xattn::cpu::budget::graph_grad_budget` derives; lists walked in
//! passes over chunks (forced, and over llvmpipe's loop cap). The CPU executor (the kernels'
//! twins) on the same program; typed errors for bad calls.

mod common;

use common::{assert_close, engine, poison, random, CAPS};
use rand::{Rng, SeedableRng};
use xattn::cpu::budget::{graph_grad_budget, GraphGradBudget};
use xattn::cpu::graph_grad_reference::{
    graph_attention_backward as reference_backward, GraphGrads,
};
use xattn::cpu::graph_reference::{graph_attention as reference, graph_stats, GraphDims};
use xattn::cpu::program::{floats, run, words, HostBuffers};
use xattn::graph::graph_request;
use xattn::plan::graph_backward::GraphBackwardPlan;
use xattn::{DType, DeviceCaps, Engine, Error, Graph, GraphAttention, GraphHostGrads, Tensor};

/// A test graph: its edges as given, as `(source, destination)`, inputs and dO seeds.
struct Case {
    dims: GraphDims,
    edges: Vec<(usize, usize)>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    seed: u64,
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
    fn new(dims: GraphDims, edges: Vec<(usize, usize)>, seed: u64) -> Self {
        Self {
            q: random(dims.m * dims.heads * dims.d_k, 1.0, seed),
            k: random(dims.n * dims.kv_heads * dims.d_k, 1.0, seed + 1),
            v: random(dims.n * dims.kv_heads * dims.d_v, 1.0, seed + 2),
            dims,
            edges,
            seed,
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

    /// A hub of `fan` in-edges at destination 0 and a source 0 of `fan` out-edges, among
    /// `rest` random edges, in a shuffled order; the last destination isolated.
    fn hub(dims: GraphDims, fan: usize, rest: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut edges: Vec<(usize, usize)> = Vec::new();
        for _ in 0..fan {
            edges.push((rng.random_range(0..dims.n), 0));
            edges.push((0, rng.random_range(0..dims.m - 1)));
        }
        for _ in 0..rest {
            edges.push((rng.random_range(0..dims.n), rng.random_range(0..dims.m - 1)));
        }
        for i in (1..edges.len()).rev() {
            edges.swap(i, rng.random_range(0..=i));
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

    fn qkv_dims(&self) -> [[usize; 4]; 3] {
        let s = self.dims;
        [
            [1, s.m, s.heads, s.d_k],
            [1, s.n, s.kv_heads, s.d_k],
            [1, s.n, s.kv_heads, s.d_v],
        ]
    }

    fn out_heads(&self, opts: &GraphAttention) -> usize {
        if opts.terms().mean_heads {
            1
        } else {
            self.dims.heads
        }
    }

    /// dO in O's layout.
    fn d_o(&self, opts: &GraphAttention) -> Vec<f32> {
        let s = self.dims;
        random(s.m * self.out_heads(opts) * s.d_v, 1.0, self.seed + 7)
    }

    /// A bias `[E, heads]` with the first edge removed for head 0 (−∞) and the third for the
    /// last head (−2e30).
    fn bias(&self) -> Vec<f32> {
        let h = self.dims.heads;
        let mut b = random(self.edges.len() * h, 1.0, self.seed + 5);
        b[0] = f32::NEG_INFINITY;
        if self.edges.len() > 2 {
            b[2 * h + h - 1] = -2e30;
        }
        b
    }

    fn edge_features(&self) -> Vec<f32> {
        let s = self.dims;
        random(self.edges.len() * s.heads * s.d_k, 0.5, self.seed + 6)
    }

    /// Q, K and V rounded to `dtype`, so that the reference sees what the device reads.
    fn rounded_to(mut self, dtype: DType) -> Self {
        for x in [&mut self.q, &mut self.k, &mut self.v] {
            *x = dtype.decode(&dtype.encode(x), x.len());
        }
        self
    }

    fn degrees(&self) -> (usize, usize) {
        let (mut ins, mut outs) = (vec![0usize; self.dims.m], vec![0usize; self.dims.n]);
        for &(s, d) in &self.edges {
            outs[s] += 1;
            ins[d] += 1;
        }
        let max = |x: Vec<usize>| x.into_iter().max().unwrap_or(0);
        (max(ins), max(outs))
    }

    fn reference(&self, opts: &GraphAttention, d_o: &[f32]) -> GraphGrads {
        let scale = f64::from(opts.scale_for(self.dims.d_k));
        let d_o: Vec<f64> = d_o.iter().map(|&x| f64::from(x)).collect();
        let qkv = (&self.q[..], &self.k[..], &self.v[..]);
        reference_backward(self.dims, qkv, &self.edges, opts.terms(), scale, &d_o)
    }

    fn budget(&self, opts: &GraphAttention, d_o: &[f32]) -> GraphGradBudget {
        let s = self.dims;
        let scale = opts.scale_for(s.d_k);
        let st = graph_stats(
            s,
            (&self.q, &self.k),
            &self.edges,
            opts.terms(),
            f64::from(scale),
        );
        // The most weight one (source, K/V head) gathers over its query heads.
        let group = s.heads / s.kv_heads;
        let mut coverage = 0.0f64;
        for j in 0..s.n {
            for kvh in 0..s.kv_heads {
                let c: f64 = (0..group)
                    .map(|g| st.coverage[(kvh * group + g) * s.n + j])
                    .sum();
                coverage = coverage.max(c);
            }
        }
        let (max_in, max_out) = self.degrees();
        graph_grad_budget(
            s,
            scale,
            (&self.q, &self.k, &self.v, d_o),
            opts.terms(),
            (max_in, max_out, coverage),
        )
    }
}

/// The forward then the backward on the device, Q, K, V uploaded as `dtype`, every gradient
/// poisoned (NaN) before the backward runs.
fn run_gpu(
    engine: &Engine,
    c: &Case,
    opts: &GraphAttention,
    dtype: DType,
    d_o: &[f32],
) -> xattn::Result<GraphHostGrads> {
    let [qd, kd, vd] = c.qkv_dims();
    let up = |x: &[f32], d: [usize; 4]| Tensor::upload_as(engine.context(), "in", x, &d, dtype);
    let (q, k, v) = (up(&c.q, qd)?, up(&c.k, kd)?, up(&c.v, vd)?);
    let graph = c.graph();
    let out = engine.graph_attention((&q, &k, &v), &graph, opts)?;
    let d_o = engine.upload(d_o, out.o.dims())?;
    let call =
        engine.prepare_graph_backward((&q, &k, &v), &graph, (&out.o, &out.lse), &d_o, opts)?;
    let g = call.output();
    for t in [&g.dq, &g.dk, &g.dv] {
        poison(t)?;
    }
    for t in [&g.d_edge_attr, &g.d_bias].into_iter().flatten() {
        poison(t)?;
    }
    call.run()?;
    call.into_output().to_host()
}

/// Worst absolute error of each gradient: dQ, dK, dV, d edge features, d bias.
type Worst = [f64; 5];

/// Checks `got` against the reference within the budget; returns the worst errors.
fn check_grads(
    what: &str,
    c: &Case,
    opts: &GraphAttention,
    d_o: &[f32],
    got: &GraphHostGrads,
) -> Worst {
    let r = c.reference(opts, d_o);
    let b = c.budget(opts, d_o);
    let mut worst = [0.0; 5];
    worst[0] = assert_close(&format!("{what} dQ"), &got.dq, &r.dq, b.dq);
    worst[1] = assert_close(&format!("{what} dK"), &got.dk, &r.dk, b.dk);
    worst[2] = assert_close(&format!("{what} dV"), &got.dv, &r.dv, b.dv);
    match (&got.d_edge_attr, &r.d_edge_attr) {
        (Some(g), Some(w)) => {
            worst[3] = assert_close(&format!("{what} d edge features"), g, w, b.d_edge_attr)
        }
        (None, None) => {}
        _ => panic!("{what}: d edge features present in one only"),
    }
    match (&got.d_bias, &r.d_bias) {
        (Some(g), Some(w)) => worst[4] = assert_close(&format!("{what} d bias"), g, w, b.d_bias),
        (None, None) => {}
        _ => panic!("{what}: d bias present in one only"),
    }
    eprintln!(
        "{what}: max abs error dQ {:.2e} (budget {:.2e}), dK {:.2e} ({:.2e}), dV {:.2e} ({:.2e}), \
         df {:.2e} ({:.2e}), dbias {:.2e} ({:.2e})",
        worst[0], b.dq, worst[1], b.dk, worst[2], b.dv, worst[3], b.d_edge_attr, worst[4], b.d_bias
    );
    worst
}

/// The options a case is run with: plain; a bias removing edges with edge features (where
/// d_k = d_v); the same with heads averaged; where a list is longer than 64, the last two in
/// forced chunks of 64 edges (several passes of each backward kernel).
fn option_sets(c: &Case) -> Vec<(&'static str, GraphAttention)> {
    let mut out = vec![("plain", GraphAttention::default())];
    let biased = GraphAttention::default().with_bias(c.bias());
    let (full, mean) = if c.dims.d_k == c.dims.d_v {
        let full = biased.with_edge_features(c.edge_features());
        out.push(("bias+features", full.clone()));
        out.push(("bias+features+mean", full.clone().with_heads_averaged()));
        (full.clone(), full.with_heads_averaged())
    } else {
        out.push(("bias", biased.clone()));
        out.push(("bias+mean", biased.clone().with_heads_averaged()));
        (biased.clone(), biased.with_heads_averaged())
    };
    let (max_in, max_out) = c.degrees();
    if max_in.max(max_out) > 64 {
        out.push(("chunks of 64", full.with_chunk_len(64)));
        out.push(("chunks of 64, mean", mean.with_chunk_len(64)));
    }
    out
}

fn cases() -> Vec<(&'static str, Case)> {
    vec![
        // One node set: self-loops, duplicates, 12 of 37 destinations isolated.
        (
            "square",
            Case::random(dims(37, 37, 2, 2, 16, 16), 300, 25, 1),
        ),
        // Bipartite M ≠ N, GQA 4/2.
        (
            "bipartite gqa",
            Case::random(dims(50, 23, 4, 2, 8, 8), 400, 50, 2),
        ),
        // d_k ≠ d_v, wide values (4 slots), two destinations; then N = 1, head dims 1 and 3.
        ("wide", Case::random(dims(2, 90, 2, 1, 3, 200), 150, 2, 4)),
        ("tiny", Case::random(dims(5, 1, 1, 1, 1, 3), 9, 4, 3)),
        // A hub of 700 in-edges and a source of 700 out-edges (11 tiles each), GQA 2/1,
        // d = 70 (2 slots).
        ("hub", Case::hub(dims(40, 30, 2, 1, 70, 70), 700, 300, 5)),
    ]
}

#[test]
fn random_graphs_gradients_match_the_reference() {
    let Some(engine) = engine() else { return };
    let mut table = [0.0f64; 5];
    for (name, c) in cases() {
        for (opt_name, opts) in option_sets(&c) {
            let d_o = c.d_o(&opts);
            let what = format!("{name} {opt_name}");
            let got = run_gpu(engine, &c, &opts, DType::F32, &d_o).unwrap();
            let worst = check_grads(&what, &c, &opts, &d_o, &got);
            for (t, w) in table.iter_mut().zip(worst) {
                *t = t.max(w);
            }
        }
    }
    eprintln!(
        "f32: max abs error over all cases: dQ {:.2e}, dK {:.2e}, dV {:.2e}, df {:.2e}, dbias {:.2e}",
        table[0], table[1], table[2], table[3], table[4]
    );
}

#[test]
fn half_inputs_gradients_match_the_reference() {
    let Some(engine) = engine() else { return };
    for dtype in [DType::F16, DType::Bf16] {
        let mut table = [0.0f64; 5];
        for (name, c) in [
            (
                "bipartite gqa",
                Case::random(dims(50, 23, 4, 2, 8, 8), 400, 50, 2),
            ),
            ("hub", Case::hub(dims(40, 30, 2, 1, 70, 70), 300, 200, 6)),
        ] {
            let c = c.rounded_to(dtype);
            for (opt_name, opts) in option_sets(&c) {
                let d_o = c.d_o(&opts);
                let what = format!("{dtype} {name} {opt_name}");
                let got = run_gpu(engine, &c, &opts, dtype, &d_o).unwrap();
                let worst = check_grads(&what, &c, &opts, &d_o, &got);
                for (t, w) in table.iter_mut().zip(worst) {
                    *t = t.max(w);
                }
            }
        }
        eprintln!(
            "{dtype}: max abs error over all cases: dQ {:.2e}, dK {:.2e}, dV {:.2e}, df {:.2e}, \
             dbias {:.2e}",
            table[0], table[1], table[2], table[3], table[4]
        );
    }
}

/// The host-slice convenience runs the same forward and backward as the tensors' calls.
#[test]
fn host_slices_give_the_tensors_gradients() {
    let Some(engine) = engine() else { return };
    let c = Case::random(dims(37, 37, 2, 2, 16, 16), 300, 25, 1);
    let opts = GraphAttention::default()
        .with_bias(c.bias())
        .with_edge_features(c.edge_features());
    let d_o = c.d_o(&opts);
    let [qd, kd, vd] = c.qkv_dims();
    let graph = c.graph();
    let (out, grads) = engine
        .graph_attention_backward_host((&c.q, qd), (&c.k, kd), (&c.v, vd), &graph, &d_o, &opts)
        .unwrap();
    assert_eq!(out.o.len(), 37 * 2 * 16);
    let tensors = run_gpu(engine, &c, &opts, DType::F32, &d_o).unwrap();
    assert_eq!(grads, tensors);
}

/// The planned backward through the CPU executor (the kernels' twins), with O and LSE from
/// the f64 reference forward: within budget of the reference backward, and of the device.
#[test]
fn the_cpu_executor_runs_the_graph_backward_program() {
    for (name, c) in [
        (
            "bipartite gqa",
            Case::random(dims(33, 41, 4, 2, 8, 8), 500, 30, 12),
        ),
        ("hub", Case::hub(dims(20, 15, 2, 1, 70, 70), 150, 100, 13)),
    ] {
        for (opt_name, opts) in option_sets(&c) {
            let what = format!("twin {name} {opt_name}");
            let s = c.dims;
            let graph = c.graph();
            let req = graph_request(c.qkv_dims().into(), DType::F32, &graph, &opts).unwrap();
            let ids = graph.edge_ids();
            let plan =
                GraphBackwardPlan::new(&req, (graph.row_ptr(), graph.col_idx(), &ids), &CAPS)
                    .unwrap();
            let io = plan.io;
            let scale = f64::from(opts.scale_for(s.d_k));
            let fwd = reference(s, (&c.q, &c.k, &c.v), &c.edges, opts.terms(), scale);
            let f32s = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
            let d_o = c.d_o(&opts);
            let mut inputs: HostBuffers = [
                (io.q, words(&c.q)),
                (io.k, words(&c.k)),
                (io.v, words(&c.v)),
                (io.lse, words(&f32s(&fwd.lse))),
                (io.d_o, words(&d_o)),
            ]
            .into_iter()
            .collect();
            if let Some(o) = io.o {
                inputs.insert(o, words(&f32s(&fwd.o)));
            }
            inputs.extend(plan.index_inputs(graph.row_ptr(), graph.col_idx()));
            if let Some(b) = opts.bias() {
                inputs.insert(io.bias, words(&graph.to_csr_order(b, s.heads)));
            }
            if let Some(f) = opts.edge_features() {
                inputs.insert(io.edge_attr, words(&graph.to_csr_order(f, s.heads * s.d_k)));
            }
            let mut out = run(plan.program(), &inputs).unwrap();
            let mut take = |id| floats(&out.remove(&id).expect("an output"));
            let twin = GraphHostGrads {
                dq: take(io.dq),
                dk: take(io.dk),
                dv: take(io.dv),
                d_edge_attr: io.d_edge_attr.map(&mut take),
                d_bias: io.d_bias.map(&mut take),
            };
            // The reference forward's O and LSE stand for the device's, which are within the
            // forward's f32 budget of them; the backward's budget allows for that.
            check_grads(&what, &c, &opts, &d_o, &twin);
            let Some(engine) = engine() else { continue };
            let device = run_gpu(engine, &c, &opts, DType::F32, &d_o).unwrap();
            let b = c.budget(&opts, &d_o);
            let pairs = [
                ("dQ", &twin.dq, &device.dq, b.dq),
                ("dK", &twin.dk, &device.dk, b.dk),
                ("dV", &twin.dv, &device.dv, b.dv),
            ];
            for (g, t, d, tol) in pairs {
                let d64: Vec<f64> = d.iter().map(|&x| f64::from(x)).collect();
                // Each within budget of the reference, so within twice it of each other.
                assert_close(&format!("{what} {g} twin vs device"), t, &d64, 2.0 * tol);
            }
        }
    }
}

#[test]
fn bad_backward_calls_are_typed_errors() {
    // Without a device: head dims over 256, lists over the loop cap.
    let graph = Graph::from_coo(4, 3, &[0, 1, 3], &[0, 0, 2]).unwrap();
    let ids = graph.edge_ids();
    let plan = |d: [[usize; 4]; 3], caps: &DeviceCaps| {
        let req = graph_request(d.into(), DType::F32, &graph, &GraphAttention::default())?;
        GraphBackwardPlan::new(&req, (graph.row_ptr(), graph.col_idx(), &ids), caps)
    };
    let d = [[1, 3, 2, 8], [1, 4, 2, 8], [1, 4, 2, 8]];
    assert!(plan(d, &CAPS).is_ok());
    assert!(matches!(
        plan([[1, 3, 2, 300], [1, 4, 2, 300], [1, 4, 2, 8]], &CAPS),
        Err(Error::Unsupported(_))
    ));

    let Some(engine) = engine() else { return };
    let up = |dims: &[usize]| {
        engine
            .upload(&random(dims.iter().product(), 1.0, 1), dims)
            .unwrap()
    };
    let (q, k, v) = (up(&d[0]), up(&d[1]), up(&d[2]));
    let opts = GraphAttention::default();
    let out = engine.graph_attention((&q, &k, &v), &graph, &opts).unwrap();
    let d_o = up(&[1, 3, 2, 8]);
    let back = |o: &Tensor, lse: &Tensor, d_o: &Tensor, opts: &GraphAttention| {
        engine
            .graph_attention_backward((&q, &k, &v), &graph, (o, lse), d_o, opts)
            .map(|_| ())
    };
    assert!(back(&out.o, &out.lse, &d_o, &opts).is_ok());
    // dO of the wrong length, or not in O's type.
    let short = up(&[1, 3, 2, 7]);
    assert!(matches!(
        back(&out.o, &out.lse, &short, &opts),
        Err(Error::Shape(_))
    ));
    let half = Tensor::upload_as(
        engine.context(),
        "d_o",
        &random(48, 1.0, 2),
        &[1, 3, 2, 8],
        DType::F16,
    )
    .unwrap();
    assert!(matches!(
        back(&out.o, &out.lse, &half, &opts),
        Err(Error::Argument(_))
    ));
    // LSE of the wrong dims; O of the heads side by side for a call that averages them.
    let lse = up(&[1, 3, 2]);
    assert!(matches!(
        back(&out.o, &lse, &d_o, &opts),
        Err(Error::Shape(_))
    ));
    let mean = GraphAttention::default().with_heads_averaged();
    assert!(matches!(
        back(&out.o, &out.lse, &d_o, &mean),
        Err(Error::Shape(_))
    ));
    // A bias of the wrong length, as for the forward.
    let short_bias = GraphAttention::default().with_bias(vec![0.0; 5]);
    assert!(matches!(
        back(&out.o, &out.lse, &d_o, &short_bias),
        Err(Error::Length { .. })
    ));
}

/// A destination's in-edges or a source's out-edges (times the query heads of its K/V head)
/// longer than one workgroup may walk under llvmpipe's loop cap are walked in chunks, one pass
/// each; a forced chunk length must be a multiple of 64 within the cap; a device where not
/// even 64 edges fit refuses with the cap named.
#[test]
fn long_lists_are_walked_in_passes() {
    let s = dims(100, 100, 2, 1, 8, 8);
    let req = |graph: &Graph, opts: &GraphAttention| {
        graph_request(
            (
                [1, s.m, s.heads, s.d_k],
                [1, s.n, s.kv_heads, s.d_k],
                [1, s.n, s.kv_heads, s.d_v],
            ),
            DType::F32,
            graph,
            opts,
        )
        .unwrap()
    };
    let plan = |graph: &Graph, opts: &GraphAttention, caps: &DeviceCaps| {
        let ids = graph.edge_ids();
        GraphBackwardPlan::new(
            &req(graph, opts),
            (graph.row_ptr(), graph.col_idx(), &ids),
            caps,
        )
    };
    let star = |fan: usize, into_hub: bool| {
        let (a, b): (Vec<i64>, Vec<i64>) = (0..fan).map(|e| (0, (e % 100) as i64)).unzip();
        let (src, dst) = if into_hub { (b, a) } else { (a, b) };
        Graph::from_coo(s.n, s.m, &src, &dst).unwrap()
    };
    let plain = GraphAttention::default();
    let mean = GraphAttention::default().with_heads_averaged();
    for into_hub in [true, false] {
        let chunks = |fan, opts: &GraphAttention| plan(&star(fan, into_hub), opts, &CAPS).unwrap();
        let walk = |c: xattn::plan::graph_backward::GraphGradChunks| {
            if into_hub {
                c.q
            } else {
                c.kv
            }
        };
        assert_eq!(
            walk(chunks(5_000, &plain).chunks).1,
            1,
            "5,000 edges in one pass"
        );
        let long = chunks(40_000, &mean);
        let (chunk, passes) = walk(long.chunks);
        assert!(passes > 1 && chunk % 64 == 0, "{long}");
        assert_eq!(passes, 40_000u64.div_ceil(chunk), "{long}");
        assert!(long.to_string().contains("passes"), "{long}");
        if into_hub {
            let (_, delta_passes) = long.chunks.delta.expect("heads averaged");
            assert!(delta_passes >= 1 && delta_passes < passes, "{long}");
        }
        // Without a loop cap the same list runs in one pass.
        let uncapped = DeviceCaps {
            loop_cap: None,
            ..CAPS
        };
        let one = plan(&star(40_000, into_hub), &mean, &uncapped).unwrap();
        assert_eq!(walk(one.chunks).1, 1, "{one}");
    }
    // A forced chunk length off 64 is refused, as for the forward.
    let odd = GraphAttention::default().with_chunk_len(100);
    assert!(matches!(
        plan(&star(500, true), &odd, &CAPS),
        Err(Error::Argument(_))
    ));
    // A cap under one tile of 64 edges: refused with the cap named.
    let tiny = DeviceCaps {
        loop_cap: Some(150),
        ..CAPS
    };
    match plan(&star(500, true), &plain, &tiny) {
        Err(Error::Limit { what, limit, .. }) => {
            assert!(what.contains("graph_grad_q"), "{what}");
            assert_eq!(limit, 150);
        }
        other => panic!("a cap of 150 iterations: {:?}", other.map(|p| p.chunks)),
    }
}

/// Lists as long as the loop cap lets one workgroup walk run whole on the device and match the
/// reference: on llvmpipe a loop cost that undercounted would have the kernel's loops cut
/// short, leaving gradients wrong or poisoned. The longest list walked in one pass is searched
/// with llvmpipe's cap, heads averaged with a bias and edge features (graph_grad_q's delta
/// pass included), GQA 2/1 (graph_grad_kv walks a source's list once per query head). Lists
/// 2.5 times as long are walked in passes over chunks and match too.
#[test]
fn lists_at_and_over_the_loop_cap_match_the_reference() {
    let Some(engine) = engine() else { return };
    let s = dims(64, 64, 2, 1, 8, 8);
    for into_hub in [true, false] {
        let star = |fan: usize| -> Vec<(usize, usize)> {
            (0..fan)
                .map(|e| if into_hub { (e % 64, 0) } else { (0, e % 64) })
                .collect()
        };
        let opts_for = |c: &Case| {
            GraphAttention::default()
                .with_bias(random(c.edges.len() * s.heads, 1.0, 3))
                .with_edge_features(c.edge_features())
                .with_heads_averaged()
        };
        let passes = |fan: usize| {
            let c = Case::new(s, star(fan), 40);
            let graph = c.graph();
            let req =
                graph_request(c.qkv_dims().into(), DType::F32, &graph, &opts_for(&c)).unwrap();
            let ids = graph.edge_ids();
            let plan =
                GraphBackwardPlan::new(&req, (graph.row_ptr(), graph.col_idx(), &ids), &CAPS)
                    .unwrap();
            if into_hub {
                plan.chunks.q.1
            } else {
                plan.chunks.kv.1
            }
        };
        // The largest multiple of 64 walked in one pass.
        let (mut lo, mut hi) = (64, 64 * 1024);
        assert!(passes(lo) == 1 && passes(hi) > 1);
        while hi - lo > 64 {
            let mid = (lo + hi) / 128 * 64;
            if passes(mid) == 1 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        for fan in [lo, lo * 5 / 2] {
            let c = Case::new(s, star(fan), 40);
            let opts = opts_for(&c);
            let d_o = c.d_o(&opts);
            let what = format!(
                "{} of {fan} edges in {} pass(es)",
                if into_hub { "in-list" } else { "out-list" },
                passes(fan)
            );
            let got = run_gpu(engine, &c, &opts, DType::F32, &d_o).unwrap();
            check_grads(&what, &c, &opts, &d_o, &got);
        }
    }
}
