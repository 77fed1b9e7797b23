//! The planner of edge-list attention's backward ([`crate::graph`]'s gradients), without float
//! atomics: `grad_rowdot` (D = rowsum(dO ∘ O) per destination and head, from the forward's O;
//! skipped with heads averaged, where the per-head O is not kept and `graph_grad_q` sums
//! D = Σ P·dP over the edges itself), `graph_grad_q` (one workgroup per destination and head
//! over its in-edges: dQ, and per edge and head P, dS = d bias and d edge features, each edge
//! written by its one destination) and `graph_grad_kv` (one workgroup per source and K/V head
//! over its out-edges, the transposed CSR built here on the host: dK, dV from the P and dS
//! `graph_grad_q` wrote).
//!
//! A list longer than one workgroup may walk under the device's loop cap (llvmpipe's) is
//! walked in chunks, one pass (dispatch) per chunk over every list, later passes adding to the
//! earlier ones' dQ (or D), dK and dV: the LSE is given, so partial sums simply add, and the
//! passes run in order, so nothing needs atomics ([`GraphGradChunks`]). Only a device where
//! not even one tile of 64 edges fits refuses, with an
//! [`Error::Limit`](crate::error::Error::Limit) naming the cap.

use std::fmt;

use crate::dtype::Storage;
use crate::error::{Error, Result};
use crate::kernels::grad_rowdot::GradRowdot;
use crate::kernels::graph_attention::{GRAPH_MAX_SLOTS, GRAPH_WG};
use crate::kernels::graph_grad_kv::GraphGradKv;
use crate::kernels::graph_grad_q::GraphGradQ;
use crate::kernels::{KernelSpec, LoopCost};
use crate::params::{graph_flags, AttnParams, GraphParams};
use crate::plan::check::{bytes, check_binding, check_grid, check_loops, fold_grid, limit_err};
use crate::plan::device::DeviceCaps;
use crate::plan::graph::{qkv_inputs, Degrees, GraphRequest};
use crate::program::{BufferId, Program};

/// The buffers of an edge-list attention's backward program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphGradIo {
    /// Q `[1, M, heads, d_k]`.
    pub q: BufferId,
    /// K `[1, N, kv_heads, d_k]`.
    pub k: BufferId,
    /// V `[1, N, kv_heads, d_v]`.
    pub v: BufferId,
    /// CSR row pointers by destination, `[M + 1]` u32.
    pub row_ptr: BufferId,
    /// Source of each edge in CSR order, `[E]` u32.
    pub col_idx: BufferId,
    /// The given index of each edge in CSR order, `[E]` u32.
    pub edge_id: BufferId,
    /// The transposed CSR's row pointers by source, `[N + 1]` u32.
    pub src_ptr: BufferId,
    /// Each source's out-edges as (given index, destination), `[E, 2]` u32.
    pub out_edges: BufferId,
    /// The bias `[E, heads]` in CSR order (absent when none).
    pub bias: BufferId,
    /// Edge features `[E, heads, d]` in CSR order (absent when none).
    pub edge_attr: BufferId,
    /// The forward's O `[1, M, heads, d_v]` (f32); `None` with heads averaged (not read).
    pub o: Option<BufferId>,
    /// The forward's LSE `[1, heads, M]` (f32).
    pub lse: BufferId,
    /// dO, like O (`[1, M, 1, d_v]` with heads averaged; f32).
    pub d_o: BufferId,
    /// dQ `[1, M, heads, d_k]` (f32).
    pub dq: BufferId,
    /// dK `[1, N, kv_heads, d_k]` (f32).
    pub dk: BufferId,
    /// dV `[1, N, kv_heads, d_v]` (f32).
    pub dv: BufferId,
    /// d bias `[E, heads]` in the given edge order, where the call has a bias.
    pub d_bias: Option<BufferId>,
    /// d edge features `[E, heads, d]` in the given edge order, where the call has them.
    pub d_edge_attr: Option<BufferId>,
}

/// How the backward's kernels walk the lists, each as (chunk length, passes): one pass over
/// whole lists where the longest fits the device's loop cap, else chunks of the longest length
/// that fits (a multiple of 64), one pass per chunk, later passes adding to the earlier ones'
/// sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphGradChunks {
    /// `graph_grad_q`'s delta passes over in-edges (heads averaged only).
    pub delta: Option<(u64, u64)>,
    /// `graph_grad_q`'s passes over in-edges.
    pub q: (u64, u64),
    /// `graph_grad_kv`'s passes over out-edges (each walked once per query head of a K/V
    /// head).
    pub kv: (u64, u64),
}

