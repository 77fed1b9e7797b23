//! `xattn graph`: attention over a graph's edge list on `.npy` files (semantics: the docs of
//! `xattn::graph`). Everything that can be checked on the host (files, shapes, indices) is
//! checked before a device is opened.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{ArgGroup, Args};
use xattn::{Context, DType, Engine, Graph, GraphAttention, Tensor};

use crate::npy::{read_bias, read_floats, read_indices, Array};
use crate::outputs::Outputs;
use crate::{parse_finite_f32, CliError, CliResult};

/// Options of `xattn graph`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("edges").required(true).args(["edge_index", "row_ptr"])))]
pub struct GraphArgs {
    /// Destination node features Q: [M, heads, d_k] (or [1, M, heads, d_k]), float32 or
    /// float16.
    #[arg(long, value_name = "FILE")]
    q: PathBuf,
    /// Source node keys K: [N, kv_heads, d_k] (or [1, N, kv_heads, d_k]), Q's type.
    #[arg(long, value_name = "FILE")]
    k: PathBuf,
    /// Source node values V: [N, kv_heads, d_v] (or [1, N, kv_heads, d_v]), Q's type.
    #[arg(long, value_name = "FILE")]
    v: PathBuf,
    /// The edges as PyTorch Geometric's edge_index [2, E] (int32 or int64): row 0 the
    /// sources (rows of K, V), row 1 the destinations (rows of Q), flow source → target.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["row_ptr", "col_idx"])]
    edge_index: Option<PathBuf>,
    /// The edges as CSR by destination: row pointers [M + 1] (int32 or int64); needs
    /// --col-idx.
    #[arg(long, value_name = "FILE", requires = "col_idx")]
    row_ptr: Option<PathBuf>,
    /// The source of each edge in CSR order [E] (int32 or int64); needs --row-ptr.
    #[arg(long, value_name = "FILE", requires = "row_ptr")]
    col_idx: Option<PathBuf>,
    /// An additive bias per edge and head [E, heads] (float32), in the order the edges are
    /// given; −inf (or ≤ −1e30) removes an edge.
    #[arg(long, value_name = "FILE")]
    bias: Option<PathBuf>,
    /// Edge features [E, heads, d] (float32 or float16, d = d_k = d_v), in the order the edges
    /// are given, added to each edge's key and value rows (PyG TransformerConv's projected
    /// edge_attr).
    #[arg(long, value_name = "FILE")]
    edge_attr: Option<PathBuf>,
    /// Average O over heads (PyG's concat=False): O [M, 1, d_v]; LSE stays per head.
    #[arg(long)]
    mean_heads: bool,
    /// Logit scale; default 1/sqrt(d_k).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_finite_f32)]
    scale: Option<f32>,
    /// Cut every neighbour list into chunks of this many edges (a multiple of 64), merged
    /// exactly, instead of the planner's choice.
    #[arg(long, value_name = "EDGES")]
    chunk_len: Option<usize>,
    /// Write O [M, heads, d_v] ([M, 1, d_v] with --mean-heads; float32; 4-D inputs give
    /// [1, M, heads, d_v]).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Write LSE [heads, M] (float32; −inf for a destination without in-edges).
    #[arg(long, value_name = "FILE")]
    lse: Option<PathBuf>,
    /// Write each destination's entropy −Σ P ln P of its weights over its in-edges
    /// [heads, M] (float32; 0 without in-edges).
    #[arg(long, value_name = "FILE")]
    entropy: Option<PathBuf>,
    /// Write each destination's focus max P over its in-edges [heads, M] (float32).
    #[arg(long, value_name = "FILE")]
    focus: Option<PathBuf>,
    /// Write each source's coverage Σ P over its out-edges [heads, N] (float32).
    #[arg(long, value_name = "FILE")]
    coverage: Option<PathBuf>,
    /// Print the plan (whole lists or chunks, and why) to stderr before running.
    #[arg(long)]
    plan: bool,
}

/// A node feature file as [1, rows, heads, d], and whether it had no batch axis.
fn node_dims(flag: &str, a: &Array) -> CliResult<([usize; 4], bool)> {
    match *a.shape.as_slice() {
        [r, h, d] => Ok(([1, r, h, d], true)),
        [1, r, h, d] => Ok(([1, r, h, d], false)),
        _ => Err(CliError::new(format!(
            "{flag} has shape {:?}; node features are [nodes, heads, d] (or [1, nodes, heads, d])",
            a.shape
        ))),
    }
}

/// Indices as u32, each checked to be in 0..=`max`.
fn indices(flag: &str, a: &[i64], max: u64) -> CliResult<Vec<u32>> {
    a.iter()
        .enumerate()
        .map(|(i, &x)| {
            u32::try_from(x)
                .ok()
                .filter(|&x| u64::from(x) <= max)
                .ok_or_else(|| CliError::new(format!("{flag}[{i}] = {x}; it must be in 0..={max}")))
        })
        .collect()
}

