//! `xattn graph` end to end: O and LSE written from .npy node features and an edge list (COO
//! edge_index int64, and CSR int32; edge features and heads averaged) against the f64 reference of the edge list within the
//! budget `xattn::cpu::budget::graph_budget` derives; bad files and indices as errors.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path as FsPath;
use std::process::{Command, Output};

use common::files::*;
use common::*;
use xattn::cpu::budget::{graph_budget, graph_stats_budget};
use xattn::cpu::graph_reference::{graph_attention, graph_stats, GraphDims, GraphTerms};

fn xattn(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xattn"))
        .args(args)
        .output()
        .expect("start the xattn binary")
}

fn s(p: &FsPath) -> String {
    p.to_str().expect("temp paths are UTF-8").to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const D: GraphDims = GraphDims {
    m: 30,
    n: 20,
    heads: 2,
    kv_heads: 1,
    d_k: 8,
    d_v: 6,
};

/// Writes q, k, v (3-D) of dims `d` and a bipartite edge list with duplicates and isolated
/// destinations (25..); returns the inputs and edges.
fn write_inputs_of(dir: &TempDir, d: GraphDims) -> ([Vec<f32>; 3], Vec<(usize, usize)>) {
    let q = random(d.m * d.heads * d.d_k, 1.0, 1);
    let k = random(d.n * d.kv_heads * d.d_k, 1.0, 2);
    let v = random(d.n * d.kv_heads * d.d_v, 1.0, 3);
    write_npy(&dir.path("q.npy"), &q, &[d.m, d.heads, d.d_k]);
    write_npy(&dir.path("k.npy"), &k, &[d.n, d.kv_heads, d.d_k]);
    write_npy(&dir.path("v.npy"), &v, &[d.n, d.kv_heads, d.d_v]);
    // Edge 0 appears twice.
    let mut edges: Vec<(usize, usize)> = (0..150).map(|e| ((e * 7) % d.n, (e * 11) % 25)).collect();
    edges.push(edges[0]);
    ([q, k, v], edges)
}

/// Writes `edges` as an edge_index [2, E] (int64).
fn write_edge_index(path: &FsPath, edges: &[(usize, usize)]) {
    let mut ei: Vec<i64> = edges.iter().map(|e| e.0 as i64).collect();
    ei.extend(edges.iter().map(|e| e.1 as i64));
    write_npy(path, &ei, &[2, edges.len()]);
}

fn write_inputs(dir: &TempDir) -> ([Vec<f32>; 3], Vec<(usize, usize)>) {
    write_inputs_of(dir, D)
}

fn base_args(dir: &TempDir) -> Vec<String> {
    let mut a = vec!["graph".to_string()];
    for (flag, file) in [("--q", "q.npy"), ("--k", "k.npy"), ("--v", "v.npy")] {
        a.push(flag.into());
        a.push(s(&dir.path(file)));
    }
    a.extend(["--out".into(), s(&dir.path("o.npy"))]);
    a.extend(["--lse".into(), s(&dir.path("lse.npy"))]);
    a
}

fn check_outputs(dir: &TempDir, qkv: &[Vec<f32>; 3], edges: &[(usize, usize)]) {
    check_outputs_of(dir, D, qkv, edges, GraphTerms::default());
}

fn check_outputs_of(
    dir: &TempDir,
    d: GraphDims,
    [q, k, v]: &[Vec<f32>; 3],
    edges: &[(usize, usize)],
    terms: GraphTerms,
) {
    let r = graph_attention(d, (q, k, v), edges, terms, 1.0 / (d.d_k as f64).sqrt());
    let max_degree = (0..d.m)
        .map(|i| edges.iter().filter(|e| e.1 == i).count())
        .max()
        .unwrap();
    let (tol_o, tol_lse) = graph_budget(
        (1.0 / (d.d_k as f32).sqrt(), d.d_k),
        (q, k, v),
        terms,
        max_degree,
    );
    let (o, o_shape) = read_npy::<f32>(&dir.path("o.npy"));
    let out_heads = if terms.mean_heads { 1 } else { d.heads };
    assert_eq!(o_shape, [d.m, out_heads, d.d_v]);
    assert_close("cli O", &o, &r.o, tol_o);
    let (lse, lse_shape) = read_npy::<f32>(&dir.path("lse.npy"));
    assert_eq!(lse_shape, [d.heads, d.m]);
    assert_close("cli LSE", &lse, &r.lse, tol_lse);
    assert_eq!(lse[d.m - 1], f32::NEG_INFINITY, "an isolated destination");
}

#[test]
fn graph_adds_edge_features_and_averages_heads() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("cli_graph_edge_attr");
    let d = GraphDims { d_v: 8, ..D };
    let (qkv, edges) = write_inputs_of(&dir, d);
    write_edge_index(&dir.path("edges.npy"), &edges);
    let features = random(edges.len() * d.heads * d.d_k, 0.5, 4);
    write_npy(
        &dir.path("edge_attr.npy"),
        &features,
        &[edges.len(), d.heads, d.d_k],
    );
    let mut args = base_args(&dir);
    args.extend([
        "--edge-index".into(),
        s(&dir.path("edges.npy")),
        "--edge-attr".into(),
        s(&dir.path("edge_attr.npy")),
        "--mean-heads".into(),
    ]);
    let out = xattn(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let terms = GraphTerms {
        edge_attr: Some(&features),
        mean_heads: true,
        ..GraphTerms::default()
    };
    check_outputs_of(&dir, d, &qkv, &edges, terms);
}

#[test]
fn graph_writes_statistics_per_destination_and_source() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("cli_graph_stats");
    let (qkv, edges) = write_inputs(&dir);
    write_edge_index(&dir.path("edges.npy"), &edges);
    let mut args = base_args(&dir);
    args.extend(["--edge-index".into(), s(&dir.path("edges.npy"))]);
    for stat in ["entropy", "focus", "coverage"] {
        args.extend([format!("--{stat}"), s(&dir.path(&format!("{stat}.npy")))]);
    }
    let out = xattn(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    check_outputs(&dir, &qkv, &edges);
    let [q, k, _] = &qkv;
    let scale = 1.0 / (D.d_k as f64).sqrt();
    let r = graph_stats(D, (q, k), &edges, GraphTerms::default(), scale);
    let degree = |side: fn(&(usize, usize)) -> usize, nodes: usize| {
        (0..nodes)
            .map(|i| edges.iter().filter(|e| side(e) == i).count())
            .max()
            .unwrap()
    };
    let (_, tol_lse) = graph_budget(
        (scale as f32, D.d_k),
        (q, k, &qkv[2]),
        GraphTerms::default(),
        degree(|e| e.1, D.m),
    );
    let (te, tf, tc) = graph_stats_budget(tol_lse, degree(|e| e.1, D.m), degree(|e| e.0, D.n));
    for (stat, want, tol, nodes) in [
        ("entropy", &r.entropy, te, D.m),
        ("focus", &r.focus, tf, D.m),
        ("coverage", &r.coverage, tc, D.n),
    ] {
        let (got, shape) = read_npy::<f32>(&dir.path(&format!("{stat}.npy")));
        assert_eq!(shape, [D.heads, nodes], "{stat}");
        assert_close(stat, &got, want, tol);
    }
}

#[test]
fn graph_writes_o_and_lse_from_an_edge_index() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("cli_graph_coo");
    let (qkv, edges) = write_inputs(&dir);
    write_edge_index(&dir.path("edges.npy"), &edges);
    let mut args = base_args(&dir);
    args.extend([
        "--edge-index".into(),
        s(&dir.path("edges.npy")),
        "--plan".into(),
    ]);
    let out = xattn(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("plan graph"), "{}", stderr(&out));
    check_outputs(&dir, &qkv, &edges);
}

