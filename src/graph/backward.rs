//! The backward of edge-list attention on the device: [`Engine::graph_attention_backward`],
//! [`Engine::prepare_graph_backward`] and [`Engine::graph_attention_backward_host`]. Planned by
//! [`crate::plan::graph_backward`].
//!
//! # Semantics
//! The gradients of `Σ dO ∘ O` for the forward call with the same Q, K, V, graph and options
//! ([`crate::graph`]), in the inputs' layouts: dQ `[1, M, heads, d_k]`, dK `[1, N, kv_heads,
//! d_k]` and dV `[1, N, kv_heads, d_v]` (K/V heads summed over the query heads that read them),
//! d edge features `[E, heads, d]` and d bias `[E, heads]` in the order the edges were given,
//! all f32. With `P_e` edge e's weight (rebuilt from the forward's LSE), `u_e = v_j + f_e` and
//! `D_i = Σ_e P_e·dO_i·u_e`: `dS_e = P_e·(dO_i·u_e − D_i)`, `dQ_i = scale·Σ_e dS_e·(k_j + f_e)`,
//! `dK_j = scale·Σ_e dS_e·q_i`, `dV_j = Σ_e P_e·dO_i`, `df_e = scale·dS_e·q_i + P_e·dO_i`,
//! `dbias_e = dS_e`. With heads averaged each head's dO is dO / heads. A removed edge (bias
//! ≤ −1e30) and a destination without kept edges have zero gradients. Nothing is accumulated
//! with float atomics: per destination, per edge and per source, one workgroup writes each.
//! Lists longer than the device's loop cap lets one workgroup walk (llvmpipe's) are walked in
//! passes over chunks whose sums add ([`crate::plan::graph_backward::GraphGradChunks`]).

use std::collections::HashMap;

use crate::call::Prepared;
use crate::dtype::DType;
use crate::engine::{dims4, same_dtype, Engine, Scratch};
use crate::error::{Error, Result};
use crate::gpu::executor::Bindings;
use crate::gpu::tensor::Tensor;
use crate::graph::{graph_request, upload_graph_inputs, Graph, GraphAttention, GraphHostOutput};
use crate::plan::graph_backward::GraphBackwardPlan;

/// Gradients of one edge-list attention on the device (f32), in the layouts of its inputs.
#[derive(Debug)]
pub struct GraphGrads {
    /// dQ `[1, M, heads, d_k]`.
    pub dq: Tensor,
    /// dK `[1, N, kv_heads, d_k]`.
    pub dk: Tensor,
    /// dV `[1, N, kv_heads, d_v]`.
    pub dv: Tensor,
    /// d edge features `[E, heads, d]` in the given edge order, where the call has them (a
    /// graph without edges gets one row that holds nothing: a tensor cannot be empty).
    pub d_edge_attr: Option<Tensor>,
    /// d bias `[E, heads]` in the given edge order, where the call has one (one empty row
    /// without edges, as d edge features).
    pub d_bias: Option<Tensor>,
}

/// [`GraphGrads`] on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphHostGrads {
    /// dQ.
    pub dq: Vec<f32>,
    /// dK.
    pub dk: Vec<f32>,
    /// dV.
    pub dv: Vec<f32>,
    /// d edge features, where the call has them.
    pub d_edge_attr: Option<Vec<f32>>,
    /// d bias, where the call has one.
    pub d_bias: Option<Vec<f32>>,
}

impl GraphGrads {
    /// The gradients on the host.
    pub fn to_host(&self) -> Result<GraphHostGrads> {
        Ok(GraphHostGrads {
            dq: self.dq.to_host()?,
            dk: self.dk.to_host()?,
            dv: self.dv.to_host()?,
            d_edge_attr: self.d_edge_attr.as_ref().map(Tensor::to_host).transpose()?,
            d_bias: self.d_bias.as_ref().map(Tensor::to_host).transpose()?,
        })
    }
}

