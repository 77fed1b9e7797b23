//! A graph cross-attention layer (GTAT's GCA) learns to classify the nodes of a graph, and
//! beats a classifier that sees each node's features alone.
//!
//! The graph is a stochastic block model: C classes of equal size, an edge between two nodes
//! of one class with probability `IN_DEGREE / class size`, between classes with probability
//! `OUT_DEGREE / (nodes − class size)`, undirected (both directions). A node's features are
//! its class's mean (random, shared by the class) plus Gaussian noise strong enough that the
//! features alone classify poorly; its topology features are its graphlet-orbit counts
//! (`xattn::graph::orbits`, log(1 + count), standardized). Half of each class is labelled for
//! training; accuracy is measured on the other half.
//!
//! The model: `(X', T') = GCA(X, T)` on the GPU (features mixed over in-neighbours with
//! weights from topological similarity, topology with weights from feature similarity), then
//! a linear classifier of `[X + X' | T + T']` on the host. The baseline: the same classifier
//! of X alone. Each step runs the layer's forward and backward on the device, the classifier
//! and the cross-entropy loss on the host, and Adam on every weight (written back with
//! `GraphCrossAttention::set_weights`). T carries no class signal here (every class has the
//! same expected degrees), so the GCA model can only beat the baseline by reading the
//! neighbours: most of a node's neighbours share its class, so what they carry averages the
//! noise away.
//!
//! `cargo run --release --example graph_classification [-- --small]` (`--small`: a smaller
//! graph and fewer steps, for CI). Exits with an error unless the GCA model's test accuracy
//! beats the baseline's by at least 10 points.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xattn::graph::orbits::{graphlet_orbits, ORBITS};
use xattn::mha::MhaWeights;
use xattn::{Branch, Context, Engine, GcaConfig, GcaWeights, Graph, GraphCrossAttention, Tensor};

mod common;

use common::*;

/// Classes, feature width, heads and head width of the layer.
const CLASSES: usize = 4;
const FEATURES: usize = 16;
const HEADS: usize = 2;
const HEAD_DIM: usize = 8;
/// Expected neighbours in the node's own class and in the others.
const IN_DEGREE: f64 = 8.0;
const OUT_DEGREE: f64 = 2.0;
/// Size of each class mean's entries and the standard deviation of the noise.
const SIGNAL: f32 = 0.35;
const NOISE: f32 = 1.0;
/// Adam's step size for the GCA model, and for the baseline with its steps (a small model
/// on the host: trained to convergence, so the comparison is fair to it).
const LR: f32 = 0.003;
const BASELINE_LR: f32 = 0.01;
const BASELINE_STEPS: usize = 500;

fn main() {
    exit_on_error("graph_classification", run);
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
}

/// The block model's undirected edges as `(source, destination)` pairs, both directions.
fn block_model(labels: &[usize], rng: &mut StdRng) -> Vec<(usize, usize)> {
    let n = labels.len();
    let class_size = n / CLASSES;
    let p_in = IN_DEGREE / class_size as f64;
    let p_out = OUT_DEGREE / (n - class_size) as f64;
    let mut edges = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            let p = if labels[i] == labels[j] { p_in } else { p_out };
            if rng.random_bool(p) {
                edges.extend([(i, j), (j, i)]);
            }
        }
    }
    edges
}

/// Each node's orbit counts as log(1 + count), each orbit standardized over the nodes.
fn topology_features(graph: &Graph) -> AnyResult<Vec<f32>> {
    let counts = graphlet_orbits(graph)?;
    let n = counts.len();
    let mut t: Vec<f32> = counts
        .iter()
        .flat_map(|row| row.iter().map(|&c| (c as f32).ln_1p()))
        .collect();
    for o in 0..ORBITS {
        let mean = (0..n).map(|i| t[i * ORBITS + o]).sum::<f32>() / n as f32;
        let var = (0..n)
            .map(|i| (t[i * ORBITS + o] - mean).powi(2))
            .sum::<f32>()
            / n as f32;
        let sd = var.sqrt().max(1e-6);
        for i in 0..n {
            t[i * ORBITS + o] = (t[i * ORBITS + o] - mean) / sd;
        }
    }
    Ok(t)
}

/// A linear classifier `logits = h·Wᵀ + b` trained with Adam on the host.
struct Classifier {
    in_dim: usize,
    w: Vec<f32>,
    b: Vec<f32>,
    adam: [Adam; 2],
}

impl Classifier {
    fn new(in_dim: usize, rng: &mut StdRng) -> Self {
        Self {
            in_dim,
            w: uniform(rng, CLASSES * in_dim, (3.0 / in_dim as f32).sqrt()),
            b: vec![0.0; CLASSES],
            adam: [Adam::new(CLASSES * in_dim), Adam::new(CLASSES)],
        }
    }

    fn logits(&self, h: &[f32]) -> Vec<f32> {
        h.chunks(self.in_dim)
            .flat_map(|row| {
                (0..CLASSES).map(move |c| {
                    let w = &self.w[c * self.in_dim..][..self.in_dim];
                    self.b[c] + row.iter().zip(w).map(|(a, b)| a * b).sum::<f32>()
                })
            })
            .collect()
    }