#[test]
fn graph_reads_csr_and_splits_on_request() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("cli_graph_csr");
    let (qkv, mut edges) = write_inputs(&dir);
    // CSR by destination, in destination order (the reference sees the same multiset).
    edges.sort_by_key(|e| e.1);
    let mut row_ptr = vec![0i32; D.m + 1];
    for e in &edges {
        row_ptr[e.1 + 1] += 1;
    }
    for i in 0..D.m {
        row_ptr[i + 1] += row_ptr[i];
    }
    let col: Vec<i32> = edges.iter().map(|e| e.0 as i32).collect();
    write_npy(&dir.path("row_ptr.npy"), &row_ptr, &[D.m + 1]);
    write_npy(&dir.path("col_idx.npy"), &col, &[col.len()]);
    let mut args = base_args(&dir);
    args.extend([
        "--row-ptr".into(),
        s(&dir.path("row_ptr.npy")),
        "--col-idx".into(),
        s(&dir.path("col_idx.npy")),
        "--chunk-len".into(),
        "64".into(),
    ]);
    let out = xattn(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    check_outputs(&dir, &qkv, &edges);
}

#[test]
fn bad_edge_lists_are_errors_before_the_device() {
    let dir = TempDir::new("cli_graph_bad");
    write_inputs(&dir);
    // A source index past N.
    write_npy(&dir.path("edges.npy"), &[0i64, 20, 1, 2], &[2, 2]);
    let mut args = base_args(&dir);
    args.extend(["--edge-index".into(), s(&dir.path("edges.npy"))]);
    let out = xattn(&args);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("source index 20"), "{}", stderr(&out));
    assert!(!dir.path("o.npy").exists());
    // Not [2, E].
    write_npy(&dir.path("edges.npy"), &[0i64, 1, 2], &[3]);
    let out = xattn(&args);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("[2, E]"), "{}", stderr(&out));
    // No edge list at all: a usage error.
    let out = xattn(&base_args(&dir));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
