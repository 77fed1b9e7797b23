//! Error budgets of the f32 kernels against the f64 reference ([`super::reference`]), derived
//! from first principles rather than fitted: what an f32 computation of the same formulas may
//! differ by, given the shape and the largest magnitudes of its inputs. The tests compare
//! with them, and so does `xattn bench --backward --check`, on inputs it draws.

use crate::cpu::graph_reference::GraphTerms;
use crate::cpu::reference;
use crate::mask::Masking;
use crate::shape::AttnShape;

const EPS: f64 = f32::EPSILON as f64;

fn amax(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |a, &y| a.max(f64::from(y.abs())))
}

/// A bound on |logit| under `m`: `|scale|·d_k·max|q|·max|k|` (the largest |scale·q·k|), times
/// the largest key-segment factor, bounded by a softcap, plus the largest finite |bias|.
pub fn max_logit(s: &AttnShape, scale: f32, q: &[f32], k: &[f32], m: &Masking) -> f64 {
    let factor = m
        .segments
        .iter()
        .fold(1.0f64, |a, g| a.max(f64::from(g.factor)));
    let mut max_logit = f64::from(scale.abs()) * s.d_k as f64 * amax(q) * amax(k) * factor;
    if let Some(cap) = m.softcap {
        max_logit = max_logit.min(f64::from(cap));
    }
    if let Some(b) = &m.bias {
        max_logit += b
            .data
            .iter()
            .filter(|x| x.is_finite())
            .fold(0.0f64, |a, &x| a.max(f64::from(x.abs())));
    }
    max_logit
}

/// Error budgets of the f32 backward against the f64 reference, per gradient (absolute).
///
/// A logit is off by δ ≈ ε·(1 + max|logit|) (as for the forward), so P by δ relative; dP =
/// dO·V and D are d_v-term f32 dot products (ε·d_v relative to d_v·max|dO|·max|V|, bounding
/// both); a gradient sums its terms sequentially in f32 (ε per term summed). With G_dp =
/// d_v·max|dO|·max|V|·(1/(1 − p)) bounding |dP| and |D|:
/// - dQ_i = Σ_j dS_ij·y'·scale·K_j with Σ_j |dS_ij| ≤ 2·G_dp: budget
///   4ε·(1 + max_logit + d_k + d_v + N)·2·G_dp·scale·y'max·max|K|;
/// - dK_j sums over every row and head that sees key j: its coverage C_j = Σ P_ij (from the
///   reference weights) replaces Σ_j P = 1: 4ε·(1 + max_logit + d_k + d_v + M·G)·
///   2·G_dp·scale·y'max·max|Q|·max C;
/// - dV_j = Σ_i P̃_ij·dO_i: 4ε·(1 + max_logit + M·G)·max|dO|·max C/(1 − p);
/// - dBias (each element a sum of dS over `terms` broadcast rows): 4ε·(1 + max_logit + d_k +
///   d_v + terms)·2·G_dp·terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradBudget {
    /// dQ.
    pub dq: f64,
    /// dK.
    pub dk: f64,
    /// dV.
    pub dv: f64,
    /// dBias, per term summed: an element summing `terms` broadcast rows is allowed
    /// `dbias_per_term·(dbias_len + terms)·terms`.
    pub dbias_per_term: f64,
    /// dBias: the terms of the sum's length that do not depend on the terms summed.
    pub dbias_len: f64,
}