    /// The accuracy over the nodes `on` selects.
    fn accuracy(&self, h: &[f32], labels: &[usize], on: &[bool]) -> f64 {
        let logits = self.logits(h);
        let (mut right, mut count) = (0, 0);
        for (i, row) in logits.chunks(CLASSES).enumerate().filter(|(i, _)| on[*i]) {
            let best = (0..CLASSES)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            right += usize::from(best == labels[i]);
            count += 1;
        }
        right as f64 / count as f64
    }

    /// One Adam step (`t` from 1, size `lr`) on the mean cross-entropy over the `train`
    /// nodes; returns the loss and its gradient with respect to `h`.
    fn step(
        &mut self,
        h: &[f32],
        labels: &[usize],
        train: &[bool],
        (t, lr): (i32, f32),
    ) -> (f64, Vec<f32>) {
        let logits = self.logits(h);
        let count = train.iter().filter(|&&x| x).count() as f32;
        let mut loss = 0.0f64;
        let mut d_logits = vec![0.0f32; logits.len()];
        for (i, row) in logits
            .chunks(CLASSES)
            .enumerate()
            .filter(|(i, _)| train[*i])
        {
            let top = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f32 = row.iter().map(|&x| (x - top).exp()).sum();
            loss += f64::from(sum.ln() + top - row[labels[i]]);
            for c in 0..CLASSES {
                let p = (row[c] - top).exp() / sum;
                d_logits[i * CLASSES + c] = (p - f32::from(c == labels[i])) / count;
            }
        }
        let mut d_h = vec![0.0f32; h.len()];
        let (mut d_w, mut d_b) = (vec![0.0f32; self.w.len()], vec![0.0f32; CLASSES]);
        for (i, (row, g)) in h
            .chunks(self.in_dim)
            .zip(d_logits.chunks(CLASSES))
            .enumerate()
        {
            for c in 0..CLASSES {
                d_b[c] += g[c];
                for k in 0..self.in_dim {
                    d_w[c * self.in_dim + k] += g[c] * row[k];
                    d_h[i * self.in_dim + k] += g[c] * self.w[c * self.in_dim + k];
                }
            }
        }
        let [aw, ab] = &mut self.adam;
        aw.step(&mut self.w, &d_w, lr, t);
        ab.step(&mut self.b, &d_b, lr, t);
        (loss / f64::from(count), d_h)
    }
}

/// Seeded Xavier-like weights of `c`'s shapes, zero biases.
fn init_weights(c: &GcaConfig, rng: &mut StdRng) -> GcaWeights {
    let mut branch = |b: Branch| {
        let dims = c.weight_dims(b);
        let mut mat = |[out, inp]: [usize; 2]| uniform(rng, out * inp, (3.0 / inp as f32).sqrt());
        let (q, k, v, o) = (mat(dims[0]), mat(dims[1]), mat(dims[2]), mat(dims[3]));
        let zeros = |[out, _]: [usize; 2]| Some(vec![0.0; out]);
        MhaWeights {
            q,
            k,
            v,
            o,
            q_bias: zeros(dims[0]),
            k_bias: zeros(dims[1]),
            v_bias: zeros(dims[2]),
            o_bias: zeros(dims[3]),
        }
    };
    GcaWeights {
        features: branch(Branch::Features),
        topology: branch(Branch::Topology),
    }
}

/// `[a + a' | b + b']` row by row: the classifier's input (residual GCA outputs).
fn concat_residual(n: usize, (a, a2): (&[f32], &[f32]), (b, b2): (&[f32], &[f32])) -> Vec<f32> {
    let (da, db) = (a.len() / n, b.len() / n);
    (0..n)
        .flat_map(|i| {
            let left = (0..da).map(move |k| a[i * da + k] + a2[i * da + k]);
            let right = (0..db).map(move |k| b[i * db + k] + b2[i * db + k]);
            left.chain(right)
        })
        .collect()
}