impl Engine {
    /// What [`Engine::graph_attention_backward`] would run.
    pub fn plan_graph_backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        graph: &Graph,
        opts: &GraphAttention,
    ) -> Result<GraphBackwardPlan> {
        same_dtype(q, k, v)?;
        let dims = (dims4(q, "q")?, dims4(k, "k")?, dims4(v, "v")?);
        let req = graph_request(dims, q.dtype(), graph, opts)?;
        let ids = graph.edge_ids();
        GraphBackwardPlan::new(&req, (graph.row_ptr(), graph.col_idx(), &ids), self.caps())
    }

    /// Validates and plans the backward of one edge-list attention once and binds it to its
    /// inputs: Q, K, V, the graph and the options of the forward, the forward's O and LSE
    /// ([`Engine::graph_attention`]'s outputs, f32) and dO (like O, f32); new gradients and
    /// scratch of its own. See [`crate::graph::backward`] for the semantics.
    pub fn prepare_graph_backward(
        &self,
        qkv: (&Tensor, &Tensor, &Tensor),
        graph: &Graph,
        (o, lse): (&Tensor, &Tensor),
        d_o: &Tensor,
        opts: &GraphAttention,
    ) -> Result<Prepared<GraphGrads>> {
        self.bind_graph_backward(qkv, graph, (o, lse), d_o, opts, Scratch::Own)
    }

    /// The gradients of one edge-list attention (see [`crate::graph::backward`]):
    /// [`Engine::prepare_graph_backward`] and one run, with scratch from the engine's pool.
    pub fn graph_attention_backward(
        &self,
        qkv: (&Tensor, &Tensor, &Tensor),
        graph: &Graph,
        (o, lse): (&Tensor, &Tensor),
        d_o: &Tensor,
        opts: &GraphAttention,
    ) -> Result<GraphGrads> {
        self.bind_graph_backward(qkv, graph, (o, lse), d_o, opts, Scratch::Pool)?
            .finish()
    }

    /// Forward and backward on host slices (f32, dims as the tensors'): uploads, runs
    /// [`Engine::graph_attention`], then the backward of `d_o` (O's layout), downloads both.
    pub fn graph_attention_backward_host(
        &self,
        q: (&[f32], [usize; 4]),
        k: (&[f32], [usize; 4]),
        v: (&[f32], [usize; 4]),
        graph: &Graph,
        d_o: &[f32],
        opts: &GraphAttention,
    ) -> Result<(GraphHostOutput, GraphHostGrads)> {
        let ctx = self.context();
        let q = Tensor::upload(ctx, "q", q.0, &q.1)?;
        let k = Tensor::upload(ctx, "k", k.0, &k.1)?;
        let v = Tensor::upload(ctx, "v", v.0, &v.1)?;
        let out = self.graph_attention((&q, &k, &v), graph, opts)?;
        let d_o = Tensor::upload(ctx, "d_o", d_o, out.o.dims())?;
        let grads =
            self.graph_attention_backward((&q, &k, &v), graph, (&out.o, &out.lse), &d_o, opts)?;
        let host = GraphHostOutput {
            o: out.o.to_host()?,
            lse: out.lse.to_host()?,
            stats: out.stats.as_ref().map(|s| s.to_host()).transpose()?,
        };
        Ok((host, grads.to_host()?))
    }

    fn bind_graph_backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        graph: &Graph,
        (o, lse): (&Tensor, &Tensor),
        d_o: &Tensor,
        opts: &GraphAttention,
        scratch: Scratch,
    ) -> Result<Prepared<GraphGrads>> {
        let plan = self.plan_graph_backward((q, k, v), graph, opts)?;
        let s = plan.req.dims;
        let out_heads = if plan.req.mean_heads { 1 } else { s.heads };
        for (t, name, dims) in [
            (o, "o", vec![1, s.m, out_heads, s.d_v]),
            (d_o, "d_o", vec![1, s.m, out_heads, s.d_v]),
            (lse, "lse", vec![1, s.heads, s.m]),
        ] {
            if t.dims() != dims {
                return Err(Error::Shape(format!(
                    "{name} has dims {:?} but the call needs {dims:?}",
                    t.dims()
                )));
            }
            if t.dtype() != DType::F32 {
                return Err(Error::Argument(format!(
                    "{name} is {}; the forward writes O and LSE in f32 and dO comes in O's type",
                    t.dtype()
                )));
            }
        }
        let ctx = self.context();
        let e = graph.edges();
        let grads = GraphGrads {
            dq: Tensor::empty(ctx, "graph_dq", &[1, s.m, s.heads, s.d_k])?,
            dk: Tensor::empty(ctx, "graph_dk", &[1, s.n, s.kv_heads, s.d_k])?,
            dv: Tensor::empty(ctx, "graph_dv", &[1, s.n, s.kv_heads, s.d_v])?,
            d_edge_attr: match plan.io.d_edge_attr {
                // A tensor cannot be empty; with no edge it holds one unwritten element.
                Some(_) => Some(Tensor::empty(
                    ctx,
                    "graph_d_edge_attr",
                    &[e.max(1), s.heads, s.d_k],
                )?),
                None => None,
            },
            d_bias: match plan.io.d_bias {
                Some(_) => Some(Tensor::empty(ctx, "graph_d_bias", &[e.max(1), s.heads])?),
                None => None,
            },
        };
        let io = plan.io;
        let owned = upload_graph_inputs(
            ctx,
            graph,
            opts,
            plan.index_inputs(graph.row_ptr(), graph.col_idx()),
            (io.bias, io.edge_attr),
            (s.heads, s.d_k),
        )?;
        let mut tensors: Bindings = HashMap::from([
            (io.q, q),
            (io.k, k),
            (io.v, v),
            (io.lse, lse),
            (io.d_o, d_o),
            (io.dq, &grads.dq),
            (io.dk, &grads.dk),
            (io.dv, &grads.dv),
        ]);
        if let Some(id) = io.o {
            tensors.insert(id, o);
        }
        if let (Some(id), Some(t)) = (io.d_edge_attr, &grads.d_edge_attr) {
            tensors.insert(id, t);
        }
        if let (Some(id), Some(t)) = (io.d_bias, &grads.d_bias) {
            tensors.insert(id, t);
        }
        for (id, t) in &owned {
            tensors.insert(*id, t);
        }
        let bound = self.bind_program(plan.program(), &tensors, scratch)?;
        drop(tensors);
        Ok(Prepared::new(ctx, bound, None, grads))
    }
}
