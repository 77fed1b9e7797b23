//! The reference: naive scaled dot-product attention, f64 accumulation, max-subtracted softmax,
//! with the masks and logit controls of [`crate::mask`] applied literally from their
//! definitions (no shared code with the kernels or their packing of masks). Dropout takes
//! only its keep mask from [`crate::dropout::keeps`] (the bits are the definition).

use crate::dropout;
use crate::mask::{Alignment, Masking, BIAS_REMOVES};
use crate::params::AttnParams;
use crate::shape::AttnShape;

/// Reference results in f64, same layouts as the GPU outputs.
#[derive(Clone, Debug)]
pub struct Reference {
    /// O `[batch, M, q_heads, d_v]`.
    pub o: Vec<f64>,
    /// LSE `[batch, q_heads, M]` (−∞ for a row with no key left).
    pub lse: Vec<f64>,
    /// P `[batch, q_heads, M, N]` (after dropout, `P ∘ Z/(1 − p)`, where the masking has
    /// dropout).
    pub weights: Vec<f64>,
}

/// Computes attention of `q`, `k`, `v` (layouts of [`AttnShape`]) with logit scale `scale`.
pub fn attention(s: &AttnShape, q: &[f32], k: &[f32], v: &[f32], scale: f64) -> Reference {
    attention_masked(s, q, k, v, scale, &Masking::default())
}

/// Element `[b, h, i, j]` of a tensor broadcast from `dims` (size-1 dims repeat).
fn broadcast_at<T: Copy>(dims: [usize; 4], data: &[T], [b, h, i, j]: [usize; 4]) -> T {
    let pick = |x: usize, d: usize| if d == 1 { 0 } else { x };
    data[((pick(b, dims[0]) * dims[1] + pick(h, dims[1])) * dims[2] + pick(i, dims[2])) * dims[3]
        + j]
}

/// Whether row `i` of batch `b`, head `h` may see key `j`. In a block (`masking.block`),
/// lengths, diagonals and segments speak of the whole sequences' rows and keys, the mask of
/// the block's own.
fn keeps(m: &Masking, s: &AttnShape, [b, h, i, j]: [usize; 4]) -> bool {
    let (r0, m_all, k0, n_all) = m.block.map_or((0, s.m, 0, s.n), |k| {
        (k.row_offset, k.rows_total, k.key_offset, k.keys_total)
    });
    let q_len = m.q_lens.as_ref().map_or(m_all, |l| l[b] as usize) as i64;
    let kv_len = m.kv_lens.as_ref().map_or(n_all, |l| l[b] as usize) as i64;
    let (local_i, local_j) = (i, j);
    let (i, j) = ((i + r0) as i64, (j + k0) as i64);
    if i >= q_len || j >= kv_len {
        return false;
    }
    if let Some(w) = m.window {
        let diag = match w.align {
            Alignment::TopLeft => i,
            Alignment::BottomRight => i + kv_len - q_len,
        };
        if w.left.is_some_and(|left| j < diag - left as i64) {
            return false;
        }
        if w.right.is_some_and(|right| j > diag + right as i64) {
            return false;
        }
    }
    m.mask
        .as_ref()
        .is_none_or(|mask| broadcast_at(mask.dims, &mask.data, [b, h, local_i, local_j]))
}

/// The final logit of a kept key from its scaled dot product.
fn shaped(m: &Masking, at: [usize; 4], mut x: f64) -> f64 {
    let key = at[3] + m.block.map_or(0, |k| k.key_offset);
    if let Some(seg) = m.segments.iter().find(|g| (g.start..g.end).contains(&key)) {
        x *= f64::from(seg.factor);
    }
    if let Some(cap) = m.softcap {
        let cap = f64::from(cap);
        x = cap * (x / cap).tanh();
    }
    if let Some(bias) = &m.bias {
        let b = broadcast_at(bias.dims, &bias.data, at);
        x += if b <= BIAS_REMOVES {
            f64::NEG_INFINITY
        } else {
            f64::from(b)
        };
    }
    x
}

