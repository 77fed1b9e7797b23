//! `xattn bench --graph`: edge-list attention against the fused path with the equivalent
//! dense bool mask, side by side in one sitting, on random graphs of given densities with
//! uniform and power-law in-degrees (unique edges, so that a mask holds the same graph).

use std::process::ExitCode;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use xattn::{Attention, Context, Engine, Graph, GraphAttention, Path, Prepared};

use super::BenchArgs;
use crate::{CliError, CliResult};

/// How in-degrees are drawn.
#[derive(Clone, Copy, Debug)]
enum Degrees {
    /// Every destination density·N in-edges (±10%).
    Uniform,
    /// Destination i ∝ 1/(i + 1)^0.8, capped at N, scaled to E in all.
    PowerLaw,
}

/// The in-degrees of `m` destinations over `n` sources with `edges` in all.
fn degrees(kind: Degrees, m: usize, n: usize, edges: usize, rng: &mut impl Rng) -> Vec<usize> {
    match kind {
        Degrees::Uniform => {
            let mean = edges as f64 / m as f64;
            (0..m)
                .map(|_| ((mean * rng.random_range(0.9..1.1)).round() as usize).min(n))
                .collect()
        }
        Degrees::PowerLaw => {
            let of = |c: f64| -> Vec<usize> {
                (0..m)
                    .map(|i| ((c / ((i + 1) as f64).powf(0.8)).ceil() as usize).min(n))
                    .collect()
            };
            // The scale c whose degrees sum to `edges`, by bisection.
            let (mut lo, mut hi) = (0.0f64, edges as f64);
            for _ in 0..60 {
                let c = 0.5 * (lo + hi);
                if of(c).iter().sum::<usize>() < edges {
                    lo = c;
                } else {
                    hi = c;
                }
            }
            of(hi)
        }
    }
}

/// A CSR graph with these in-degrees, distinct sources per destination.
fn graph_of(degs: &[usize], n: usize, rng: &mut impl Rng) -> CliResult<Graph> {
    let mut row_ptr = vec![0u32];
    let mut col_idx = Vec::with_capacity(degs.iter().sum());
    for &d in degs {
        let mut picked: Vec<u32> = rand::seq::index::sample(rng, n, d)
            .into_iter()
            .map(|j| j as u32)
            .collect();
        picked.sort_unstable();
        col_idx.extend(picked);
        row_ptr.push(col_idx.len() as u32);
    }
    Ok(Graph::from_csr(n, row_ptr, col_idx)?)
}

