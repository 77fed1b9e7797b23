//! Logits f32 cannot hold, refused before a run (`xattn run` and `xattn mha`) from the data on
//! the host.
//!
//! Finite inputs can still give logits past what the kernels hold: q or k near 1e38, or a
//! value that `--dtype bf16` keeps finite (3.4e38 rounds to 3.39e38) times an ordinary one.
//! The kernels then return inf or NaN, or take a kept key for a removed one, with no error.
//! What they need, per pair of query row i and key j of one head:
//!
//! - the logit `|scale · factor_j · q_i·k_j|` at most [`LOGIT_MAX`] (5e37): the kernels work
//!   in log2 units (× 1.44) and take logits below −1e38 for removed keys (`REMOVED_BELOW` in
//!   the shaders); with a softcap, which bounds what comes out, only f32's range matters:
//!   [`SUM_MAX`] / log2 e;
//! - the terms of the dot product, `Σ_d |q_id·k_jd|`, at most [`SUM_MAX`] (half f32's range)
//!   both as they are (three-pass scales after the sum) and times `|scale|·log2 e` (the fused
//!   paths scale q first): then no partial sum overflows, in any order of summation, even
//!   where the terms cancel;
//! - each `|scale · log2 e · q_id|` at most [`SUM_MAX`] (the fused paths' pre-scaled q).
//!
//! A cheap bound decides first, per batch entry and head: `Σ_d |q_id·k_jd| ≤ ‖q_i‖·‖k_j‖`
//! (Cauchy–Schwarz), so `max_i ‖q_i‖ · max_j ‖k_j‖` bounds every pair's terms and logit. Only a
//! head whose bound exceeds a limit has its pairs computed exactly, in f64 (M·N·d), so inputs
//! within the limits are never refused. Every row and key counts, padding and masked keys
//! included.
//!
//! For `xattn mha` the logits come from the projections `Q = X_q·W_qᵀ + b_q`, `K = X_s·W_kᵀ +
//! b_k`: the cheap bound is `‖q_i‖ ≤ ‖W_q,h‖_F·‖x_i‖ + ‖b_q,h‖` per head; where it does not
//! decide, Q and K are projected in f64 on the host (their own sums checked the same way) and
//! checked exactly as above.

use xattn::mha::MhaWeights;
use xattn::{Attention, MhaConfig};

use crate::{CliError, CliResult};

/// Largest |logit| (natural units, after the scale and segment factors) the kernels hold
/// without a softcap: times log2 e it stays well above the removed-key sentinel, −1e38.
pub const LOGIT_MAX: f64 = 5e37;

/// Largest sum of the magnitudes of an f32 dot product's terms: half f32's range, so that no
/// partial sum overflows and the sum's rounding stays far from the limit.
pub const SUM_MAX: f64 = f32::MAX as f64 / 2.0;

const LOG2E: f64 = std::f64::consts::LOG2_E;

/// A tensor of heads, `[batch, seq, heads, d]` row-major, and how messages name it.
pub struct Heads<'a, T> {
    /// `--q q.npy`, `the query projected by W_q`.
    pub shown: &'a str,
    /// The values, batch first.
    pub data: &'a [T],
    /// `[batch, seq, heads, d]`.
    pub dims: [usize; 4],
}

impl<T: Copy + Into<f64>> Heads<'_, T> {
    fn row(&self, b: usize, i: usize, h: usize) -> &[T] {
        let [_, seq, heads, d] = self.dims;
        let at = ((b * seq + i) * heads + h) * d;
        &self.data[at..at + d]
    }

    /// `max_i ‖row i‖` per batch entry and head, `[batch, heads]`.
    fn max_norms(&self) -> Vec<f64> {
        let [batch, seq, heads, _] = self.dims;
        let mut out = vec![0.0f64; batch * heads];
        for b in 0..batch {
            for i in 0..seq {
                for h in 0..heads {
                    let n = norm(self.row(b, i, h));
                    out[b * heads + h] = out[b * heads + h].max(n);
                }
            }
        }
        out
    }
}

/// `x` in scientific notation with at most 4 significant digits: `1e38`, `-2.5e37`.
fn sci(x: f64) -> String {
    let text = format!("{x:.3e}");
    match text.split_once('e') {
        Some((mantissa, exp)) if mantissa.contains('.') => {
            let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
            format!("{mantissa}e{exp}")
        }
        _ => text,
    }
}

fn norm<T: Copy + Into<f64>>(x: &[T]) -> f64 {
    x.iter()
        .map(|&v| {
            let v: f64 = v.into();
            v * v
        })
        .sum::<f64>()
        .sqrt()
}

