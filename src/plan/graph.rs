//! The planner of edge-list attention ([`crate::graph`]): one `graph_attention` dispatch over
//! whole neighbour lists, or, where the in-degrees are skewed or a list is longer than one
//! workgroup may walk on the device, over chunks of at most `chunk_len` edges followed by
//! `graph_merge`, the exact log-sum-exp merge of each destination's chunks (split-K for
//! graphs). The choice rests on the degree distribution and is explained by the plan's
//! `Display`. Heads averaged (PyG's `concat=False`) add `mean_heads` over the per-head O;
//! statistics add two `graph_stats` dispatches: by destination over the CSR, by source over
//! the transposed CSR built here on the host with the same counting sort.

use std::fmt;

use crate::cpu::graph_reference::GraphDims;
use crate::dtype::{DType, Storage};
use crate::error::{Error, Result};
use crate::kernels::graph_attention::{GraphAttention, GRAPH_MAX_SLOTS, GRAPH_WG};
use crate::kernels::graph_merge::GraphMerge;
use crate::kernels::graph_stats::GraphStats;
use crate::kernels::mean_heads::MeanHeads;
use crate::kernels::KernelSpec;
use crate::params::{graph_flags, AttnParams, GraphParams};
use crate::plan::check::{bytes, check_binding, check_grid, check_loops, fold_grid, limit_err};
use crate::plan::device::DeviceCaps;
use crate::program::{BufferId, Program};
use crate::shape::human_bytes;

/// A list no longer than this is never split for balance (a merge costs more than it saves).
pub const SPLIT_FLOOR: u64 = 1024;

/// A list longer than this many times the mean in-degree is split for balance, so that a hub
/// runs in several workgroups alongside the others.
pub const SPLIT_OVER_MEAN: u64 = 8;

/// What an edge-list attention asks for, as the planner needs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GraphRequest {
    /// Nodes, heads and head dims.
    pub dims: GraphDims,
    /// Logit scale.
    pub scale: f32,
    /// Element type of Q, K and V (O and LSE are f32).
    pub dtype: DType,
    /// Whether a per-edge, per-head bias is bound.
    pub bias: bool,
    /// Whether edge features `[E, heads, d]` are bound.
    pub edge_features: bool,
    /// Whether O is averaged over heads.
    pub mean_heads: bool,
    /// Whether the weights' entropy, focus and coverage are computed.
    pub stats: bool,
    /// A chunk length forced by the caller (a multiple of 64), which always splits; `None`
    /// for the planner's choice.
    pub chunk_len: Option<usize>,
}

/// The in-degree distribution the planner chooses from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Degrees {
    /// Edges.
    pub edges: u64,
    /// The largest in-degree.
    pub max: u64,
    /// The mean in-degree, E / M.
    pub mean: f64,
    /// Destinations without in-edges.
    pub isolated: u64,
}

impl Degrees {
    /// The distribution of the CSR row pointers `row_ptr` (M + 1 entries).
    pub fn of(row_ptr: &[u32]) -> Self {
        let m = row_ptr.len().saturating_sub(1).max(1);
        let degs = row_ptr.windows(2).map(|w| u64::from(w[1] - w[0]));
        let (max, isolated) = degs.fold((0, 0), |(max, iso), d| {
            (max.max(d), iso + u64::from(d == 0))
        });
        let edges = u64::from(*row_ptr.last().unwrap_or(&0));
        Self {
            edges,
            max,
            mean: edges as f64 / m as f64,
            isolated,
        }
    }
}

/// How the neighbour lists are cut into work items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphSplit {
    /// One workgroup per (destination, head) walks the whole list; no merge.
    Whole,
    /// Lists in chunks of at most `chunk_len` edges, one workgroup per (chunk, head), then
    /// `graph_merge`.
    Chunks {
        /// Edges per chunk (a multiple of 64).
        chunk_len: u64,
        /// Chunks in all.
        chunks: u64,
        /// Destinations with more than one chunk.
        hubs: u64,
        /// The most chunks of one destination.
        max_chunks: u64,
    },
}