fn run() -> AnyResult<()> {
    let small = small_flag("graph_classification")?;
    let (per_class, steps) = if small { (60, 80) } else { (250, 200) };
    let n = per_class * CLASSES;
    let mut rng = StdRng::seed_from_u64(7);

    let labels: Vec<usize> = (0..n).map(|i| i / per_class).collect();
    let edges = block_model(&labels, &mut rng);
    let src: Vec<i64> = edges.iter().map(|e| e.0 as i64).collect();
    let dst: Vec<i64> = edges.iter().map(|e| e.1 as i64).collect();
    let graph = Graph::from_coo(n, n, &src, &dst)?;
    let same = edges.iter().filter(|e| labels[e.0] == labels[e.1]).count();
    let means: Vec<f32> = (0..CLASSES * FEATURES)
        .map(|_| {
            if rng.random_bool(0.5) {
                SIGNAL
            } else {
                -SIGNAL
            }
        })
        .collect();
    let x: Vec<f32> = (0..n * FEATURES)
        .map(|e| means[labels[e / FEATURES] * FEATURES + e % FEATURES] + NOISE * normal(&mut rng))
        .collect();
    let t = topology_features(&graph)?;
    let train: Vec<bool> = (0..n).map(|i| i % per_class < per_class / 2).collect();
    let test: Vec<bool> = train.iter().map(|x| !x).collect();
    println!(
        "stochastic block model: {n} nodes in {CLASSES} classes, {} directed edges ({:.0}% \
         within a class), {FEATURES} features (class signal ±{SIGNAL}, noise σ {NOISE}), \
         {ORBITS} orbit counts; {} nodes labelled for training",
        edges.len(),
        100.0 * same as f64 / edges.len() as f64,
        train.iter().filter(|&&x| x).count()
    );

    // The baseline: the features alone.
    let mut baseline = Classifier::new(FEATURES, &mut rng);
    for step in 1..=BASELINE_STEPS {
        baseline.step(&x, &labels, &train, (step as i32, BASELINE_LR));
    }
    let base_acc = baseline.accuracy(&x, &labels, &test);

    let ctx = Context::new()?;
    println!("device: {}", ctx.describe());
    let engine = Engine::new(&ctx);
    let config = GcaConfig::new(FEATURES, ORBITS, HEADS, HEAD_DIM);
    let mut weights = init_weights(&config, &mut rng);
    let mut layer = GraphCrossAttention::new(&engine, config, &weights)?;
    let mut head = Classifier::new(FEATURES + ORBITS, &mut rng);
    let xs = engine.upload(&x, &[n, FEATURES])?;
    let ts = engine.upload(&t, &[n, ORBITS])?;
    let mut adam: Vec<Adam> = params(&mut weights.features)
        .into_iter()
        .chain(params(&mut weights.topology))
        .map(|p| Adam::new(p.len()))
        .collect();
    println!(
        "GCA layer: {HEADS} heads of {HEAD_DIM}, then a linear classifier of [X + X' | T + T']; \
         {steps} steps of Adam, lr {LR}"
    );
    let started = Instant::now();
    let mut gpu = std::time::Duration::ZERO;
    for step in 1..=steps {
        let at = Instant::now();
        let out = layer.forward(&xs, &ts, &graph)?;
        let (xo, to) = (out.x.to_host()?, out.t.to_host()?);
        gpu += at.elapsed();
        let h = concat_residual(n, (&x, &xo), (&t, &to));
        let (loss, d_h) = head.step(&h, &labels, &train, (step, LR));
        let width = FEATURES + ORBITS;
        let d_x: Vec<f32> = (0..n * FEATURES)
            .map(|e| d_h[(e / FEATURES) * width + e % FEATURES])
            .collect();
        let d_t: Vec<f32> = (0..n * ORBITS)
            .map(|e| d_h[(e / ORBITS) * width + FEATURES + e % ORBITS])
            .collect();
        let at = Instant::now();
        let g = layer.backward(
            &xs,
            &ts,
            &graph,
            (
                &engine.upload(&d_x, &[n, FEATURES])?,
                &engine.upload(&d_t, &[n, ORBITS])?,
            ),
        )?;
        let grads: Vec<&Tensor> = g
            .d_weights
            .iter()
            .zip(&g.d_biases)
            .flat_map(|(w, b)| {
                w.iter()
                    .chain(b.iter().map(|b| b.as_ref().expect("biases")))
            })
            .collect();
        let grads: Vec<Vec<f32>> = grads
            .iter()
            .map(|t| t.to_host())
            .collect::<Result<_, _>>()?;
        gpu += at.elapsed();
        let all = params(&mut weights.features)
            .into_iter()
            .chain(params(&mut weights.topology));
        for ((p, grad), a) in all.zip(&grads).zip(&mut adam) {
            a.step(p, grad, LR, step);
        }
        layer.set_weights(&weights)?;
        if step == 1 || step % (steps / 8) == 0 || step == steps {
            let acc = head.accuracy(&h, &labels, &test);
            println!(
                "step {step:4}/{steps}: loss {loss:.4}, test accuracy {:.1}%  ({:.1} s)",
                100.0 * acc,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let out = layer.forward(&xs, &ts, &graph)?;
    let h = concat_residual(n, (&x, &out.x.to_host()?), (&t, &out.t.to_host()?));
    let gca_acc = head.accuracy(&h, &labels, &test);
    println!(
        "test accuracy: GCA {:.1}%, features alone {:.1}% ({} test nodes; chance {:.0}%); \
         {:.1} ms per step on the device (forward, backward, transfers)",
        100.0 * gca_acc,
        100.0 * base_acc,
        test.iter().filter(|&&x| x).count(),
        100.0 / CLASSES as f64,
        1e3 * gpu.as_secs_f64() / steps as f64
    );
    if gca_acc < base_acc + 0.10 {
        return Err(format!(
            "the GCA model ({:.1}%) did not beat the features alone ({:.1}%) by 10 points",
            100.0 * gca_acc,
            100.0 * base_acc
        )
        .into());
    }
    Ok(())
}