/// The logit controls that set how large a logit gets: the scale, the key segments' factors
/// and whether a softcap bounds the result.
struct Controls {
    scale: f64,
    /// `(start, end, factor)`.
    segments: Vec<(usize, usize, f64)>,
    /// The largest |logit| allowed.
    limit: f64,
}

impl Controls {
    fn new(attention: &Attention, d_k: usize) -> Self {
        let m = attention.masking();
        Self {
            scale: f64::from(attention.scale_for(d_k)),
            segments: m
                .segments
                .iter()
                .map(|s| (s.start, s.end, f64::from(s.factor)))
                .collect(),
            limit: if m.softcap.is_some() {
                SUM_MAX / LOG2E
            } else {
                LOGIT_MAX
            },
        }
    }

    /// The factor of key j's segment, 1 outside every segment.
    fn factor(&self, j: usize) -> f64 {
        self.segments
            .iter()
            .find(|(start, end, _)| (*start..*end).contains(&j))
            .map_or(1.0, |s| s.2)
    }

    /// The largest |factor| of any key.
    fn max_factor(&self) -> f64 {
        self.segments.iter().fold(1.0f64, |a, s| a.max(s.2.abs()))
    }

    /// What the terms' magnitudes are multiplied by on some path: 1 (three-pass) or
    /// |scale|·log2 e (fused).
    fn term_factor(&self) -> f64 {
        (self.scale.abs() * LOG2E).max(1.0)
    }

    /// Whether terms summing to at most `terms` in magnitude are within every limit, for any
    /// key.
    fn fits(&self, terms: f64) -> bool {
        terms * self.term_factor() <= SUM_MAX
            && terms * self.scale.abs() * self.max_factor() <= self.limit
    }

    /// The scale as messages show it.
    fn scale_text(&self) -> String {
        sci(self.scale)
    }
}

/// Refuses logits of `q` `[batch, M, heads, d]` and `k` `[batch, N, kv_heads, d]` (query head
/// h reads K head h / (heads / kv_heads)) under `attention` that the kernels cannot hold (see
/// the [module docs](self)), naming the inputs, the head, the row and key, and the bound.
pub fn check_logits<T: Copy + Into<f64>>(
    q: &Heads<T>,
    k: &Heads<T>,
    attention: &Attention,
) -> CliResult<()> {
    let c = Controls::new(attention, q.dims[3]);
    let q_max = c.scale.abs() * LOG2E;
    if let Some((e, &x)) = q
        .data
        .iter()
        .enumerate()
        .find(|&(_, &x)| x.into().abs() * q_max > SUM_MAX)
    {
        let [_, seq, heads, d] = q.dims;
        let index = [
            e / (seq * heads * d),
            e / (heads * d) % seq,
            e / d % heads,
            e % d,
        ];
        return Err(CliError::new(format!(
            "{} holds {} at {index:?}: scaled by the logit scale {} and log2 e, as the fused \
             kernels scale q, it is {}, past what f32 holds (±3.4e38, half of it kept as \
             margin); scale the input down or pass a smaller --scale",
            q.shown,
            sci(x.into()),
            c.scale_text(),
            sci(x.into() * q_max)
        )));
    }
    let ([batch, _, heads, _], kv_heads) = (q.dims, k.dims[2]);
    let group = heads / kv_heads;
    let (qn, kn) = (q.max_norms(), k.max_norms());
    for b in 0..batch {
        for h in 0..heads {
            let hk = h / group;
            if c.fits(qn[b * heads + h] * kn[b * kv_heads + hk]) {
                continue;
            }
            exact_head(q, k, &c, [b, h, hk])?;
        }
    }
    Ok(())
}

