//! The graph cross-attention layer (`GraphCrossAttention`, GTAT's GCA) against its f64
//! reference (`cpu::gca_reference`, composed from the edge-list and linear references), whose
//! backward is itself checked by central differences here: outputs and every gradient (X, T,
//! each branch's weights and biases) on random graphs with a hub, an isolated node,
//! self-loops and duplicate edges; with and without biases; f16 inputs; and the errors.
//!
//! The layer's gradient tensors are made inside `backward` by `linear_backward` (zeroed by
//! wgpu, not poisoned) and summed by `add_into`, whose own tests poison their outputs; an
//! element left unwritten here would read 0, which no gradient below equals but d b_K (0
//! exactly: softmax ignores a logit shift shared by a destination's edges).

mod common;

use common::*;
use xattn::cpu::gca_reference::{gca_backward, gca_forward, GcaGrads64, GcaWeights64};
use xattn::mha::{MhaWeights, Proj};
use xattn::{
    Branch, DType, Engine, Error, GcaConfig, GcaWeights, Graph, GraphCrossAttention, Tensor,
};

const EPS: f64 = f32::EPSILON as f64;

/// Seeded weights of `c`'s shapes (Xavier-like amplitude), biases where `c.bias`.
fn random_weights(c: &GcaConfig, seed: u64) -> GcaWeights {
    let branch = |b: Branch, seed: u64| {
        let [q, k, v, o] = c.weight_dims(b);
        let w = |[out, inp]: [usize; 2], s: u64| random(out * inp, (3.0 / inp as f32).sqrt(), s);
        let bias = |[out, _]: [usize; 2], s: u64| c.bias.then(|| random(out, 0.5, s));
        MhaWeights {
            q: w(q, seed),
            k: w(k, seed + 1),
            v: w(v, seed + 2),
            o: w(o, seed + 3),
            q_bias: bias(q, seed + 4),
            k_bias: bias(k, seed + 5),
            v_bias: bias(v, seed + 6),
            o_bias: bias(o, seed + 7),
        }
    };
    GcaWeights {
        features: branch(Branch::Features, seed),
        topology: branch(Branch::Topology, seed + 10),
    }
}

/// A random graph on `nodes` nodes as `(source, destination)` pairs: node 0 a hub that every
/// other node sends to, the last node without in-edges, a self-loop and a duplicate edge.
fn random_edges(nodes: usize, per_node: usize, seed: u64) -> Vec<(usize, usize)> {
    let picks = random(nodes * per_node * 2, 1.0, seed);
    let mut edges: Vec<(usize, usize)> = picks
        .chunks(2)
        .map(|p| {
            let at = |x: f32| (((x + 1.0) / 2.0) * nodes as f32) as usize % nodes;
            (at(p[0]), at(p[1]) % (nodes - 1))
        })
        .collect();
    edges.extend((1..nodes).map(|j| (j, 0)));
    edges.extend([(2, 2), (3, 1), (3, 1)]);
    edges
}

fn graph_of(nodes: usize, edges: &[(usize, usize)]) -> Graph {
    let src: Vec<i64> = edges.iter().map(|e| e.0 as i64).collect();
    let dst: Vec<i64> = edges.iter().map(|e| e.1 as i64).collect();
    Graph::from_coo(nodes, nodes, &src, &dst).unwrap()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&x| f64::from(x)).collect()
}

fn amax(x: &[f64]) -> f64 {
    x.iter().fold(0.0f64, |a, &y| a.max(y.abs()))
}

/// The normwise budget's chain length (as the multi-head layer's tests): every f32 rounding
/// along the chain — the input projections over their widths, the logits over head_dim with
/// |logit| ≤ `max_logit`, the softmax and sums over the largest in- and out-degree, W^O over
/// inner — adds at most ε relative to what it combines.
fn chain_len(c: &GcaConfig, edges: &[(usize, usize)], nodes: usize, max_logit: f64) -> f64 {
    let mut deg_in = vec![0usize; nodes];
    let mut deg_out = vec![0usize; nodes];
    for &(j, i) in edges {
        deg_in[i] += 1;
        deg_out[j] += 1;
    }
    let degrees = deg_in.iter().max().unwrap() + deg_out.iter().max().unwrap();
    (c.feature_dim + c.topology_dim + 2 * c.inner() + 2 * c.head_dim + degrees) as f64
        + 1.0
        + max_logit
}