/// The chunk length and passes over lists of at most `longest` edges for a kernel of loop
/// cost `cost` per edge walked, each edge walked `per` times: the longest list where it fits
/// the device's loop cap, else the longest multiple of 64 that fits (or `forced`, a multiple
/// of 64 within that). A device where not even 64 edges fit is an [`Error::Limit`].
fn passes(
    kernel: &str,
    cost: LoopCost,
    per: u64,
    longest: u64,
    forced: Option<u64>,
    caps: &DeviceCaps,
) -> Result<(u64, u64)> {
    let wg = u64::from(GRAPH_WG);
    let most = match caps.loop_len(&cost) {
        u64::MAX => u64::from(u32::MAX) / wg * wg,
        len => (len / per / wg * wg).min(u64::from(u32::MAX) / wg * wg),
    };
    if most < wg {
        return Err(limit_err(
            format!("{kernel}: one tile of {wg} edges"),
            cost.trips(wg * per),
            "loop iterations per invocation (Mesa llvmpipe ends loops past it)",
            caps.loop_cap.unwrap_or(0),
        ));
    }
    let chunk = match forced {
        Some(c) if c == 0 || !c.is_multiple_of(wg) || c > most => {
            return Err(Error::Argument(format!(
                "chunk length {c} must be a positive multiple of {wg} and at most {most} for \
                 {kernel} on this device"
            )))
        }
        Some(c) => c,
        None => longest.max(1).div_ceil(wg).saturating_mul(wg).min(most),
    };
    Ok((chunk, longest.div_ceil(chunk).max(1)))
}

/// `base` for pass `n` over chunks of `chunk` edges: its first edge, length, and
/// [`graph_flags::ACCUMULATE`] after the first.
fn pass_params(base: &GraphParams, n: u64, chunk: u64) -> GraphParams {
    let mut p = *base;
    p.offset = (n * chunk) as u32;
    p.max_len = chunk as u32;
    if n > 0 {
        p.flags |= graph_flags::ACCUMULATE;
    }
    p
}

/// What an edge-list attention's backward runs: its program, buffers and index tables.
#[derive(Clone, Debug)]
pub struct GraphBackwardPlan {
    /// The request (its `stats` and `chunk_len` play no part).
    pub req: GraphRequest,
    /// How Q, K, V are read.
    pub storage: Storage,
    /// The in-degrees.
    pub degrees: Degrees,
    /// The largest out-degree.
    pub max_out: u64,
    /// How the lists are walked: each kernel's chunk length and passes.
    pub chunks: GraphGradChunks,
    /// The steps and buffers.
    pub program: Program,
    /// The buffers in `program`.
    pub io: GraphGradIo,
    edge_id: Vec<u32>,
    src_ptr: Vec<u32>,
    out_edges: Vec<u32>,
}

/// Each source's out-edges as (given index, destination) pairs, by source (stable in CSR
/// order), and their row pointers `[N + 1]`.
fn out_edge_table(
    row_ptr: &[u32],
    col_idx: &[u32],
    edge_id: &[u32],
    sources: usize,
) -> (Vec<u32>, Vec<u32>) {
    let mut ptr = vec![0u32; sources + 1];
    for &j in col_idx {
        ptr[j as usize + 1] += 1;
    }
    for j in 0..sources {
        ptr[j + 1] += ptr[j];
    }
    let mut next = ptr.clone();
    let mut table = vec![0u32; 2 * col_idx.len()];
    for (i, w) in row_ptr.windows(2).enumerate() {
        for e in w[0] as usize..w[1] as usize {
            let at = &mut next[col_idx[e] as usize];
            table[2 * *at as usize] = edge_id[e];
            table[2 * *at as usize + 1] = i as u32;
            *at += 1;
        }
    }
    (table, ptr)
}