/// Every pair of query row and key of head `h` (K head `hk`) of batch entry `b`, exactly.
fn exact_head<T: Copy + Into<f64>>(
    q: &Heads<T>,
    k: &Heads<T>,
    c: &Controls,
    [b, h, hk]: [usize; 3],
) -> CliResult<()> {
    let (m, n) = (q.dims[1], k.dims[1]);
    let at = |i: usize, j: usize| {
        format!(
            "head {h}{} (batch {b}), query row {i} of {} and key {j} of {}",
            if hk == h {
                String::new()
            } else {
                format!(" (K head {hk})")
            },
            q.shown,
            k.shown
        )
    };
    for i in 0..m {
        let qi = q.row(b, i, h);
        for j in 0..n {
            let kj = k.row(b, j, hk);
            let (mut dot, mut terms) = (0.0f64, 0.0f64);
            for (&x, &y) in qi.iter().zip(kj) {
                let t = x.into() * y.into();
                dot += t;
                terms += t.abs();
            }
            let factor = c.factor(j);
            let logit = c.scale * factor * dot;
            if logit.abs() > c.limit {
                let factor = if factor == 1.0 {
                    String::new()
                } else {
                    format!(" × key segment factor {}", sci(factor))
                };
                return Err(CliError::new(format!(
                    "the logit at {} is {} (scale {}{factor} × q·k {}), past the ±{} the \
                     kernels hold ({}); the output would be inf, NaN or quietly wrong. Scale q \
                     or k down (logits grow as |q|·|k|) or pass a smaller --scale",
                    at(i, j),
                    sci(logit),
                    c.scale_text(),
                    sci(dot),
                    sci(c.limit),
                    if c.limit == LOGIT_MAX {
                        "f32's range is ±3.4e38, the kernels work in log2 units, ×1.44, and take \
                         logits below −1e38 for removed keys"
                    } else {
                        "with a softcap: f32's range, ±3.4e38, half of it kept as margin, in \
                         log2 units"
                    }
                )));
            }
            if terms * c.term_factor() > SUM_MAX {
                return Err(CliError::new(format!(
                    "the terms of q·k at {} add up to {} in magnitude ({} times the scale {} \
                     and log2 e, as the fused kernels compute them), past what an f32 dot \
                     product holds (±3.4e38, half of it kept as margin): its partial sums may \
                     overflow to inf or NaN even where the terms cancel; scale q or k down",
                    at(i, j),
                    sci(terms),
                    sci(terms * c.scale.abs() * LOG2E),
                    c.scale_text()
                )));
            }
        }
    }
    Ok(())
}

/// One input of a layer: `[batch, seq, width]` batch first, and how messages name it.
pub struct LayerInput<'a> {
    /// `--query q.npy`.
    pub shown: &'a str,
    /// The values, batch first.
    pub data: &'a [f32],
    /// `[batch, seq, width]`.
    pub dims: [usize; 3],
}

/// Refuses a layer's logits that the kernels cannot hold: the logits of the projected query
/// and key (see the [module docs](self)). The weights bound them per head first; only where
/// that bound does not decide are Q and K projected here, in f64, and checked exactly.
pub fn check_layer_logits(
    c: &MhaConfig,
    w: &MhaWeights,
    query: &LayerInput,
    key: &LayerInput,
    attention: &Attention,
) -> CliResult<()> {
    let controls = Controls::new(attention, c.head_dim());
    let d = c.head_dim();
    // ‖W_h‖_F·max‖x‖ + ‖b_h‖ per head: a bound on every projected row of that head.
    let bound = |x: &LayerInput, weight: &[f32], bias: Option<&[f32]>, heads: usize| {
        let width = x.dims[2];
        let x_max = x.data.chunks(width).map(norm).fold(0.0f64, f64::max);
        (0..heads)
            .map(|h| {
                let rows = h * d..(h + 1) * d;
                let wn = norm(&weight[rows.start * width..rows.end * width]);
                wn * x_max + bias.map_or(0.0, |b| norm(&b[rows]))
            })
            .collect::<Vec<f64>>()
    };
    let qb = bound(query, &w.q, w.q_bias.as_deref(), c.num_heads);
    let kb = bound(key, &w.k, w.k_bias.as_deref(), c.kv_heads);
    let group = c.num_heads / c.kv_heads;
    let q_max = controls.scale.abs() * LOG2E;
    let decided = (0..c.num_heads).all(|h| {
        let (q, k) = (qb[h], kb[h / group]);
        q <= SUM_MAX && k <= SUM_MAX && q * q_max <= SUM_MAX && controls.fits(q * k)
    });
    if decided {
        return Ok(());
    }
    let q_shown = format!("the query projected by W_q ({})", query.shown);
    let k_shown = format!("the key projected by W_k ({})", key.shown);
    let q = project(query, &w.q, w.q_bias.as_deref(), c.inner_dim, &q_shown)?;
    let k = project(key, &w.k, w.k_bias.as_deref(), c.kv_dim(), &k_shown)?;
    let [batch, m, _] = query.dims;
    let n = key.dims[1];
    check_logits(
        &Heads {
            shown: &q_shown,
            data: &q,
            dims: [batch, m, c.num_heads, d],
        },
        &Heads {
            shown: &k_shown,
            data: &k,
            dims: [batch, n, c.kv_heads, d],
        },
        attention,
    )
}

