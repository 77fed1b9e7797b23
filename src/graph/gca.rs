//! Graph cross-attention (GCA), the layer of GTAT (the seed's §5.3): two representations of
//! one node set, features X `[M, feature_dim]` and topology T `[M, topology_dim]` (each node's
//! graphlet-orbit counts, [`crate::graph::orbits`], or the caller's own), each updated from a
//! node's in-neighbours with attention weights computed from the *other*:
//!
//! - `X' = A(Q = T·W_Qᶠᵀ, K = T·W_Kᶠᵀ, V = X·W_Vᶠᵀ)·W_Oᶠᵀ` — features mixed by topological
//!   similarity (the *features* branch, [`Branch::Features`]);
//! - `T' = A(Q = X·W_Qᵗᵀ, K = X·W_Kᵗᵀ, V = T·W_Vᵗᵀ)·W_Oᵗᵀ` — topology mixed by feature
//!   similarity (the *topology* branch);
//!
//! each projection with its bias where the layer has them, A edge-list attention
//! ([`crate::graph`]) over the graph's edges with `heads` heads of `head_dim` (concatenated,
//! scale `1/√head_dim`), so work and memory grow with E·d. As `nn.MultiheadAttention`, the
//! layer has no residual, norm or activation: a model adds its own (GTAT's adds a
//! nonlinearity). The GTAT paper scores with GAT's additive attention; this layer uses
//! dot-product attention with projections as xattn's multi-head layer does.
//!
//! Gradients ([`GraphCrossAttention::backward`]) recompute the forward (nothing of it is
//! kept), then run each branch's output projection, attention and input projections backward
//! on the device; X and T each feed three projections, so their gradients are sums
//! ([`Engine::add_into`]). All in f32.

use crate::dtype::DType;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::gpu::tensor::Tensor;
use crate::graph::{Graph, GraphAttention, GraphOutput};
use crate::mha::{MhaWeights, Proj};

/// The sizes of a GCA layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcaConfig {
    /// Width of the node features X (and X').
    pub feature_dim: usize,
    /// Width of the topology features T (and T').
    pub topology_dim: usize,
    /// Attention heads of each branch.
    pub heads: usize,
    /// Width of each head.
    pub head_dim: usize,
    /// Whether every projection has a bias.
    pub bias: bool,
}

impl GcaConfig {
    /// A layer with biases.
    pub fn new(feature_dim: usize, topology_dim: usize, heads: usize, head_dim: usize) -> Self {
        Self {
            feature_dim,
            topology_dim,
            heads,
            head_dim,
            bias: true,
        }
    }

    /// With or without biases.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// `heads · head_dim`: the width of Q, K, V and the attention's output.
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// `[out, in]` of W^Q, W^K, W^V, W^O of `branch`.
    pub fn weight_dims(&self, branch: Branch) -> [[usize; 2]; 4] {
        let (sim, val) = branch.pick(self.feature_dim, self.topology_dim);
        let inner = self.inner();
        [[inner, sim], [inner, sim], [inner, val], [val, inner]]
    }

    fn validate(&self) -> Result<()> {
        for (name, x) in [
            ("feature_dim", self.feature_dim),
            ("topology_dim", self.topology_dim),
            ("heads", self.heads),
            ("head_dim", self.head_dim),
        ] {
            if x == 0 {
                return Err(Error::Shape(format!("a GCA layer needs {name} ≥ 1, got 0")));
            }
        }
        Ok(())
    }
}

/// The two branches of a GCA layer; the index of each in `[branch][projection]` arrays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Branch {
    /// Updates X with weights from T: W^Q, W^K read T, W^V reads X, W^O writes X'.
    Features = 0,
    /// Updates T with weights from X: W^Q, W^K read X, W^V reads T, W^O writes T'.
    Topology = 1,
}

impl Branch {
    /// Both, in index order.
    pub const ALL: [Branch; 2] = [Branch::Features, Branch::Topology];

    /// `(similarity input, value input)` of this branch, given X's and T's (tensors, widths):
    /// the features branch weighs by T and carries X, the topology branch the reverse.
    pub fn pick<T>(self, x: T, t: T) -> (T, T) {
        match self {
            Branch::Features => (t, x),
            Branch::Topology => (x, t),
        }
    }
}

/// A GCA layer's weights on the host: each branch's four projections in PyTorch `Linear`
/// layout (shapes: [`GcaConfig::weight_dims`]), with biases where the config has them.
#[derive(Clone, Debug, PartialEq)]
pub struct GcaWeights {
    /// The features branch's (X updated from T-similarity).
    pub features: MhaWeights,
    /// The topology branch's (T updated from X-similarity).
    pub topology: MhaWeights,
}

impl GcaWeights {
    /// The weights of `branch`.
    pub fn branch(&self, branch: Branch) -> &MhaWeights {
        match branch {
            Branch::Features => &self.features,
            Branch::Topology => &self.topology,
        }
    }