/// |logit| ≤ scale·head_dim·max|q|·max|k| of either branch, each projection's output bounded
/// by its input's largest element times the weight's largest absolute row sum plus the bias.
fn max_logit(c: &GcaConfig, w: &GcaWeights64, (x, t): (&[f64], &[f64])) -> f64 {
    let bound = |wt: &[f64], b: &Option<Vec<f64>>, in_dim: usize, input: &[f64]| {
        let rows = wt
            .chunks(in_dim)
            .map(|r| r.iter().map(|x| x.abs()).sum::<f64>());
        rows.fold(0.0f64, f64::max) * amax(input) + b.as_deref().map_or(0.0, amax)
    };
    let scale = 1.0 / (c.head_dim as f64).sqrt();
    Branch::ALL
        .iter()
        .map(|&b| {
            let (sim, dim) = match b {
                Branch::Features => (t, c.topology_dim),
                Branch::Topology => (x, c.feature_dim),
            };
            let (ws, bs) = (&w.w[b as usize], &w.b[b as usize]);
            scale
                * c.head_dim as f64
                * bound(&ws[0], &bs[0], dim, sim)
                * bound(&ws[1], &bs[1], dim, sim)
        })
        .fold(0.0, f64::max)
}

struct Case {
    config: GcaConfig,
    nodes: usize,
    per_node: usize,
    input: DType,
}

/// The GPU layer's outputs and gradients on the host.
struct Got {
    x: Vec<f32>,
    t: Vec<f32>,
    d_x: Vec<f32>,
    d_t: Vec<f32>,
    d_w: [[Vec<f32>; 4]; 2],
    d_b: [[Option<Vec<f32>>; 4]; 2],
}

/// Runs `c` on the device and the reference; compares every output and gradient with its
/// normwise budget; returns the worst error relative to its budget.
fn check(engine: &Engine, name: &str, c: &Case, seed: u64) -> f64 {
    let cfg = c.config;
    let n = c.nodes;
    let mut x = random(n * cfg.feature_dim, 1.0, seed);
    let mut t = random(n * cfg.topology_dim, 1.0, seed + 1);
    for v in [&mut x, &mut t] {
        // The inputs as the device holds them.
        *v = c.input.decode(&c.input.encode(v), v.len());
    }
    let d_xo = random(n * cfg.feature_dim, 1.0, seed + 2);
    let d_to = random(n * cfg.topology_dim, 1.0, seed + 3);
    let weights = random_weights(&cfg, seed + 4);
    let edges = random_edges(n, c.per_node, seed + 5);
    let graph = graph_of(n, &edges);

    let ctx = engine.context();
    let layer = GraphCrossAttention::new(engine, cfg, &weights).unwrap();
    let xs = Tensor::upload_as(ctx, "x", &x, &[n, cfg.feature_dim], c.input).unwrap();
    let ts = Tensor::upload_as(ctx, "t", &t, &[n, cfg.topology_dim], c.input).unwrap();
    let out = layer.forward(&xs, &ts, &graph).unwrap();
    let d_x = engine.upload(&d_xo, &[n, cfg.feature_dim]).unwrap();
    let d_t = engine.upload(&d_to, &[n, cfg.topology_dim]).unwrap();
    let g = layer.backward(&xs, &ts, &graph, (&d_x, &d_t)).unwrap();
    let host = |t: &Tensor| t.to_host().unwrap();
    let got = Got {
        x: host(&out.x),
        t: host(&out.t),
        d_x: host(&g.d_x),
        d_t: host(&g.d_t),
        d_w: g.d_weights.each_ref().map(|b| b.each_ref().map(host)),
        d_b: g
            .d_biases
            .each_ref()
            .map(|b| b.each_ref().map(|t| t.as_ref().map(host))),
    };

    let w64 = GcaWeights64::from(&weights);
    let (x64, t64) = (widen(&x), widen(&t));
    let want_out = gca_forward(&cfg, (&x64, &t64), &edges, &w64);
    let want = gca_backward(
        &cfg,
        (&x64, &t64),
        &edges,
        &w64,
        (&widen(&d_xo), &widen(&d_to)),
    );
    let len = chain_len(&cfg, &edges, n, max_logit(&cfg, &w64, (&x64, &t64)));
    let mut worst = 0.0f64;
    let mut one = |what: String, got: &[f32], want: &[f64], magnitude: f64| {
        let tol = 4.0 * EPS * len * magnitude.max(1e-30);
        let err = assert_close(&what, got, want, tol);
        eprintln!("{what}: max error {err:.2e} (budget {tol:.2e})");
        worst = worst.max(err / tol);
    };
    one(format!("{name} X'"), &got.x, &want_out.x, amax(&want_out.x));
    one(format!("{name} T'"), &got.t, &want_out.t, amax(&want_out.t));
    one(format!("{name} dX"), &got.d_x, &want.d_x, amax(&want.d_x));
    one(format!("{name} dT"), &got.d_t, &want.d_t, amax(&want.d_t));
    compare_params(name, &got, &want, &mut one);
    worst
}