impl GraphBackwardPlan {
    /// Plans the backward of `req` over the graph whose CSR by destination is `row_ptr`
    /// (M + 1 entries) and `col_idx` (E sources), validated by [`crate::graph::Graph`], with
    /// `edge_id` the given index of each CSR position.
    pub fn new(
        req: &GraphRequest,
        (row_ptr, col_idx, edge_id): (&[u32], &[u32], &[u32]),
        caps: &DeviceCaps,
    ) -> Result<Self> {
        let s = req.dims;
        if row_ptr.len() != s.m + 1 || edge_id.len() != col_idx.len() {
            return Err(Error::Shape(format!(
                "the graph has {} destinations and {} edge ids for {} edges, q {} rows",
                row_ptr.len().saturating_sub(1),
                edge_id.len(),
                col_idx.len(),
                s.m
            )));
        }
        let slots = s.d_k.max(s.d_v).div_ceil(GRAPH_WG as usize) as u32;
        if slots > GRAPH_MAX_SLOTS {
            return Err(Error::Unsupported(format!(
                "the backward of edge-list attention takes head dims up to {}, got d_k {} d_v {}",
                GRAPH_MAX_SLOTS * GRAPH_WG,
                s.d_k,
                s.d_v
            )));
        }
        let storage = Storage::of(req.dtype, caps.native_f16);
        let degrees = Degrees::of(row_ptr);
        let (out_edges, src_ptr) = out_edge_table(row_ptr, col_idx, edge_id, s.n);
        let max_out = src_ptr
            .windows(2)
            .map(|w| u64::from(w[1] - w[0]))
            .max()
            .unwrap_or(0);
        let e = degrees.edges;
        let out_heads = if req.mean_heads { 1 } else { s.heads };

        let mut program = Program::new();
        let words = |n: u64| n.max(1) * 4;
        let (q, k, v) = qkv_inputs(&mut program, s, req.dtype, caps)?;
        let rp = program.input("row_ptr", words(s.m as u64 + 1));
        let ci = program.input("col_idx", check_binding("col_idx", words(e), caps)?);
        let eid = program.input("edge_id", words(e));
        let sp = program.input("src_ptr", words(s.n as u64 + 1));
        let oe = program.input("out_edges", check_binding("out_edges", words(2 * e), caps)?);
        let per_edge = check_binding("[E, heads] per-edge terms", words(e * s.heads as u64), caps)?;
        let bias = program.optional_input("bias", per_edge, req.bias);
        // Edge features are held to the device's limit only where the call has them.
        let feature_bytes = words(e * (s.heads * s.d_k) as u64);
        if req.edge_features {
            check_binding("edge features", feature_bytes, caps)?;
        }
        let edge_attr = program.optional_input("edge_attr", feature_bytes, req.edge_features);
        let o_bytes = check_binding("o", bytes(s.m * out_heads * s.d_v), caps)?;
        let o = (!req.mean_heads).then(|| program.input("o", o_bytes));
        let lse = program.input("lse", bytes(s.heads * s.m));
        let d_o = program.input("d_o", o_bytes);
        let dq = program.output("dq", bytes(s.m * s.heads * s.d_k));
        let dk = program.output("dk", bytes(s.n * s.kv_heads * s.d_k));
        let dv = program.output("dv", bytes(s.n * s.kv_heads * s.d_v));
        let d_bias = req.bias.then(|| program.output("d_bias", per_edge));
        let d_edge_attr = req
            .edge_features
            .then(|| program.output("d_edge_attr", feature_bytes));
        let p_edge = program.scratch("p_edge", per_edge);
        // dS is d bias: written into the output where the call has a bias.
        let ds_edge = d_bias.unwrap_or_else(|| program.scratch("ds_edge", per_edge));
        // Unwritten without edge features (a scratch word, not the shared read-only
        // placeholder, which a dispatch may also bind for reading).
        let df = d_edge_attr.unwrap_or_else(|| program.scratch("no_d_edge_attr", 4));

        let mut params = GraphParams {
            m: s.m as u32,
            n: s.n as u32,
            heads: s.heads as u32,
            kv_heads: s.kv_heads as u32,
            d_k: s.d_k as u32,
            d_v: s.d_v as u32,
            scale: req.scale,
            flags: if req.bias { graph_flags::BIAS } else { 0 }
                | if req.edge_features {
                    graph_flags::EDGE_FEATURES
                } else {
                    0
                }
                | if req.mean_heads {
                    graph_flags::MEAN_HEADS
                } else {
                    0
                },
            items: s.m as u32,
            max_len: 0,
            edges: e as u32,
            offset: 0,
        };
        let grid_of = |what: &str, items: u64, z: usize| -> Result<[u32; 3]> {
            let most = u64::from(caps.max_workgroups);
            let x = items.clamp(1, most);
            let y = check_grid(what, items.div_ceil(x) as usize, caps)?;
            Ok([x as u32, y, check_grid(what, z, caps)?])
        };

        // D per destination and head, [heads, M] as the LSE: from the forward's O, or summed
        // over the edges by graph_grad_q's delta passes with heads averaged.
        let delta = program.scratch("delta", bytes(s.heads * s.m));
        let mut chunks = GraphGradChunks {
            delta: None,
            q: (0, 0),
            kv: (0, 0),
        };
        let forced = req.chunk_len.map(|c| c as u64);
        let q_buffers = [
            q, k, v, rp, ci, eid, bias, edge_attr, lse, d_o, delta, dq, p_edge, ds_edge, df,
        ];
        let q_grid = grid_of("graph_grad_q destinations", s.m as u64, s.heads)?;
        let passes_of = |kernel: GraphGradQ, program: &mut Program| -> Result<(u64, u64)> {
            let (cost, _) = kernel.loop_cost(&params);
            let (chunk, passes) = passes("graph_grad_q", cost, 1, degrees.max, forced, caps)?;
            for n in 0..passes {
                let p = pass_params(&params, n, chunk);
                program.dispatch(kernel, &p, q_grid, &q_buffers);
            }
            Ok((chunk, passes))
        };
        match o {
            Some(o) => {
                let d_o32 = program.scratch("d_o_f32", o_bytes);
                let p = AttnParams {
                    batch: 1,
                    m: s.m as u32,
                    q_heads: s.heads as u32,
                    d_v: s.d_v as u32,
                    ..AttnParams::default()
                };
                let grid = fold_grid("grad_rowdot", s.m * s.heads, caps)?;
                let rowdot = GradRowdot {
                    storage: Storage::F32,
                };
                program.dispatch(rowdot, &p, grid, &[o, d_o, delta, d_o32]);
            }
            None => {
                let kernel = GraphGradQ {
                    storage,
                    slots,
                    delta_pass: true,
                };
                chunks.delta = Some(passes_of(kernel, &mut program)?);
            }
        }
        let kernel = GraphGradQ {
            storage,
            slots,
            delta_pass: false,
        };
        chunks.q = passes_of(kernel, &mut program)?;
        params.items = s.n as u32;
        let kernel = GraphGradKv { storage, slots };
        let (cost, _) = kernel.loop_cost(&params);
        let group = (s.heads / s.kv_heads) as u64;
        let (chunk, n_passes) = passes("graph_grad_kv", cost, group, max_out, forced, caps)?;
        let grid = grid_of("graph_grad_kv sources", s.n as u64, s.kv_heads)?;
        for n in 0..n_passes {
            let p = pass_params(&params, n, chunk);
            program.dispatch(kernel, &p, grid, &[q, d_o, sp, oe, p_edge, ds_edge, dk, dv]);
        }
        chunks.kv = (chunk, n_passes);
        check_loops(&program, caps)?;
        Ok(Self {
            req: *req,
            storage,
            degrees,
            max_out,
            chunks,
            program,
            io: GraphGradIo {
                q,
                k,
                v,
                row_ptr: rp,
                col_idx: ci,
                edge_id: eid,
                src_ptr: sp,
                out_edges: oe,
                bias,
                edge_attr,
                o,
                lse,
                d_o,
                dq,
                dk,
                dv,
                d_bias,
                d_edge_attr,
            },
            edge_id: edge_id.to_vec(),
            src_ptr,
            out_edges,
        })
    }

