//! The reference of the graph cross-attention layer ([`crate::graph::gca`]): naive, f64, built
//! from the edge-list references ([`graph_reference`], [`graph_grad_reference`]) and the
//! projections' ([`crate::cpu::reference::linear`], its backward), sharing nothing with the
//! kernels. Its backward is checked against central
//! differences of its forward (tests/gca.rs).

use crate::cpu::graph_grad_reference::graph_attention_backward;
use crate::cpu::graph_reference::{graph_attention, GraphDims, GraphTerms};
use crate::cpu::reference::{linear, linear_backward};
use crate::graph::gca::{Branch, GcaConfig, GcaWeights};
use crate::mha::Proj;

/// A layer's weights in f64, `[branch][projection]` (PyTorch `Linear` layout, `[out, in]`).
#[derive(Clone, Debug, PartialEq)]
pub struct GcaWeights64 {
    /// W^Q, W^K, W^V, W^O of each branch.
    pub w: [[Vec<f64>; 4]; 2],
    /// Their biases, where the layer has them.
    pub b: [[Option<Vec<f64>>; 4]; 2],
}

impl From<&GcaWeights> for GcaWeights64 {
    fn from(weights: &GcaWeights) -> Self {
        let widen = |x: &[f32]| x.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
        let branch = |b: Branch| {
            let m = weights.branch(b);
            let w = Proj::ALL.map(|p| widen(m.get(p).0));
            let b = Proj::ALL.map(|p| m.get(p).1.map(widen));
            (w, b)
        };
        let ((wf, bf), (wt, bt)) = (branch(Branch::Features), branch(Branch::Topology));
        Self {
            w: [wf, wt],
            b: [bf, bt],
        }
    }
}

/// The layer's outputs: X' `[M, feature_dim]` and T' `[M, topology_dim]`.
#[derive(Clone, Debug)]
pub struct GcaReference {
    /// X'.
    pub x: Vec<f64>,
    /// T'.
    pub t: Vec<f64>,
}

/// The layer's gradients for the output gradients given: of X and T, and of every weight and
/// bias (`[branch][projection]`).
#[derive(Clone, Debug)]
pub struct GcaGrads64 {
    /// ∂/∂X `[M, feature_dim]`.
    pub d_x: Vec<f64>,
    /// ∂/∂T `[M, topology_dim]`.
    pub d_t: Vec<f64>,
    /// ∂/∂W, as [`GcaWeights64::w`].
    pub d_w: [[Vec<f64>; 4]; 2],
    /// ∂/∂b, where the layer has biases.
    pub d_b: [[Option<Vec<f64>>; 4]; 2],
    /// The gradients of each projection's output (`[M, out]`; a bias's gradient is their
    /// column sums), as [`GcaWeights64::w`].
    pub d_projected: [[Vec<f64>; 4]; 2],
}

/// An input with its width.
type Input<'a> = (&'a [f64], usize);

/// What one branch reads, with widths: the input its weights come from (similarity) and the
/// one it carries (values).
fn branch_inputs<'a>(
    c: &GcaConfig,
    branch: Branch,
    (x, t): (&'a [f64], &'a [f64]),
) -> (Input<'a>, Input<'a>) {
    branch.pick((x, c.feature_dim), (t, c.topology_dim))
}

fn dims(c: &GcaConfig, nodes: usize) -> GraphDims {
    GraphDims {
        m: nodes,
        n: nodes,
        heads: c.heads,
        kv_heads: c.heads,
        d_k: c.head_dim,
        d_v: c.head_dim,
    }
}