/// `x·Wᵀ + b` in f64, `[rows, out]`; refuses a projection whose own terms may overflow f32.
fn project(
    x: &LayerInput,
    weight: &[f32],
    bias: Option<&[f32]>,
    out: usize,
    shown: &str,
) -> CliResult<Vec<f64>> {
    let width = x.dims[2];
    let mut y = Vec::with_capacity(x.data.len() / width * out);
    for (r, row) in x.data.chunks(width).enumerate() {
        for (o, wrow) in weight.chunks(width).enumerate() {
            let b = bias.map_or(0.0, |b| f64::from(b[o]));
            let (mut sum, mut terms) = (b, b.abs());
            for (&a, &w) in row.iter().zip(wrow) {
                let t = f64::from(a) * f64::from(w);
                sum += t;
                terms += t.abs();
            }
            if terms > SUM_MAX {
                return Err(CliError::new(format!(
                    "{shown} overflows f32: the terms of its feature {o} at row {r} (batch {}, \
                     position {}) add up to {} in magnitude, past what an f32 dot product holds \
                     (±3.4e38, half of it kept as margin); scale the input down",
                    r / x.dims[1],
                    r % x.dims[1],
                    sci(terms)
                )));
            }
            y.push(sum);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads<'a>(shown: &'a str, data: &'a [f32], dims: [usize; 4]) -> Heads<'a, f32> {
        Heads { shown, data, dims }
    }

    /// One query and one key of 2 dims: the logit is scale·q·k.
    fn check(q: [f32; 2], k: [f32; 2], attention: &Attention) -> CliResult<()> {
        check_logits(
            &heads("--q q.npy", &q, [1, 1, 1, 2]),
            &heads("--k k.npy", &k, [1, 1, 1, 2]),
            attention,
        )
    }

    #[test]
    fn numbers_are_shown_short() {
        assert_eq!(sci(f64::from(1e38f32)), "1e38");
        assert_eq!(sci(-2.5e37), "-2.5e37");
        assert_eq!(sci(0.125), "1.25e-1");
    }

    #[test]
    fn logits_past_the_limit_are_refused_and_those_within_run() {
        let one = Attention::default().with_scale(1.0);
        // 1e19·1e19 = 1e38 > 5e37.
        let e = check([1e19, 0.0], [1e19, 0.0], &one)
            .unwrap_err()
            .to_string();
        for part in [
            "--q q.npy",
            "--k k.npy",
            "head 0",
            "1e38",
            "±5e37",
            "removed keys",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
        // 4e37 is within; so is a pair whose cheap bound ‖q‖·‖k‖ = 1e38 is over the limit but
        // whose exact logit is 0 (orthogonal rows).
        assert!(check([4e18, 0.0], [1e19, 0.0], &one).is_ok());
        assert!(check([1e19, 0.0], [0.0, 1e19], &one).is_ok());
        // The scale and the segment factors count.
        let tenth = Attention::default().with_scale(0.1);
        assert!(check([1e19, 0.0], [1e19, 0.0], &tenth).is_ok());
        let seg = tenth.clone().with_key_segment(0, 1, 10.0);
        let e = check([1e19, 0.0], [1e19, 0.0], &seg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key segment factor 1e1"), "{e}");
        // With a softcap the output is bounded: only f32's range matters.
        let capped = one.clone().with_softcap(30.0);
        assert!(check([1e19, 0.0], [1e19, 0.0], &capped).is_ok());
        assert!(check([1e19, 0.0], [2e19, 0.0], &capped).is_err());
    }

    #[test]
    fn terms_that_cancel_past_f32_are_refused() {
        // q·k = 0, but the terms are ±2e38: an f32 sum may overflow before they cancel.
        let one = Attention::default().with_scale(1.0);
        let e = check([2e19, 2e19], [1e19, -1e19], &one)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("terms of q·k") && e.contains("add up to 4e38"),
            "{e}"
        );
        // A small scale keeps the logit small, but three-pass sums before scaling.
        let tiny = Attention::default().with_scale(1e-10);
        assert!(check([1e19, 0.0], [1e19, 0.0], &tiny).is_ok());
        assert!(check([3e19, 0.0], [1e19, 0.0], &tiny).is_err());
        // The fused paths scale q first: scale·log2 e·q itself must fit.
        let big = Attention::default().with_scale(10.0);
        let e = check([1e38, 0.0], [0.0, 0.0], &big)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--q q.npy holds 1e38 at [0, 0, 0, 0]"), "{e}");
    }

    #[test]
    fn each_head_reads_its_own_kv_head() {
        // Two query heads on one K head (GQA): head 1's logit overflows, head 0's does not.
        let q = [0.0, 1.0, 1e19, 0.0];
        let k = [1e19, 0.0];
        let one = Attention::default().with_scale(1.0);
        let e = check_logits(
            &heads("q", &q, [1, 1, 2, 2]),
            &heads("k", &k, [1, 1, 1, 2]),
            &one,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("head 1 (K head 0)"), "{e}");
    }
}