/// The buffers of an edge-list attention's program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphIo {
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
    /// Each chunk's destination and first edge, `[chunks, 2]` u32 (absent when whole).
    pub chunks: BufferId,
    /// Each destination's first chunk, `[M + 1]` u32 (split only).
    pub chunk_ptr: Option<BufferId>,
    /// The bias `[E, heads]` in CSR order (absent when none).
    pub bias: BufferId,
    /// Edge features `[E, heads, d]` in CSR order (absent when none).
    pub edge_attr: BufferId,
    /// O `[1, M, heads, d_v]` (f32; `[1, M, 1, d_v]` with heads averaged).
    pub o: BufferId,
    /// LSE `[1, heads, M]` (f32).
    pub lse: BufferId,
    /// The statistics' buffers, where asked for.
    pub stats: Option<GraphStatsIo>,
}

/// The buffers of the statistics of an edge-list attention's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphStatsIo {
    /// The destination of each edge in CSR order, `[E]` u32.
    pub dst: BufferId,
    /// Each source's out-edges as CSR positions, `[E]` u32 (the transposed CSR).
    pub perm: BufferId,
    /// The transposed CSR's row pointers by source, `[N + 1]` u32.
    pub src_ptr: BufferId,
    /// Entropy `−Σ P ln P` per destination, `[1, heads, M]` (f32).
    pub entropy: BufferId,
    /// Focus `max P` per destination, `[1, heads, M]` (f32).
    pub focus: BufferId,
    /// Coverage `Σ P` per source over its out-edges, `[1, heads, N]` (f32).
    pub coverage: BufferId,
}

/// The transposed CSR of a CSR by destination (`row_ptr`, `col_idx` over `sources`): the
/// destination of each CSR position, each source's out-edges as CSR positions (a stable
/// counting sort by source) and their row pointers.
fn by_source(row_ptr: &[u32], col_idx: &[u32], sources: usize) -> [Vec<u32>; 3] {
    let dst: Vec<u32> = row_ptr
        .windows(2)
        .enumerate()
        .flat_map(|(i, w)| std::iter::repeat_n(i as u32, (w[1] - w[0]) as usize))
        .collect();
    let mut ptr = vec![0u32; sources + 1];
    for &j in col_idx {
        ptr[j as usize + 1] += 1;
    }
    for j in 0..sources {
        ptr[j + 1] += ptr[j];
    }
    let mut next = ptr.clone();
    let mut perm = vec![0u32; col_idx.len()];
    for (e, &j) in col_idx.iter().enumerate() {
        perm[next[j as usize] as usize] = e as u32;
        next[j as usize] += 1;
    }
    [dst, perm, ptr]
}