/// Every weight's and bias's gradient; a bias's budget is the sum of the magnitudes its
/// column sum adds (d b_K cancels to 0).
fn compare_params(
    name: &str,
    got: &Got,
    want: &GcaGrads64,
    one: &mut impl FnMut(String, &[f32], &[f64], f64),
) {
    for b in Branch::ALL {
        for p in Proj::ALL {
            let (bi, pi) = (b as usize, p as usize);
            let w = &want.d_w[bi][pi];
            one(
                format!("{name} d{b:?} W^{p:?}"),
                &got.d_w[bi][pi],
                w,
                amax(w),
            );
            match (&got.d_b[bi][pi], &want.d_b[bi][pi]) {
                (Some(g), Some(w)) => {
                    let dz = &want.d_projected[bi][pi];
                    let mut sums = vec![0.0f64; w.len()];
                    for (e, x) in dz.iter().enumerate() {
                        sums[e % w.len()] += x.abs();
                    }
                    one(format!("{name} d{b:?} b^{p:?}"), g, w, amax(&sums));
                }
                (None, None) => {}
                (g, _) => panic!(
                    "{name}: bias gradient of {b:?} {p:?} present: {}",
                    g.is_some()
                ),
            }
        }
    }
}

#[test]
fn the_layer_matches_the_f64_reference() {
    let Some(engine) = engine() else { return };
    let cases = [
        (
            "dx 12, dt 15, 2 heads of 8, biases",
            Case {
                config: GcaConfig::new(12, 15, 2, 8),
                nodes: 40,
                per_node: 3,
                input: DType::F32,
            },
        ),
        (
            "no biases, 1 head of 5, wide features",
            Case {
                config: GcaConfig::new(33, 4, 1, 5).with_bias(false),
                nodes: 23,
                per_node: 2,
                input: DType::F32,
            },
        ),
        (
            "f16 inputs, 3 heads of 4",
            Case {
                config: GcaConfig::new(10, 15, 3, 4),
                nodes: 30,
                per_node: 4,
                input: DType::F16,
            },
        ),
    ];
    for (i, (name, c)) in cases.iter().enumerate() {
        let worst = check(engine, name, c, 100 * i as u64 + 7);
        eprintln!("{name}: worst error {worst:.4} of budget");
    }
}

/// Central differences of the reference's forward give its backward: for every input and
/// weight element of a small layer, `(L(θ + h) − L(θ − h)) / 2h` with `L = Σ dX'∘X' + Σ
/// dT'∘T'`.
#[test]
fn the_reference_backward_matches_central_differences() {
    let cfg = GcaConfig::new(3, 4, 2, 2);
    let nodes = 6;
    let edges = random_edges(nodes, 2, 3);
    let w = GcaWeights64::from(&random_weights(&cfg, 9));
    let x = widen(&random(nodes * cfg.feature_dim, 1.0, 1));
    let t = widen(&random(nodes * cfg.topology_dim, 1.0, 2));
    let d_xo = widen(&random(nodes * cfg.feature_dim, 1.0, 4));
    let d_to = widen(&random(nodes * cfg.topology_dim, 1.0, 5));
    let loss = |x: &[f64], t: &[f64], w: &GcaWeights64| {
        let r = gca_forward(&cfg, (x, t), &edges, w);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f64>();
        dot(&r.x, &d_xo) + dot(&r.t, &d_to)
    };
    let g = gca_backward(&cfg, (&x, &t), &edges, &w, (&d_xo, &d_to));
    let h = 1e-6;
    // Every element i of one gradient against (L(θᵢ + h) − L(θᵢ − h)) / 2h, `shifted(i, δ)`
    // being L with element i of its parameter (`len` elements) moved by δ.
    let check_all =
        |what: &str, analytic: &[f64], len: usize, shifted: &dyn Fn(usize, f64) -> f64| {
            assert_eq!(analytic.len(), len, "{what}: length");
            for (i, &an) in analytic.iter().enumerate() {
                let fd = (shifted(i, h) - shifted(i, -h)) / (2.0 * h);
                assert!(
                    (fd - an).abs() <= 1e-6 * (1.0 + an.abs()),
                    "{what}[{i}]: central difference {fd}, backward {an}"
                );
            }
        };
    check_all("dX", &g.d_x, x.len(), &|i, d| {
        let mut x = x.clone();
        x[i] += d;
        loss(&x, &t, &w)
    });
    check_all("dT", &g.d_t, t.len(), &|i, d| {
        let mut t = t.clone();
        t[i] += d;
        loss(&x, &t, &w)
    });
    for b in 0..2 {
        for p in 0..4 {
            check_all(
                &format!("dW[{b}][{p}]"),
                &g.d_w[b][p],
                w.w[b][p].len(),
                &|i, d| {
                    let mut w = w.clone();
                    w.w[b][p][i] += d;
                    loss(&x, &t, &w)
                },
            );
            let bias_len = w.b[b][p].as_ref().unwrap().len();
            let db = g.d_b[b][p].as_ref().unwrap();
            check_all(&format!("db[{b}][{p}]"), db, bias_len, &|i, d| {
                let mut w = w.clone();
                w.b[b][p].as_mut().unwrap()[i] += d;
                loss(&x, &t, &w)
            });
        }
    }
}