/// Reads the inputs and the graph, runs the edge-list attention, writes O (and LSE).
pub fn graph(args: &GraphArgs) -> CliResult<ExitCode> {
    let (q, dtype) = read_floats(args.q.as_path())?;
    let (k, kt) = read_floats(args.k.as_path())?;
    let (v, vt) = read_floats(args.v.as_path())?;
    if kt != dtype || vt != dtype {
        return Err(CliError::new(format!(
            "q, k and v must share one type; got q {dtype}, k {kt}, v {vt}"
        )));
    }
    let (qd, squeeze) = node_dims("--q", &q)?;
    let (kd, _) = node_dims("--k", &k)?;
    let (vd, _) = node_dims("--v", &v)?;
    let (m, n) = (qd[1], kd[1]);
    let graph = if let Some(path) = &args.edge_index {
        let e = read_indices(path.as_path())?;
        let [2, edges] = *e.shape.as_slice() else {
            return Err(CliError::new(format!(
                "--edge-index has shape {:?}; it must be [2, E] (sources, then destinations)",
                e.shape
            )));
        };
        let (src, dst) = e.data.split_at(edges);
        Graph::from_coo(n, m, src, dst)?
    } else {
        let (rp, ci) = (
            args.row_ptr.as_ref().expect("clap requires an edge list"),
            args.col_idx
                .as_ref()
                .expect("clap pairs --col-idx with --row-ptr"),
        );
        let (rp, ci) = (read_indices(rp.as_path())?, read_indices(ci.as_path())?);
        for (flag, a) in [("--row-ptr", &rp), ("--col-idx", &ci)] {
            if a.shape.len() != 1 {
                return Err(CliError::new(format!(
                    "{flag} has shape {:?}; it must be 1-D",
                    a.shape
                )));
            }
        }
        if rp.data.len() != m + 1 {
            return Err(CliError::new(format!(
                "--row-ptr has {} entries; q has {m} destinations, so it needs {}",
                rp.data.len(),
                m + 1
            )));
        }
        let row_ptr = indices("--row-ptr", &rp.data, u64::from(u32::MAX))?;
        let col_idx = indices("--col-idx", &ci.data, u64::from(u32::MAX))?;
        Graph::from_csr(n, row_ptr, col_idx)?
    };
    let mut opts = GraphAttention::default();
    if let Some(s) = args.scale {
        opts = opts.with_scale(s);
    }
    if let Some(c) = args.chunk_len {
        opts = opts.with_chunk_len(c);
    }
    if let Some(path) = &args.bias {
        let b = read_bias(path.as_path())?;
        if b.shape != [graph.edges(), qd[2]] {
            return Err(CliError::new(format!(
                "--bias has shape {:?}; it must be [E, heads] = [{}, {}]",
                b.shape,
                graph.edges(),
                qd[2]
            )));
        }
        opts = opts.with_bias(b.data);
    }
    if let Some(path) = &args.edge_attr {
        let (f, _) = read_floats(path.as_path())?;
        let want = [graph.edges(), qd[2], qd[3]];
        if f.shape != want {
            return Err(CliError::new(format!(
                "--edge-attr has shape {:?}; it must be [E, heads, d_k] = {want:?}",
                f.shape
            )));
        }
        opts = opts.with_edge_features(f.data);
    }
    if args.mean_heads {
        opts = opts.with_heads_averaged();
    }
    let stat_files = [
        ("--entropy", args.entropy.as_ref()),
        ("--focus", args.focus.as_ref()),
        ("--coverage", args.coverage.as_ref()),
    ];
    if stat_files.iter().any(|(_, f)| f.is_some()) {
        opts = opts.with_stats();
    }
    // The request is validated on the host before a device is opened.
    xattn::graph::graph_request((qd, kd, vd), dtype, &graph, &opts)?;
    let mut files = vec![("--out", Some(&args.out)), ("--lse", args.lse.as_ref())];
    files.extend(stat_files);
    let mut outputs = Outputs::create(&files)?;

    let ctx = Context::new()?;
    let engine = Engine::new(&ctx);
    let t0 = Instant::now();
    let up =
        |name, a: &Array, dims: [usize; 4]| Tensor::upload_as(&ctx, name, &a.data, &dims, dtype);
    let (qt, kt, vt) = (up("q", &q, qd)?, up("k", &k, kd)?, up("v", &v, vd)?);
    if args.plan {
        eprintln!("{}", engine.plan_graph((&qt, &kt, &vt), &graph, &opts)?);
    }
    let call = engine.prepare_graph((&qt, &kt, &vt), &graph, &opts)?;
    let t_run = Instant::now();
    call.run()?;
    let run_ms = t_run.elapsed().as_secs_f64() * 1e3;
    let out = call.into_output();
    let out_heads = if args.mean_heads { 1 } else { qd[2] };
    let o_dims: Vec<usize> = if squeeze {
        vec![m, out_heads, vd[3]]
    } else {
        vec![1, m, out_heads, vd[3]]
    };
    outputs.write(&args.out, &out.o.to_host()?, &o_dims)?;
    // [heads, nodes], with a batch axis where the inputs had one.
    let per_node = |nodes: usize| -> Vec<usize> {
        if squeeze {
            vec![qd[2], nodes]
        } else {
            vec![1, qd[2], nodes]
        }
    };
    if let Some(path) = &args.lse {
        outputs.write(path, &out.lse.to_host()?, &per_node(m))?;
    }
    if let Some(stats) = &out.stats {
        for (path, t, nodes) in [
            (&args.entropy, &stats.entropy, m),
            (&args.focus, &stats.focus, m),
            (&args.coverage, &stats.coverage, n),
        ] {
            if let Some(path) = path {
                outputs.write(path, &t.to_host()?, &per_node(nodes))?;
            }
        }
    }
    outputs.commit()?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    let types = if dtype == DType::F32 {
        "f32".to_string()
    } else {
        format!("{dtype}→f32")
    };
    eprintln!(
        "xattn: graph {m} ← {n} nodes, {} edges, H{}/{} d_k {} d_v {} {types} on {}: attention \
         {run_ms:.1} ms, with transfers and writes {total_ms:.1} ms",
        graph.edges(),
        qd[2],
        kd[2],
        qd[3],
        vd[3],
        ctx.describe()
    );
    Ok(ExitCode::SUCCESS)
}