/// What an edge-list attention runs: its program, buffers and why it splits as it does.
#[derive(Clone, Debug)]
pub struct GraphPlan {
    /// The request.
    pub req: GraphRequest,
    /// How Q, K, V are read.
    pub storage: Storage,
    /// The in-degrees.
    pub degrees: Degrees,
    /// How lists are cut.
    pub split: GraphSplit,
    /// The longest list one workgroup may walk on this device (llvmpipe's loop cap), or
    /// `u64::MAX`.
    pub cap_len: u64,
    /// The longest list left whole for balance: max(SPLIT_FLOOR, SPLIT_OVER_MEAN × mean).
    pub balance_len: u64,
    /// The steps and buffers.
    pub program: Program,
    /// The buffers in `program`.
    pub io: GraphIo,
    chunk_table: Vec<u32>,
    chunk_ptr: Vec<u32>,
    /// dst, perm and src_ptr of the statistics (empty without).
    by_source: [Vec<u32>; 3],
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Q `[M, heads, d_k]`, K and V `[N, kv_heads, d]` of `dtype` declared as `program`'s inputs,
/// each first held to the device's binding limit (the forward's and the backward's planners).
pub(crate) fn qkv_inputs(
    program: &mut Program,
    s: GraphDims,
    dtype: DType,
    caps: &DeviceCaps,
) -> Result<(BufferId, BufferId, BufferId)> {
    let mut input = |name: &str, elems: usize| -> Result<BufferId> {
        let bytes = check_binding(
            &format!("{name} ({elems} elements)"),
            dtype.bytes(elems),
            caps,
        )?;
        Ok(program.input(name, bytes))
    };
    Ok((
        input("q", s.m * s.heads * s.d_k)?,
        input("k", s.n * s.kv_heads * s.d_k)?,
        input("v", s.n * s.kv_heads * s.d_v)?,
    ))
}

impl GraphPlan {
    /// Plans `req` over the graph whose CSR by destination is `row_ptr` (M + 1 entries) and
    /// `col_idx` (E sources), validated by [`crate::graph::Graph`].
    pub fn new(
        req: &GraphRequest,
        (row_ptr, col_idx): (&[u32], &[u32]),
        caps: &DeviceCaps,
    ) -> Result<Self> {
        let s = req.dims;
        if row_ptr.len() != s.m + 1 {
            return Err(Error::Shape(format!(
                "the graph has {} destinations but q has {} rows",
                row_ptr.len().saturating_sub(1),
                s.m
            )));
        }
        let slots = s.d_v.div_ceil(GRAPH_WG as usize) as u32;
        if slots > GRAPH_MAX_SLOTS {
            return Err(Error::Unsupported(format!(
                "edge-list attention takes value head dims up to {}, got {}",
                GRAPH_MAX_SLOTS * GRAPH_WG,
                s.d_v
            )));
        }
        let storage = Storage::of(req.dtype, caps.native_f16);
        let degrees = Degrees::of(row_ptr);
        let wg = u64::from(GRAPH_WG);
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
                },
            items: 0,
            max_len: 0,
            edges: degrees.edges as u32,
            offset: 0,
        };
        let spec = |split| GraphAttention {
            storage,
            slots,
            split,
        };
        let (cost, _) = spec(false).loop_cost(&params);
        let cap_len = caps.loop_len(&cost);
        if cap_len < wg {
            return Err(limit_err(
                format!("graph_attention: one tile of 64 edges at d_k = {}", s.d_k),
                cost.trips(wg),
                "loop iterations per invocation (Mesa llvmpipe ends loops past it)",
                caps.loop_cap.unwrap_or(0),
            ));
        }
        let balance_len = round_up(
            SPLIT_FLOOR.max((SPLIT_OVER_MEAN as f64 * degrees.mean).ceil() as u64),
            wg,
        );
        let chunk_len = match req.chunk_len {
            Some(c) => {
                let c = c as u64;
                if c == 0 || !c.is_multiple_of(wg) || c > cap_len {
                    return Err(Error::Argument(format!(
                        "chunk length {c} must be a positive multiple of {wg} and at most {} \
                         on this device",
                        cap_len.min(u64::from(u32::MAX)) / wg * wg
                    )));
                }
                c
            }
            None => cap_len.min(balance_len),
        };
        let split = if req.chunk_len.is_none() && degrees.max <= chunk_len {
            GraphSplit::Whole
        } else {
            let per = |d: u64| d.div_ceil(chunk_len);
            let degs = row_ptr.windows(2).map(|w| u64::from(w[1] - w[0]));
            GraphSplit::Chunks {
                chunk_len,
                chunks: degs.clone().map(per).sum(),
                hubs: degs.filter(|&d| per(d) > 1).count() as u64,
                max_chunks: per(degrees.max),
            }
        };