    /// Checks every length against `config`.
    pub fn check(&self, c: &GcaConfig) -> Result<()> {
        for branch in Branch::ALL {
            let w = self.branch(branch);
            for (proj, [out, inp]) in Proj::ALL.into_iter().zip(c.weight_dims(branch)) {
                let (data, bias) = w.get(proj);
                if data.len() != out * inp {
                    return Err(Error::Length {
                        name: "GCA weight",
                        shape: vec![out, inp],
                        expected: out * inp,
                        got: data.len(),
                    });
                }
                match (bias, c.bias) {
                    (Some(b), true) if b.len() != out => {
                        return Err(Error::Length {
                            name: "GCA bias",
                            shape: vec![out],
                            expected: out,
                            got: b.len(),
                        })
                    }
                    (None, true) | (Some(_), false) => {
                        return Err(Error::Argument(format!(
                            "the {branch:?} branch's {proj:?} projection {} a bias but the \
                             config says bias = {}",
                            if bias.is_some() { "has" } else { "lacks" },
                            c.bias
                        )))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// X' `[M, feature_dim]` and T' `[M, topology_dim]` (f32).
#[derive(Debug)]
pub struct GcaOutput {
    /// X'.
    pub x: Tensor,
    /// T'.
    pub t: Tensor,
}

/// The gradients of one GCA call (f32): of X and T, and of every weight and bias,
/// `[branch][projection]` ([`Branch`], [`Proj`] order), shaped as the weights.
#[derive(Debug)]
pub struct GcaGrads {
    /// ∂/∂X `[M, feature_dim]`.
    pub d_x: Tensor,
    /// ∂/∂T `[M, topology_dim]`.
    pub d_t: Tensor,
    /// ∂/∂W.
    pub d_weights: [[Tensor; 4]; 2],
    /// ∂/∂b, where the layer has biases.
    pub d_biases: [[Option<Tensor>; 4]; 2],
}

/// One branch's projections and attention: what its output projection reads and its
/// backward needs.
struct BranchActs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: GraphOutput,
}

/// A GCA layer with its weights (f32) on one device.
#[derive(Debug)]
pub struct GraphCrossAttention {
    engine: Engine,
    config: GcaConfig,
    weights: [[Tensor; 4]; 2],
    biases: [[Option<Tensor>; 4]; 2],
}

impl GraphCrossAttention {
    /// A layer with `weights` uploaded to `engine`'s device.
    pub fn new(engine: &Engine, config: GcaConfig, weights: &GcaWeights) -> Result<Self> {
        config.validate()?;
        weights.check(&config)?;
        let upload = |branch: Branch| {
            weights
                .branch(branch)
                .upload(engine.context(), config.weight_dims(branch), DType::F32)
        };
        let ((wf, bf), (wt, bt)) = (upload(Branch::Features)?, upload(Branch::Topology)?);
        Ok(Self {
            engine: engine.clone(),
            config,
            weights: [wf, wt],
            biases: [bf, bt],
        })
    }

    /// The layer's sizes.
    pub fn config(&self) -> &GcaConfig {
        &self.config
    }

    /// Writes new weights into the layer's device tensors (after an optimizer step).
    pub fn set_weights(&mut self, weights: &GcaWeights) -> Result<()> {
        weights.check(&self.config)?;
        for branch in Branch::ALL {
            let i = branch as usize;
            weights
                .branch(branch)
                .write_into((&self.weights[i], &self.biases[i]))?;
        }
        Ok(())
    }

    /// Checks X `[M, feature_dim]` and T `[M, topology_dim]` against the layer and a graph on
    /// their M nodes; returns M.
    fn check_inputs(&self, x: &Tensor, t: &Tensor, graph: &Graph) -> Result<usize> {
        let c = &self.config;
        let nodes = match (x.dims(), t.dims()) {
            ([m, fx], [mt, ft]) if *fx == c.feature_dim && *ft == c.topology_dim && m == mt => *m,
            _ => {
                return Err(Error::Shape(format!(
                    "a GCA layer reads x [M, {}] and t [M, {}] of one node set, got x {:?} \
                     and t {:?}",
                    c.feature_dim,
                    c.topology_dim,
                    x.dims(),
                    t.dims()
                )))
            }
        };
        if graph.destinations() != nodes || graph.sources() != nodes {
            return Err(Error::Shape(format!(
                "a GCA layer attends within one node set: the graph has {} destinations and {} \
                 sources but x and t have {nodes} nodes",
                graph.destinations(),
                graph.sources()
            )));
        }
        Ok(nodes)
    }

    fn opts(&self) -> GraphAttention {
        GraphAttention::default()
    }

    /// One branch's input projections and attention (its output projection is the caller's:
    /// the backward needs none).
    fn branch_attention(
        &self,
        branch: Branch,
        (x, t): (&Tensor, &Tensor),
        graph: &Graph,
    ) -> Result<BranchActs> {
        let (sim, val) = branch.pick(x, t);
        let c = &self.config;
        let heads = [1, x.dims()[0], c.heads, c.head_dim];
        let (w, b) = (
            &self.weights[branch as usize],
            &self.biases[branch as usize],
        );
        let proj = |p: Proj, input: &Tensor| {
            self.engine
                .linear(input, &w[p as usize], b[p as usize].as_ref())?
                .reshaped(&heads)
        };
        let (q, k, v) = (
            proj(Proj::Q, sim)?,
            proj(Proj::K, sim)?,
            proj(Proj::V, val)?,
        );
        let attn = self
            .engine
            .graph_attention((&q, &k, &v), graph, &self.opts())?;
        Ok(BranchActs { q, k, v, attn })
    }

    /// One branch's output: its attention's O `[1, M, heads, head_dim]` through W^O.
    fn branch_output(&self, branch: Branch, o: &Tensor) -> Result<Tensor> {
        let o = o.reshaped(&[o.dims()[1], self.config.inner()])?;
        let i = Proj::O as usize;
        let (w, b) = (
            &self.weights[branch as usize][i],
            &self.biases[branch as usize][i],
        );
        self.engine.linear(&o, w, b.as_ref())
    }

    /// X' and T' for features `x [M, feature_dim]` and topology `t [M, topology_dim]` (f32,
    /// f16 or bf16) along `graph`, a graph on their M nodes (destinations attend to their
    /// in-neighbours).
    pub fn forward(&self, x: &Tensor, t: &Tensor, graph: &Graph) -> Result<GcaOutput> {
        self.check_inputs(x, t, graph)?;
        let output = |branch| {
            let acts = self.branch_attention(branch, (x, t), graph)?;
            self.branch_output(branch, &acts.attn.o)
        };
        Ok(GcaOutput {
            x: output(Branch::Features)?,
            t: output(Branch::Topology)?,
        })
    }

    /// The gradients of `forward(x, t, graph)` for the gradients `d_x [M, feature_dim]` of X'
    /// and `d_t [M, topology_dim]` of T' (f32; zeros for an output the loss does not read).
    pub fn backward(
        &self,
        x: &Tensor,
        t: &Tensor,
        graph: &Graph,
        (d_x, d_t): (&Tensor, &Tensor),
    ) -> Result<GcaGrads> {
        let nodes = self.check_inputs(x, t, graph)?;
        let c = self.config;
        for (name, d, want) in [("d_x", d_x, c.feature_dim), ("d_t", d_t, c.topology_dim)] {
            if d.dims() != [nodes, want] {
                return Err(Error::Shape(format!(
                    "{name} must be [{nodes}, {want}] as the output it is the gradient of, got \
                     {:?}",
                    d.dims()
                )));
            }
        }
        let heads = [1, nodes, c.heads, c.head_dim];
        let flat = [nodes, c.inner()];
        let e = &self.engine;
        // Per branch: the input gradients of its similarity input (from W^Q and W^K) and of
        // its value input (from W^V), and its weights' and biases' gradients.
        let mut inputs = Vec::with_capacity(2);
        let (mut d_weights, mut d_biases) = (Vec::new(), Vec::new());
        for (branch, d_y) in [(Branch::Features, d_x), (Branch::Topology, d_t)] {
            let (sim, val) = branch.pick(x, t);
            let acts = self.branch_attention(branch, (x, t), graph)?;
            let w = &self.weights[branch as usize];
            let o = acts.attn.o.reshaped(&flat)?;
            let out = e.linear_backward(&o, &w[Proj::O as usize], d_y, c.bias)?;
            let g = e.graph_attention_backward(
                (&acts.q, &acts.k, &acts.v),
                graph,
                (&acts.attn.o, &acts.attn.lse),
                &out.dx.reshaped(&heads)?,
                &self.opts(),
            )?;
            let gq =
                e.linear_backward(sim, &w[Proj::Q as usize], &g.dq.reshaped(&flat)?, c.bias)?;
            let gk =
                e.linear_backward(sim, &w[Proj::K as usize], &g.dk.reshaped(&flat)?, c.bias)?;
            let gv =
                e.linear_backward(val, &w[Proj::V as usize], &g.dv.reshaped(&flat)?, c.bias)?;
            e.add_into(&gq.dx, &gk.dx)?;
            inputs.push((gq.dx, gv.dx));
            d_biases.push([gq.db, gk.db, gv.db, out.db]);
            d_weights.push([gq.dw, gk.dw, gv.dw, out.dw]);
        }
        let [(d_t_sim, d_x_val), (d_x_sim, d_t_val)]: [(Tensor, Tensor); 2] =
            inputs.try_into().expect("two branches");
        e.add_into(&d_x_sim, &d_x_val)?;
        e.add_into(&d_t_sim, &d_t_val)?;
        Ok(GcaGrads {
            d_x: d_x_sim,
            d_t: d_t_sim,
            d_weights: d_weights.try_into().expect("two branches"),
            d_biases: d_biases.try_into().expect("two branches"),
        })
    }
}