    /// The program.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The index inputs as words, by buffer (at least one word each: a binding cannot be
    /// empty): row pointers, column indices, edge ids and the transposed CSR.
    pub fn index_inputs(&self, row_ptr: &[u32], col_idx: &[u32]) -> Vec<(BufferId, Vec<u32>)> {
        let at_least_one = |x: &[u32]| if x.is_empty() { vec![0] } else { x.to_vec() };
        vec![
            (self.io.row_ptr, row_ptr.to_vec()),
            (self.io.col_idx, at_least_one(col_idx)),
            (self.io.edge_id, at_least_one(&self.edge_id)),
            (self.io.src_ptr, self.src_ptr.clone()),
            (self.io.out_edges, at_least_one(&self.out_edges)),
        ]
    }
}

impl fmt::Display for GraphBackwardPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.req.dims;
        writeln!(
            f,
            "plan graph backward for {} destinations ← {} sources, {} edges, heads {}/{} kv, \
             d_k {}, d_v {}",
            s.m, s.n, self.degrees.edges, s.heads, s.kv_heads, s.d_k, s.d_v
        )?;
        let c = self.chunks;
        let walk = |(chunk, passes): (u64, u64)| match passes {
            1 => "whole lists, 1 pass".to_string(),
            n => format!("chunks of {chunk} edges, {n} passes"),
        };
        writeln!(
            f,
            "  largest in-degree {}, largest out-degree {}; D from {}; graph_grad_q: {}; \
             graph_grad_kv: {}; P and dS stored per edge and head for graph_grad_kv",
            self.degrees.max,
            self.max_out,
            match c.delta {
                Some(d) => format!("the edges (heads averaged; {})", walk(d)),
                None => "O by grad_rowdot".to_string(),
            },
            walk(c.q),
            walk(c.kv)
        )?;
        write!(f, "{}", self.program)
    }
}