/// One branch forward: Q, K, V, the attention's O `[M, inner]` and the output.
fn branch_forward(
    c: &GcaConfig,
    branch: Branch,
    xt: (&[f64], &[f64]),
    edges: &[(usize, usize)],
    w: &GcaWeights64,
) -> [Vec<f64>; 5] {
    let ((sim, sim_dim), (val, val_dim)) = branch_inputs(c, branch, xt);
    let (ws, bs) = (&w.w[branch as usize], &w.b[branch as usize]);
    let proj =
        |p: Proj, x: &[f64], in_dim| linear(x, &ws[p as usize], bs[p as usize].as_deref(), in_dim);
    let q = proj(Proj::Q, sim, sim_dim);
    let k = proj(Proj::K, sim, sim_dim);
    let v = proj(Proj::V, val, val_dim);
    let scale = 1.0 / (c.head_dim as f64).sqrt();
    let nodes = sim.len() / sim_dim;
    let o = graph_attention(
        dims(c, nodes),
        (&q[..], &k[..], &v[..]),
        edges,
        GraphTerms::default(),
        scale,
    )
    .o;
    let y = proj(Proj::O, &o, c.inner());
    [q, k, v, o, y]
}

/// The layer's forward on `x [M, feature_dim]` and `t [M, topology_dim]` along `edges`
/// (`(source, destination)` pairs on one node set).
pub fn gca_forward(
    c: &GcaConfig,
    (x, t): (&[f64], &[f64]),
    edges: &[(usize, usize)],
    w: &GcaWeights64,
) -> GcaReference {
    let [.., xo] = branch_forward(c, Branch::Features, (x, t), edges, w);
    let [.., to] = branch_forward(c, Branch::Topology, (x, t), edges, w);
    GcaReference { x: xo, t: to }
}

/// The gradients of `Σ d_x∘X' + Σ d_t∘T'` for [`gca_forward`]'s call.
pub fn gca_backward(
    c: &GcaConfig,
    (x, t): (&[f64], &[f64]),
    edges: &[(usize, usize)],
    w: &GcaWeights64,
    (d_xo, d_to): (&[f64], &[f64]),
) -> GcaGrads64 {
    let mut g = GcaGrads64 {
        d_x: vec![0.0; x.len()],
        d_t: vec![0.0; t.len()],
        d_w: Default::default(),
        d_b: Default::default(),
        d_projected: Default::default(),
    };
    let nodes = x.len() / c.feature_dim;
    let scale = 1.0 / (c.head_dim as f64).sqrt();
    for (branch, d_y) in [(Branch::Features, d_xo), (Branch::Topology, d_to)] {
        let [q, k, v, o, _] = branch_forward(c, branch, (x, t), edges, w);
        let ((sim, sim_dim), (val, val_dim)) = branch_inputs(c, branch, (x, t));
        let ws = &w.w[branch as usize];
        let (d_o, dwo, dbo) = linear_backward(&o, &ws[Proj::O as usize], d_y, c.inner());
        let gg = graph_attention_backward(
            dims(c, nodes),
            (&q[..], &k[..], &v[..]),
            edges,
            GraphTerms::default(),
            scale,
            &d_o,
        );
        let (dsq, dwq, dbq) = linear_backward(sim, &ws[Proj::Q as usize], &gg.dq, sim_dim);
        let (dsk, dwk, dbk) = linear_backward(sim, &ws[Proj::K as usize], &gg.dk, sim_dim);
        let (dval, dwv, dbv) = linear_backward(val, &ws[Proj::V as usize], &gg.dv, val_dim);
        let (d_sim, d_val) = match branch {
            Branch::Features => (&mut g.d_t, &mut g.d_x),
            Branch::Topology => (&mut g.d_x, &mut g.d_t),
        };
        for (acc, (a, b)) in d_sim.iter_mut().zip(dsq.iter().zip(&dsk)) {
            *acc += a + b;
        }
        for (acc, a) in d_val.iter_mut().zip(&dval) {
            *acc += a;
        }
        let has_bias = w.b[branch as usize][0].is_some();
        g.d_w[branch as usize] = [dwq, dwk, dwv, dwo];
        g.d_b[branch as usize] = [dbq, dbk, dbv, dbo].map(|db| has_bias.then_some(db));
        g.d_projected[branch as usize] = [gg.dq, gg.dk, gg.dv, d_y.to_vec()];
    }
    g
}
