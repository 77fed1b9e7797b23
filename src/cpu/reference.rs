//! The reference: naive scaled dot-product attention, f64 accumulation, max-subtracted softmax.

use crate::shape::AttnShape;

/// Reference results in f64, same layouts as the GPU outputs.
#[derive(Clone, Debug)]
pub struct Reference {
    /// O `[batch, M, q_heads, d_v]`.
    pub o: Vec<f64>,
    /// LSE `[batch, q_heads, M]`.
    pub lse: Vec<f64>,
    /// P `[batch, q_heads, M, N]`.
    pub weights: Vec<f64>,
}

/// Computes attention of `q`, `k`, `v` (layouts of [`AttnShape`]) with logit scale `scale`.
pub fn attention(s: &AttnShape, q: &[f32], k: &[f32], v: &[f32], scale: f64) -> Reference {
    let (b_n, m_n, n_n, hq, hk, dk, dv) = (s.batch, s.m, s.n, s.q_heads, s.kv_heads, s.d_k, s.d_v);
    let group = hq / hk;
    let mut o = vec![0.0; b_n * m_n * hq * dv];
    let mut lse = vec![0.0; b_n * hq * m_n];
    let mut weights = vec![0.0; b_n * hq * m_n * n_n];
    let mut logits = vec![0.0f64; n_n];
    for b in 0..b_n {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..m_n {
                let qrow = &q[((b * m_n + i) * hq + h) * dk..][..dk];
                for (j, logit) in logits.iter_mut().enumerate() {
                    let krow = &k[((b * n_n + j) * hk + kh) * dk..][..dk];
                    let dot: f64 = qrow
                        .iter()
                        .zip(krow)
                        .map(|(&x, &y)| f64::from(x) * f64::from(y))
                        .sum();
                    *logit = dot * scale;
                }
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = logits.iter().map(|&x| (x - max).exp()).sum();
                lse[(b * hq + h) * m_n + i] = max + sum.ln();
                let orow = &mut o[((b * m_n + i) * hq + h) * dv..][..dv];
                for (j, &logit) in logits.iter().enumerate() {
                    let p = (logit - max).exp() / sum;
                    weights[((b * hq + h) * m_n + i) * n_n + j] = p;
                    let vrow = &v[((b * n_n + j) * hk + kh) * dv..][..dv];
                    for (acc, &x) in orow.iter_mut().zip(vrow) {
                        *acc += p * f64::from(x);
                    }
                }
            }
        }
    }
    Reference { o, lse, weights }
}