        let mut program = Program::new();
        let words = |n: u64| (n.max(1)) * 4;
        let (q, k, v) = qkv_inputs(&mut program, s, req.dtype, caps)?;
        let rp = program.input("row_ptr", words(s.m as u64 + 1));
        let ci = program.input(
            "col_idx",
            check_binding("col_idx", words(degrees.edges), caps)?,
        );
        // Per-edge inputs are checked against the device only where the call has them.
        let per_edge = |name: &str, width: usize, present: bool| -> Result<u64> {
            let bytes = (degrees.edges * width as u64 * 4).max(4);
            if present {
                check_binding(name, bytes, caps)
            } else {
                Ok(bytes)
            }
        };
        let bias = program.optional_input("bias", per_edge("bias", s.heads, req.bias)?, req.bias);
        let edge_attr = program.optional_input(
            "edge_attr",
            per_edge("edge_attr", s.heads * s.d_k, req.edge_features)?,
            req.edge_features,
        );
        let head_bytes = check_binding("o", bytes(s.m * s.heads * s.d_v), caps)?;
        let o = program.output(
            "o",
            bytes(s.m * s.d_v) * if req.mean_heads { 1 } else { s.heads as u64 },
        );
        // With heads averaged, the per-head O goes to scratch first.
        let o_heads = if req.mean_heads {
            program.scratch("o_heads", head_bytes)
        } else {
            o
        };
        let lse = program.output("lse", bytes(s.heads * s.m));
        let heads = check_grid("graph_attention heads", s.heads, caps)?;
        let grid_of = |items: u64| -> Result<[u32; 3]> {
            let most = u64::from(caps.max_workgroups);
            let x = items.clamp(1, most);
            let y = check_grid("graph_attention items", items.div_ceil(x) as usize, caps)?;
            Ok([x as u32, y, heads])
        };
        let (chunks, chunk_ptr, chunk_table, chunk_ptrs) = match split {
            GraphSplit::Whole => {
                let chunks = program.absent("chunks");
                params.items = s.m as u32;
                params.max_len = degrees.max as u32;
                program.dispatch(
                    spec(false),
                    &params,
                    grid_of(s.m as u64)?,
                    &[q, k, v, rp, ci, chunks, bias, edge_attr, o_heads, lse],
                );
                (chunks, None, Vec::new(), Vec::new())
            }
            GraphSplit::Chunks {
                chunk_len,
                chunks: n_chunks,
                max_chunks,
                ..
            } => {
                let (table, ptrs) = chunk_tables(row_ptr, chunk_len);
                let chunks = program.input(
                    "chunks",
                    check_binding("chunks", words(2 * n_chunks), caps)?,
                );
                let cp = program.input("chunk_ptr", words(s.m as u64 + 1));
                let part_elems = n_chunks as usize * s.heads * s.d_v;
                let o_parts = program.scratch(
                    "o_parts",
                    check_binding("o_parts", bytes(part_elems.max(1)), caps)?,
                );
                let stats = program.scratch(
                    "chunk_stats",
                    check_binding(
                        "chunk_stats",
                        bytes((2 * n_chunks as usize * s.heads).max(1)),
                        caps,
                    )?,
                );
                if n_chunks > 0 {
                    params.items = n_chunks as u32;
                    params.max_len = chunk_len as u32;
                    program.dispatch(
                        spec(true),
                        &params,
                        grid_of(n_chunks)?,
                        &[q, k, v, rp, ci, chunks, bias, edge_attr, o_parts, stats],
                    );
                }
                params.items = s.m as u32;
                params.max_len = max_chunks as u32;
                let grid = fold_grid("graph_merge", s.m * s.heads * s.d_v, caps)?;
                program.dispatch(
                    GraphMerge,
                    &params,
                    grid,
                    &[o_parts, stats, cp, o_heads, lse],
                );
                (chunks, Some(cp), table, ptrs)
            }
        };
        if req.mean_heads {
            // mean_heads reads O [M, heads, d_v] as weights [batch = M, heads, 1 × d_v].
            let p = AttnParams {
                batch: s.m as u32,
                q_heads: s.heads as u32,
                m: 1,
                n: s.d_v as u32,
                ..AttnParams::default()
            };
            let grid = fold_grid("mean_heads", s.m * s.d_v, caps)?;
            program.dispatch(MeanHeads, &p, grid, &[o_heads, o]);
        }
        let (stats, by_source) = if req.stats {
            let tables = by_source(row_ptr, col_idx, s.n);
            let max_out = tables[2].windows(2).map(|w| w[1] - w[0]).max();
            let stats = GraphStatsIo {
                dst: program.input("dst", words(degrees.edges)),
                perm: program.input("perm", words(degrees.edges)),
                src_ptr: program.input("src_ptr", words(s.n as u64 + 1)),
                entropy: program.output("entropy", bytes(s.heads * s.m)),
                focus: program.output("focus", bytes(s.heads * s.m)),
                coverage: program.output("coverage", bytes(s.heads * s.n)),
            };
            let no_dst = program.absent("dst");
            let no_perm = program.absent("perm");
            params.items = s.m as u32;
            params.max_len = degrees.max as u32;
            let by_dst = GraphStats {
                storage,
                by_source: false,
            };
            program.dispatch(
                by_dst,
                &params,
                grid_of(s.m as u64)?,
                &[
                    q,
                    k,
                    ci,
                    no_dst,
                    no_perm,
                    rp,
                    bias,
                    edge_attr,
                    lse,
                    stats.entropy,
                    stats.focus,
                ],
            );
            params.items = s.n as u32;
            params.max_len = max_out.unwrap_or(0);
            let by_src = GraphStats {
                storage,
                by_source: true,
            };
            // By source the kernel writes out_a only; focus fills the binding unwritten.
            program.dispatch(
                by_src,
                &params,
                grid_of(s.n as u64)?,
                &[
                    q,
                    k,
                    ci,
                    stats.dst,
                    stats.perm,
                    stats.src_ptr,
                    bias,
                    edge_attr,
                    lse,
                    stats.coverage,
                    stats.focus,
                ],
            );
            (Some(stats), tables)
        } else {
            (None, Default::default())
        };
        check_loops(&program, caps)?;
        Ok(Self {
            req: *req,
            storage,
            degrees,
            split,
            cap_len,
            balance_len,
            program,
            io: GraphIo {
                q,
                k,
                v,
                row_ptr: rp,
                col_idx: ci,
                chunks,
                chunk_ptr,
                bias,
                edge_attr,
                o,
                lse,
                stats,
            },
            chunk_table,
            chunk_ptr: chunk_ptrs,
            by_source,
        })
    }

    /// Heads of O: 1 when averaged, else the query heads.
    pub fn out_heads(&self) -> usize {
        if self.req.mean_heads {
            1
        } else {
            self.req.dims.heads
        }
    }

    /// The program.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The index inputs as words, by buffer: row pointers and column indices (at least one
    /// word each: a binding cannot be empty), and where split the chunk tables.
    pub fn index_inputs(&self, row_ptr: &[u32], col_idx: &[u32]) -> Vec<(BufferId, Vec<u32>)> {
        let at_least_one = |x: &[u32]| if x.is_empty() { vec![0] } else { x.to_vec() };
        let mut out = vec![
            (self.io.row_ptr, row_ptr.to_vec()),
            (self.io.col_idx, at_least_one(col_idx)),
        ];
        if let Some(cp) = self.io.chunk_ptr {
            out.push((self.io.chunks, at_least_one(&self.chunk_table)));
            out.push((cp, self.chunk_ptr.clone()));
        }
        if let Some(st) = self.io.stats {
            let [dst, perm, ptr] = &self.by_source;
            out.push((st.dst, at_least_one(dst)));
            out.push((st.perm, at_least_one(perm)));
            out.push((st.src_ptr, ptr.clone()));
        }
        out
    }

    /// Bytes the kernels move at the least: Q once, per edge and head one K and one V row and
    /// its index, O and LSE once (and the chunks' partials twice where split).
    pub fn bytes_moved(&self) -> u64 {
        let s = self.req.dims;
        let elem = self.req.dtype.size();
        let e = self.degrees.edges;
        let h = s.heads as u64;
        let mut b = (s.m * s.heads * s.d_k) as u64 * elem
            + e * h * ((s.d_k + s.d_v) as u64 * elem + 4)
            + (s.m as u64 + 1) * 4
            + (s.m * s.heads * (s.d_v + 1)) as u64 * 4;
        if self.req.bias {
            b += e * h * 4;
        }
        if self.req.edge_features {
            b += e * h * (s.d_k + s.d_v) as u64 * 4;
        }
        if self.req.mean_heads {
            b += (s.m * s.heads * s.d_v) as u64 * 4;
        }
        if let GraphSplit::Chunks { chunks, .. } = self.split {
            b += 2 * chunks * h * (s.d_v as u64 + 2) * 4;
        }
        b
    }
}