/// [`attention`] with masks, lengths and logit controls. A row with no key left has O = 0,
/// LSE = −∞ and weights 0. With dropout (`masking.dropout`, p ≠ 0): `O = (P ∘ Z)·V/(1 − p)`
/// and weights `P ∘ Z/(1 − p)`, Z from [`dropout::keeps`], a dropped key adding nothing to O
/// (whatever V holds); the LSE is that of P before dropout.
pub fn attention_masked<T: Copy + Into<f64>>(
    s: &AttnShape,
    q: &[T],
    k: &[T],
    v: &[T],
    scale: f64,
    masking: &Masking,
) -> Reference {
    let (b_n, m_n, n_n, hq, hk, dk, dv) = (s.batch, s.m, s.n, s.q_heads, s.kv_heads, s.d_k, s.d_v);
    let group = hq / hk;
    let mut o = vec![0.0; b_n * m_n * hq * dv];
    let mut lse = vec![0.0; b_n * hq * m_n];
    let mut weights = vec![0.0; b_n * hq * m_n * n_n];
    // None = key removed.
    let mut logits = vec![None; n_n];
    // The keep mask's params and the factor of a kept weight, 1/(1 − p) in f64.
    let drop = masking.dropout.filter(|d| d.p != 0.0).map(|d| {
        let mut params = AttnParams {
            m: m_n as u32,
            n: n_n as u32,
            ..Default::default()
        };
        d.apply(&mut params);
        (params, 1.0 / (1.0 - f64::from(d.p)))
    });
    let z = |bh: usize, i: usize, j: usize| match &drop {
        None => 1.0,
        Some((params, _)) if !dropout::keeps(params, bh as u32, i as u32, j as u32) => 0.0,
        Some((_, kept)) => *kept,
    };
    for b in 0..b_n {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..m_n {
                let qrow = &q[((b * m_n + i) * hq + h) * dk..][..dk];
                for (j, logit) in logits.iter_mut().enumerate() {
                    let at = [b, h, i, j];
                    *logit = keeps(masking, s, at).then(|| {
                        let krow = &k[((b * n_n + j) * hk + kh) * dk..][..dk];
                        let dot: f64 = qrow
                            .iter()
                            .zip(krow)
                            .map(|(&x, &y)| x.into() * y.into())
                            .sum();
                        shaped(masking, at, dot * scale)
                    });
                }
                let max = logits
                    .iter()
                    .flatten()
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                let row_lse = &mut lse[(b * hq + h) * m_n + i];
                if max == f64::NEG_INFINITY {
                    // No key left (removed, or every bias −∞): zeros, LSE −∞.
                    *row_lse = f64::NEG_INFINITY;
                    continue;
                }
                let sum: f64 = logits.iter().flatten().map(|&x| (x - max).exp()).sum();
                *row_lse = max + sum.ln();
                let orow = &mut o[((b * m_n + i) * hq + h) * dv..][..dv];
                for (j, logit) in logits.iter().enumerate() {
                    let Some(logit) = logit else { continue };
                    // A dropped weight is 0 and adds nothing (1 without dropout).
                    let z = z(b * hq + h, i, j);
                    if z == 0.0 {
                        continue;
                    }
                    let p = (logit - max).exp() / sum * z;
                    weights[((b * hq + h) * m_n + i) * n_n + j] = p;
                    let vrow = &v[((b * n_n + j) * hk + kh) * dv..][..dv];
                    for (acc, &x) in orow.iter_mut().zip(vrow) {
                        *acc += p * x.into();
                    }
                }
            }
        }
    }
    Reference { o, lse, weights }
}