/// The [`GradBudget`] of the f32 backward of `q`, `k`, `v` (layouts of [`AttnShape`]) and
/// `d_o` under logit scale `scale` and the masking `m`. Runs the reference forward (for the
/// keys' coverage).
pub fn grad_budget(
    s: &AttnShape,
    scale: f32,
    (q, k, v, d_o): (&[f32], &[f32], &[f32], &[f32]),
    m: &Masking,
) -> GradBudget {
    let logit_terms = 1.0 + max_logit(s, scale, q, k, m);
    let keep = m.dropout.map_or(1.0, |d| 1.0 / (1.0 - f64::from(d.p)));
    let g_dp = s.d_v as f64 * amax(d_o) * amax(v) * keep;
    let slope = m
        .segments
        .iter()
        .fold(1.0f64, |a, g| a.max(f64::from(g.factor.abs())));
    let want = reference::attention_masked(s, q, k, v, f64::from(scale), m);
    // Coverage of each (batch, kv head, key) by the rows and heads reading it.
    let group = s.q_heads / s.kv_heads;
    let mut coverage = vec![0.0f64; s.batch * s.kv_heads * s.n];
    for (e, &w) in want.weights.iter().enumerate() {
        let j = e % s.n;
        let bh = e / (s.m * s.n);
        let (b, h) = (bh / s.q_heads, bh % s.q_heads);
        coverage[(b * s.kv_heads + h / group) * s.n + j] += w;
    }
    let cov = coverage.iter().fold(0.0f64, |a, &c| a.max(c)).max(1.0);
    let d = (s.d_k + s.d_v) as f64;
    let rows = (s.m * group) as f64;
    let sc = f64::from(scale.abs()) * slope;
    GradBudget {
        dq: 4.0 * EPS * (logit_terms + d + s.n as f64) * 2.0 * g_dp * sc * amax(k),
        dk: 4.0 * EPS * (logit_terms + d + rows) * 2.0 * g_dp * sc * amax(q) * cov,
        dv: 4.0 * EPS * (logit_terms + rows) * amax(d_o) * cov * keep,
        dbias_per_term: 4.0 * EPS * 2.0 * g_dp,
        dbias_len: logit_terms + d,
    }
}

impl GradBudget {
    /// The budget where the forward's O is stored in a type of unit roundoff `u` (2⁻¹¹ for
    /// f16, 2⁻⁸ for bf16) before D = rowsum(dO ∘ O) reads it: D is then off by
    /// u·Σ|dO·O| ≤ u·d_v·max|dO|·max|V|, which dS carries like an error of dP, so dQ and dK
    /// widen by u/(4ε) of their dP term; dV does not read O.
    pub fn with_half_o(self, u: f64) -> GradBudget {
        let widen = 1.0 + u / (4.0 * EPS);
        GradBudget {
            dq: self.dq * widen,
            dk: self.dk * widen,
            ..self
        }
    }
}

/// Error budgets of the f32 edge-list attention ([`crate::graph`]) against its f64 reference
/// ([`super::graph_reference`]), absolute: O and LSE.
///
/// As for dense attention: a logit is a d_k-term f32 dot product plus the bias, off by
/// δ ≈ 4ε·(1 + max|logit|) with max|logit| ≤ |scale|·d_k·max|q|·max|k| + max finite |bias|; the
/// softmax turns δ into a relative weight error ≈ δ; a destination's sums run sequentially
/// over its in-edges (at most `max_degree` terms, ε each); the exact merge of a split list
/// adds a few roundings of the same order as the logit's. So LSE within
/// ε·(4·(1 + max|logit|) + max_degree), and O within that times max|v|.
///
/// Edge features add their largest magnitude to max|k| and max|v|; O averaged over heads is
/// within the largest head's budget.
pub fn graph_budget(
    (scale, d_k): (f32, usize),
    (q, k, v): (&[f32], &[f32], &[f32]),
    terms: GraphTerms,
    max_degree: usize,
) -> (f64, f64) {
    let feature = terms.edge_attr.map_or(0.0, amax);
    let mut max_logit = f64::from(scale.abs()) * d_k as f64 * amax(q) * (amax(k) + feature);
    if let Some(b) = terms.bias {
        max_logit += b
            .iter()
            .filter(|x| x.is_finite() && **x > crate::mask::BIAS_REMOVES)
            .fold(0.0f64, |a, &x| a.max(f64::from(x.abs())));
    }
    let base = EPS * (4.0 * (1.0 + max_logit) + max_degree as f64);
    (base * (amax(v) + feature).max(1e-3), base)
}

/// Error budgets of the statistics of edge-list attention's weights (`graph_stats`) against
/// [`super::graph_reference::graph_stats`], absolute: entropy, focus, coverage; `lse` is
/// [`graph_budget`]'s LSE budget, which bounds both the rebuilt logit's error and the LSE's.
///
/// A weight P = exp(s − LSE) is off by about P·δ with δ = 2·lse; −P ln P by |ln P + 1|·P·δ, so
/// the entropy of a destination by (H + 1)·δ ≤ (ln max_in + 1)·δ, plus its sum's roundings
/// (max_in terms, each below 1/e); the focus by δ; the coverage of a source, a sum of at most
/// max_out weights below 1, by max_out·(δ + ε).
pub fn graph_stats_budget(lse: f64, max_in: usize, max_out: usize) -> (f64, f64, f64) {
    let delta = 2.0 * lse;
    let entropy = ((max_in.max(1) as f64).ln() + 1.0) * delta + max_in as f64 * EPS;
    (entropy, delta, max_out as f64 * (delta + EPS))
}