/// A small layer's config (features 6, topology 5) and its inputs on `nodes` nodes.
fn small_inputs(engine: &Engine, nodes: usize) -> (GcaConfig, Graph, Tensor, Tensor) {
    let cfg = GcaConfig::new(6, 5, 2, 4);
    let graph = graph_of(nodes, &random_edges(nodes, 2, 8));
    let upload = |width: usize, seed| {
        engine
            .upload(&random(nodes * width, 1.0, seed), &[nodes, width])
            .unwrap()
    };
    (cfg, graph, upload(6, 1), upload(5, 2))
}

/// New weights written with `set_weights` give what a layer made with them gives.
#[test]
fn set_weights_gives_a_new_layers_outputs() {
    let Some(engine) = engine() else { return };
    let (cfg, graph, x, t) = small_inputs(engine, 12);
    let (first, second) = (random_weights(&cfg, 3), random_weights(&cfg, 30));
    let mut layer = GraphCrossAttention::new(engine, cfg, &first).unwrap();
    let before = layer.forward(&x, &t, &graph).unwrap().x.to_host().unwrap();
    layer.set_weights(&second).unwrap();
    let after = layer.forward(&x, &t, &graph).unwrap();
    let fresh = GraphCrossAttention::new(engine, cfg, &second).unwrap();
    let want = fresh.forward(&x, &t, &graph).unwrap();
    assert_eq!(after.x.to_host().unwrap(), want.x.to_host().unwrap());
    assert_eq!(after.t.to_host().unwrap(), want.t.to_host().unwrap());
    assert_ne!(
        before,
        want.x.to_host().unwrap(),
        "the weights changed the output"
    );
}

#[test]
fn bad_layers_and_calls_are_typed_errors() {
    let Some(engine) = engine() else { return };
    let nodes = 8;
    let (cfg, graph, x, t) = small_inputs(engine, nodes);
    let w = random_weights(&cfg, 1);
    assert!(matches!(
        GraphCrossAttention::new(engine, GcaConfig::new(6, 5, 0, 4), &w),
        Err(Error::Shape(_))
    ));
    let mut short = w.clone();
    short.topology.v.pop();
    assert!(matches!(
        GraphCrossAttention::new(engine, cfg, &short),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        GraphCrossAttention::new(engine, cfg.with_bias(false), &w),
        Err(Error::Argument(_))
    ));
    let layer = GraphCrossAttention::new(engine, cfg, &w).unwrap();
    let t_wide = engine
        .upload(&random(nodes * 6, 1.0, 2), &[nodes, 6])
        .unwrap();
    assert!(matches!(
        layer.forward(&x, &t_wide, &graph),
        Err(Error::Shape(_))
    ));
    let t_short = engine.upload(&random(7 * 5, 1.0, 2), &[7, 5]).unwrap();
    assert!(matches!(
        layer.forward(&x, &t_short, &graph),
        Err(Error::Shape(_))
    ));
    let bipartite = Graph::from_coo(3, nodes, &[0, 1], &[0, 1]).unwrap();
    assert!(matches!(
        layer.forward(&x, &t, &bipartite),
        Err(Error::Shape(_))
    ));
    let d_x = engine
        .upload(&random(nodes * 6, 1.0, 3), &[nodes, 6])
        .unwrap();
    assert!(matches!(
        layer.backward(&x, &t, &graph, (&d_x, &d_x)),
        Err(Error::Shape(_))
    ));
}