/// `y [rows, out] = x [rows, in]·wᵀ (+ b)` in f64 (PyTorch `Linear`).
pub fn linear<T: Copy + Into<f64>, W: Copy + Into<f64>>(
    x: &[T],
    w: &[W],
    b: Option<&[W]>,
    in_dim: usize,
) -> Vec<f64> {
    let out_dim = w.len() / in_dim;
    let mut y = Vec::with_capacity(x.len() / in_dim * out_dim);
    for row in x.chunks(in_dim) {
        for (o, wrow) in w.chunks(in_dim).enumerate() {
            let dot: f64 = row
                .iter()
                .zip(wrow)
                .map(|(&a, &c)| a.into() * c.into())
                .sum();
            y.push(dot + b.map_or(0.0, |b| b[o].into()));
        }
    }
    y
}

/// Reference gradients in f64, same layouts as the inputs.
#[derive(Clone, Debug)]
pub struct RefGrads {
    /// dQ `[batch, M, q_heads, d_k]`.
    pub dq: Vec<f64>,
    /// dK `[batch, N, kv_heads, d_k]`.
    pub dk: Vec<f64>,
    /// dV `[batch, N, kv_heads, d_v]`.
    pub dv: Vec<f64>,
    /// dS, the gradient of the logits (and of a bias) `[batch, q_heads, M, N]`, unreduced.
    pub ds: Vec<f64>,
}

/// The derivative of [`shaped`]'s logit with respect to the scaled dot product `x`.
fn shaped_slope(m: &Masking, at: [usize; 4], x: f64) -> f64 {
    let mut f = 1.0;
    if let Some(seg) = m
        .segments
        .iter()
        .find(|g| (g.start..g.end).contains(&at[3]))
    {
        f = f64::from(seg.factor);
    }
    if let Some(cap) = m.softcap {
        let t = (f * x / f64::from(cap)).tanh();
        f *= 1.0 - t * t;
    }
    f
}

/// The analytic backward of [`attention_masked`] (with its dropout, if `masking` has one):
/// for `O = (P ∘ Z)·V/(1 − p)` and the gradient `d_o` of O, with
/// `dP̃_ij = Z_ij/(1 − p)·dO_i·V_j` and `dS_ij = P_ij·(dP̃_ij − Σ_l P_il·dP̃_il)`:
/// `dV_j = Σ_i P_ij·Z_ij/(1 − p)·dO_i`, `dQ_i = Σ_j dS_ij·y'_ij·scale·K_j`,
/// `dK_j = Σ_i dS_ij·y'_ij·scale·Q_i` (y' the derivative of the shaped logit), summed over the
/// query heads of each K/V head. Rows with no key left have zero gradients. The dropout mask
/// comes from [`crate::dropout::Dropout::keeps_element`], the rule's only implementation on
/// the host.
pub fn attention_backward<T: Copy + Into<f64>>(
    s: &AttnShape,
    (q, k, v): (&[T], &[T], &[T]),
    d_o: &[T],
    scale: f64,
    masking: &Masking,
) -> RefGrads {
    let (b_n, m_n, n_n, hq, hk, dk, dv) = (s.batch, s.m, s.n, s.q_heads, s.kv_heads, s.d_k, s.d_v);
    let group = hq / hk;
    let mut g = RefGrads {
        dq: vec![0.0; b_n * m_n * hq * dk],
        dk: vec![0.0; b_n * n_n * hk * dk],
        dv: vec![0.0; b_n * n_n * hk * dv],
        ds: vec![0.0; b_n * hq * m_n * n_n],
    };
    let drop = masking.dropout.filter(|d| d.p != 0.0);
    let keep_scale = drop.map_or(1.0, |d| 1.0 / (1.0 - f64::from(d.p)));
    let dot =
        |a: &[T], b: &[T]| -> f64 { a.iter().zip(b).map(|(&x, &y)| x.into() * y.into()).sum() };
    for b in 0..b_n {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..m_n {
                let qi = ((b * m_n + i) * hq + h) * dk;
                let oi = ((b * m_n + i) * hq + h) * dv;
                // (j, x, logit) of the kept keys.
                let kept: Vec<(usize, f64, f64)> = (0..n_n)
                    .filter(|&j| keeps(masking, s, [b, h, i, j]))
                    .filter_map(|j| {
                        let kj = ((b * n_n + j) * hk + kh) * dk;
                        let x = dot(&q[qi..qi + dk], &k[kj..kj + dk]) * scale;
                        let y = shaped(masking, [b, h, i, j], x);
                        (y > f64::NEG_INFINITY).then_some((j, x, y))
                    })
                    .collect();
                let Some(max) = kept.iter().map(|t| t.2).reduce(f64::max) else {
                    continue;
                };
                let sum: f64 = kept.iter().map(|t| (t.2 - max).exp()).sum();
                // (j, x, P, Z/(1 − p), dP̃)
                let terms: Vec<(usize, f64, f64, f64, f64)> = kept
                    .iter()
                    .map(|&(j, x, y)| {
                        let z = drop.map_or(1.0, |d| {
                            if d.keeps_element(s, [b, h, i, j]) {
                                keep_scale
                            } else {
                                0.0
                            }
                        });
                        let vj = ((b * n_n + j) * hk + kh) * dv;
                        let dp = z * dot(&d_o[oi..oi + dv], &v[vj..vj + dv]);
                        (j, x, (y - max).exp() / sum, z, dp)
                    })
                    .collect();
                let delta: f64 = terms.iter().map(|t| t.2 * t.4).sum();
                for &(j, x, p, z, dp) in &terms {
                    let ds = p * (dp - delta);
                    g.ds[((b * hq + h) * m_n + i) * n_n + j] = ds;
                    let gx = ds * shaped_slope(masking, [b, h, i, j], x) * scale;
                    let kj = ((b * n_n + j) * hk + kh) * dk;
                    let vj = ((b * n_n + j) * hk + kh) * dv;
                    for d in 0..dk {
                        g.dq[qi + d] += gx * k[kj + d].into();
                        g.dk[kj + d] += gx * q[qi + d].into();
                    }
                    for d in 0..dv {
                        g.dv[vj + d] += p * z * d_o[oi + d].into();
                    }
                }
            }
        }
    }
    g
}