/// Error budgets of the f32 backward of edge-list attention (`graph_grad_q`, `graph_grad_kv`)
/// against [`super::graph_grad_reference`], absolute, per gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GraphGradBudget {
    /// dQ.
    pub dq: f64,
    /// dK.
    pub dk: f64,
    /// dV.
    pub dv: f64,
    /// d edge features.
    pub d_edge_attr: f64,
    /// d bias.
    pub d_bias: f64,
}

/// The [`GraphGradBudget`] of the backward of the call with dims `s`, logit `scale`, inputs
/// `q`, `k`, `v`, `d_o` (O's layout) and `terms`, over a graph whose largest in-degree is
/// `max_in` and largest out-degree `max_out`; `coverage` is the largest sum of weights P over
/// one source's out-edges and the query heads of one K/V head (from the reference weights).
///
/// With `lse` the forward's LSE budget ([`graph_budget`]), which also bounds the rebuilt
/// logit's error, a weight P = exp(s − LSE) is off by δ_P·P with δ_P = 2·lse + 2ε. With
/// g = max|dO| (÷ heads where averaged), u = max|v| + max|f| and G = d_v·g·u bounding |dP| and
/// |D|: dP = dO·u is a d_v-term f32 dot product, off by ε·(d_v + 1)·G; D (from O, itself within
/// lse·u of the reference, or summed over at most max_in edges) by G·(δ_P + ε·(d_v + max_in));
/// so dS = P·(dP − D) by P·G·r with r = 3·δ_P + ε·(2·d_v + max_in + 4). Then, Σ P = 1 over a
/// destination's edges and Σ|dS| ≤ 2·G·Σ P, each sum of T terms adding ε·T of its terms'
/// magnitude:
/// - dQ = scale·Σ dS·(k + f) over ≤ max_in edges: scale·(max|k| + max|f|)·G·(r + 2ε·(max_in + 2));
/// - d bias = dS: G·r;
/// - d f = scale·dS·q + P·dO: scale·max|q|·G·(r + 4ε) + g·(δ_P + 3ε);
/// - dV = Σ P·dO over T = group·max_out + 1 terms of weight ≤ coverage C: g·C·(δ_P + ε·(T + 2));
/// - dK = scale·Σ dS·q likewise: scale·max|q|·G·C·(r + 2ε·(T + 1)).
pub fn graph_grad_budget(
    s: crate::cpu::graph_reference::GraphDims,
    scale: f32,
    (q, k, v, d_o): (&[f32], &[f32], &[f32], &[f32]),
    terms: GraphTerms,
    (max_in, max_out, coverage): (usize, usize, f64),
) -> GraphGradBudget {
    let (_, lse) = graph_budget((scale, s.d_k), (q, k, v), terms, max_in);
    let delta_p = 2.0 * lse + 2.0 * EPS;
    let feature = terms.edge_attr.map_or(0.0, amax);
    let g = amax(d_o)
        / if terms.mean_heads {
            s.heads as f64
        } else {
            1.0
        };
    let big_g = s.d_v as f64 * g * (amax(v) + feature);
    let r = 3.0 * delta_p + EPS * (2.0 * s.d_v as f64 + max_in as f64 + 4.0);
    let sc = f64::from(scale.abs());
    let t = ((s.heads / s.kv_heads) * max_out + 1) as f64;
    GraphGradBudget {
        dq: sc * (amax(k) + feature) * big_g * (r + 2.0 * EPS * (max_in as f64 + 2.0)),
        dk: sc * amax(q) * big_g * coverage * (r + 2.0 * EPS * (t + 1.0)),
        dv: g * coverage * (delta_p + EPS * (t + 2.0)),
        d_edge_attr: sc * amax(q) * big_g * (r + 4.0 * EPS) + g * (delta_p + 3.0 * EPS),
        d_bias: big_g * r,
    }
}