/// Each chunk's (destination, first edge) and each destination's first chunk, for lists cut
/// into chunks of `chunk_len` edges.
fn chunk_tables(row_ptr: &[u32], chunk_len: u64) -> (Vec<u32>, Vec<u32>) {
    let mut table = Vec::new();
    let mut ptr = Vec::with_capacity(row_ptr.len());
    ptr.push(0u32);
    for (dst, w) in row_ptr.windows(2).enumerate() {
        let mut e = u64::from(w[0]);
        while e < u64::from(w[1]) {
            table.extend([dst as u32, e as u32]);
            e += chunk_len;
        }
        ptr.push((table.len() / 2) as u32);
    }
    (table, ptr)
}

impl fmt::Display for GraphPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.req.dims;
        let d = &self.degrees;
        writeln!(
            f,
            "plan graph for {} destinations ← {} sources, {} edges ({:.3}% of M·N), heads {}/{} \
             kv, d_k {}, d_v {}",
            s.m,
            s.n,
            d.edges,
            100.0 * d.edges as f64 / (s.m as f64 * s.n as f64),
            s.heads,
            s.kv_heads,
            s.d_k,
            s.d_v
        )?;
        writeln!(
            f,
            "  in-degrees: max {}, mean {:.2}, {} isolated (output 0, LSE −∞)",
            d.max, d.mean, d.isolated
        )?;
        let cap = if self.cap_len == u64::MAX {
            "no loop cap on this device".to_string()
        } else {
            format!("the loop cap allows {} edges per workgroup", self.cap_len)
        };
        match self.split {
            GraphSplit::Whole => writeln!(
                f,
                "  split: none, one workgroup per (destination, head) over its whole list: the \
                 largest in-degree {} is within {} ({cap}; lists over max({SPLIT_FLOOR}, \
                 {SPLIT_OVER_MEAN} × mean) = {} are split for balance)",
                d.max,
                self.cap_len.min(self.balance_len),
                self.balance_len
            )?,
            GraphSplit::Chunks {
                chunk_len,
                chunks,
                hubs,
                max_chunks,
            } => {
                let why = if self.req.chunk_len.is_some() {
                    "forced by the call".to_string()
                } else if chunk_len == self.cap_len {
                    cap.clone()
                } else {
                    format!(
                        "the largest in-degree {} is over max({SPLIT_FLOOR}, {SPLIT_OVER_MEAN} × \
                         mean) = {}, {cap}",
                        d.max, self.balance_len
                    )
                };
                writeln!(
                    f,
                    "  split: lists in chunks of {chunk_len} edges ({why}): {chunks} chunks, {hubs} \
                     destinations in more than one (at most {max_chunks}), merged exactly by \
                     graph_merge"
                )?
            }
        }
        let terms: Vec<&str> = [
            (self.req.bias, "a bias per edge and head"),
            (
                self.req.edge_features,
                "edge features added to keys and values",
            ),
            (self.req.mean_heads, "O averaged over heads by mean_heads"),
            (
                self.req.stats,
                "entropy and focus per destination, coverage per source (graph_stats)",
            ),
        ]
        .into_iter()
        .filter_map(|(on, what)| on.then_some(what))
        .collect();
        if !terms.is_empty() {
            writeln!(f, "  with {}", terms.join(", "))?;
        }
        writeln!(
            f,
            "  dtype: q, k, v {} (read as {}), o f32; computed in f32",
            self.storage.dtype(),
            self.storage.name()
        )?;
        writeln!(
            f,
            "  bytes moved: {} (dense: would grow with M·N, this with E·d)",
            human_bytes(self.bytes_moved())
        )?;
        write!(f, "{}", self.program)
    }
}