/// `ds` (`[batch, q_heads, M, N]`) summed to a bias's broadcast `dims`.
pub fn reduce_to(s: &AttnShape, ds: &[f64], dims: [usize; 4]) -> Vec<f64> {
    let mut out = vec![0.0; dims.iter().product()];
    let pick = |x: usize, d: usize| if d == 1 { 0 } else { x };
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.m {
                for j in 0..s.n {
                    let at = ((pick(b, dims[0]) * dims[1] + pick(h, dims[1])) * dims[2]
                        + pick(i, dims[2]))
                        * dims[3]
                        + j;
                    out[at] += ds[((b * s.q_heads + h) * s.m + i) * s.n + j];
                }
            }
        }
    }
    out
}

/// The gradients of [`linear`] (`y = x·wᵀ + b`, `x [rows, in]`, `w [out, in]`) from
/// `dy [rows, out]`, in f64: `(dx [rows, in], dw [out, in], db [out])` with
/// `dx[r, i] = Σ_o dy[r, o]·w[o, i]`, `dw[o, i] = Σ_r dy[r, o]·x[r, i]`, `db[o] = Σ_r dy[r, o]`.
pub fn linear_backward<X: Copy + Into<f64>, W: Copy + Into<f64>, D: Copy + Into<f64>>(
    x: &[X],
    w: &[W],
    dy: &[D],
    in_dim: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = x.len() / in_dim;
    let out_dim = w.len() / in_dim;
    let (mut dx, mut dw, mut db) = (
        vec![0.0f64; rows * in_dim],
        vec![0.0f64; out_dim * in_dim],
        vec![0.0f64; out_dim],
    );
    for r in 0..rows {
        for o in 0..out_dim {
            let g: f64 = dy[r * out_dim + o].into();
            db[o] += g;
            for i in 0..in_dim {
                dx[r * in_dim + i] += g * w[o * in_dim + i].into();
                dw[o * in_dim + i] += g * x[r * in_dim + i].into();
            }
        }
    }
    (dx, dw, db)
}