/// Median milliseconds of `runs` waited runs after `warmup`.
fn time<O>(call: &Prepared<O>, warmup: u32, runs: u32) -> CliResult<f64> {
    for _ in 0..warmup {
        call.run()?;
    }
    let mut ms: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            call.run().map(|()| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// The largest |O − reference| of the graph's and the dense path's O over 64 destinations
/// spread over M (every head), the f64 reference computed from the graph's edges.
fn sample_errors(
    graph: &Graph,
    (q, k, v): (&[f32], &[f32], &[f32]),
    [heads, dk, dv]: [usize; 3],
    (graph_o, dense_o): (&[f32], &[f32]),
) -> (f64, f64) {
    let m = graph.destinations();
    let scale = 1.0 / (dk as f64).sqrt();
    let (mut eg, mut ed) = (0.0f64, 0.0f64);
    for i in (0..m).step_by(m.div_ceil(64)) {
        let (a, b) = (graph.row_ptr()[i] as usize, graph.row_ptr()[i + 1] as usize);
        for h in 0..heads {
            let qrow = &q[(i * heads + h) * dk..][..dk];
            let logits: Vec<(usize, f64)> = graph.col_idx()[a..b]
                .iter()
                .map(|&j| {
                    let krow = &k[(j as usize * heads + h) * dk..][..dk];
                    let dot: f64 = qrow
                        .iter()
                        .zip(krow)
                        .map(|(&x, &y)| f64::from(x) * f64::from(y))
                        .sum();
                    (j as usize, dot * scale)
                })
                .collect();
            let max = logits.iter().map(|l| l.1).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|l| (l.1 - max).exp()).sum();
            for d in 0..dv {
                let want: f64 = logits
                    .iter()
                    .map(|&(j, l)| (l - max).exp() / sum * f64::from(v[(j * heads + h) * dv + d]))
                    .sum();
                let at = (i * heads + h) * dv + d;
                eg = eg.max((f64::from(graph_o[at]) - want).abs());
                ed = ed.max((f64::from(dense_o[at]) - want).abs());
            }
        }
    }
    (eg, ed)
}

/// `xattn bench --graph`.
pub fn bench(args: &BenchArgs) -> CliResult<ExitCode> {
    let m = args.m.unwrap_or(16_384);
    let n = args.n.unwrap_or(m);
    let heads = args.heads.unwrap_or(1);
    let dk = args.dk.unwrap_or(64);
    let dv = args.dv.unwrap_or(dk);
    let (warmup, runs) = (args.warmup.unwrap_or(1), args.runs.unwrap_or(3));
    if args.batch.is_some_and(|b| b != 1) {
        return Err(CliError::usage("--graph takes batch 1"));
    }
    let ctx = Context::new()?;
    let engine = Engine::new(&ctx);
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut draw =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let (qh, kh, vh) = (
        draw(m * heads * dk),
        draw(n * heads * dk),
        draw(n * heads * dv),
    );
    let q = engine.upload(&qh, &[1, m, heads, dk])?;
    let k = engine.upload(&kh, &[1, n, heads, dk])?;
    let v = engine.upload(&vh, &[1, n, heads, dv])?;
    println!(
        "graph bench on {}: M {m}, N {n}, heads {heads}, d_k {dk}, d_v {dv}, f32; median of \
         {runs} waited runs (host clock) after {warmup} warm-up",
        ctx.describe()
    );
    println!(
        "{:>8} {:>9} {:>10} {:>8} {:>10} {:>10} {:>10} {:>7} {:>11} {:>11} {:>9} {:>9}  graph plan",
        "density",
        "degrees",
        "edges",
        "max deg",
        "graph ms",
        "+stats ms",
        "dense ms",
        "speedup",
        "graph MB",
        "dense MB",
        "err graph",
        "err dense"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed + 1);
    for &density in &args.densities {
        if !(density > 0.0 && density <= 1.0) {
            return Err(CliError::usage(format!(
                "--densities {density}: a density is in (0, 1]"
            )));
        }
        for kind in [Degrees::Uniform, Degrees::PowerLaw] {
            let edges = ((m * n) as f64 * density).round() as usize;
            let degs = degrees(kind, m, n, edges, &mut rng);
            let graph = graph_of(&degs, n, &mut rng)?;
            let opts = GraphAttention::default();
            let plan = engine.plan_graph((&q, &k, &v), &graph, &opts)?;
            let call = engine.prepare_graph((&q, &k, &v), &graph, &opts)?;
            let graph_ms = time(&call, warmup, runs)?;
            let graph_o = call.output().o.to_host()?;
            drop(call);
            // With entropy, focus and coverage over the edges (graph_stats by destination and
            // by source).
            let stats = engine.prepare_graph((&q, &k, &v), &graph, &opts.clone().with_stats())?;
            let stats_ms = time(&stats, warmup, runs)?;
            drop(stats);
            // The same graph as a dense bool mask [1, 1, M, N] through the fused path.
            let mut mask = vec![false; m * n];
            for (i, w) in graph.row_ptr().windows(2).enumerate() {
                for &j in &graph.col_idx()[w[0] as usize..w[1] as usize] {
                    mask[i * n + j as usize] = true;
                }
            }
            let dense_opts = Attention::default()
                .with_mask([1, 1, m, n], mask)
                .with_path(Path::Fused);
            let dense = engine.prepare(&q, &k, &v, &dense_opts)?;
            let dense_ms = time(&dense, warmup, runs)?;
            let dense_o = dense.o().to_host()?;
            drop(dense);
            // Each against the f64 reference on 64 sampled destinations.
            let (err_graph, err_dense) = sample_errors(
                &graph,
                (&qh, &kh, &vh),
                [heads, dk, dv],
                (&graph_o, &dense_o),
            );
            let mb = |b: u64| b as f64 / 1e6;
            // The dense path's least traffic: Q, K, V, O once and the mask bits.
            let dense_bytes =
                ((m * heads * (dk + dv) + n * heads * (dk + dv)) * 4 + m * n / 8) as u64;
            let split = match plan.split {
                xattn::plan::graph::GraphSplit::Whole => "whole lists".to_string(),
                xattn::plan::graph::GraphSplit::Chunks {
                    chunk_len, chunks, ..
                } => format!("{chunks} chunks of ≤ {chunk_len}"),
            };
            println!(
                "{:>7.1}% {:>9} {:>10} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>6.2}× {:>11.1} {:>11.1} {:>9.1e} {:>9.1e}  {split}",
                100.0 * density,
                match kind {
                    Degrees::Uniform => "uniform",
                    Degrees::PowerLaw => "power-law",
                },
                graph.edges(),
                plan.degrees.max,
                graph_ms,
                stats_ms,
                dense_ms,
                dense_ms / graph_ms,
                mb(plan.bytes_moved()),
                mb(dense_bytes),
                err_graph,
                err_dense,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
