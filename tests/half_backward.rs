//! FlashAttention's criterion for half precision, on the backward: with f16 or bf16 inputs
//! and gradients written in that type, our dQ, dK, dV are within twice the error of a naive
//! same-dtype implementation (every tensor op's result rounded to the type, as PyTorch's eager
//! attention computes in f16/bf16), plus one rounding of the largest gradient; both measured
//! against the f64 reference on the same rounded inputs. Prints the table.

mod common;

use common::*;

use xattn::cpu::reference;
use xattn::{Alignment, Attention, AttnShape, DType, Tensor};

/// Which keys a row sees and what is added to its logits, as the naive code applies them.
#[derive(Clone, Copy, Debug)]
enum Mask {
    None,
    Causal,
    /// Per batch key lengths `[n − 9, n]` and an additive bias `[1, q_heads, M, N]`.
    LensBias,
}

struct Case {
    name: &'static str,
    s: AttnShape,
    mask: Mask,
}

/// The inputs, rounded to `dtype`, and the attention options of a case.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    bias: Vec<f32>,
    kv_lens: Vec<u32>,
    opts: Attention,
}

fn round(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::Bf16 => half::bf16::from_f32(x).to_f32(),
        DType::F32 => x,
    }
}

fn inputs(c: &Case, dtype: DType, seed: u64) -> Inputs {
    let s = &c.s;
    let len = |d: [usize; 4]| d.iter().product::<usize>();
    let r = |x: Vec<f32>| x.into_iter().map(|y| round(dtype, y)).collect::<Vec<f32>>();
    // Logits of a few units, so that P is far from uniform and dS far from zero.
    let q = r(random(len(s.q_dims()), 2.0, seed));
    let k = r(random(len(s.k_dims()), 2.0, seed + 1));
    let v = r(random(len(s.v_dims()), 1.0, seed + 2));
    let d_o = r(random(len(s.o_dims()), 1.0, seed + 3));
    let mut opts = Attention::default();
    let (mut bias, mut kv_lens) = (Vec::new(), Vec::new());
    match c.mask {
        Mask::None => {}
        Mask::Causal => opts = opts.with_causal(Alignment::TopLeft),
        Mask::LensBias => {
            bias = r(random(s.q_heads * s.m * s.n, 1.0, seed + 4));
            kv_lens = (0..s.batch)
                .map(|b| (s.n - 9 * ((b + 1) % 2)) as u32)
                .collect();
            opts = opts
                .with_kv_lens(kv_lens.clone())
                .with_bias([1, s.q_heads, s.m, s.n], bias.clone());
        }
    }
    Inputs {
        q,
        k,
        v,
        d_o,
        bias,
        kv_lens,
        opts,
    }
}

/// The backward of PyTorch's eager attention in `dtype`: `qs = q·scale`, `S = qs·Kᵀ (+ bias)`,
/// `P = softmax(S)`, `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ∘ (dP − rowsum(dP ∘ P))`,
/// `dQ = (dS·K)·scale`, `dK = dSᵀ·qs`, each result rounded to `dtype`, sums in f32 (as the
/// half GEMMs and softmax kernels accumulate), a GQA group's dK, dV summed over its query heads
/// (the backward of repeating K and V) and rounded once. (dQ, dK, dV).
fn naive_backward(c: &Case, x: &Inputs, dtype: DType) -> [Vec<f32>; 3] {
    let s = &c.s;
    let (m, n, hq, hk, d, dv) = (s.m, s.n, s.q_heads, s.kv_heads, s.d_k, s.d_v);
    let r = |y: f32| round(dtype, y);
    let scale = 1.0 / (d as f32).sqrt();
    let mut dq = vec![0.0f32; x.q.len()];
    let mut dk = vec![0.0f32; x.k.len()];
    let mut dvv = vec![0.0f32; x.v.len()];
    for b in 0..s.batch {
        let kv_len = x.kv_lens.get(b).map_or(n, |&l| l as usize);
        for g in 0..hk {
            // Per-head dK, dV (rounded), summed over the group in f32, rounded once.
            let mut dk_sum = vec![0.0f32; n * d];
            let mut dv_sum = vec![0.0f32; n * dv];
            for h in g * (hq / hk)..(g + 1) * (hq / hk) {
                let qi = |i: usize, e: usize| x.q[((b * m + i) * hq + h) * d + e];
                let kj = |j: usize, e: usize| x.k[((b * n + j) * hk + g) * d + e];
                let vj = |j: usize, e: usize| x.v[((b * n + j) * hk + g) * dv + e];
                let doi = |i: usize, e: usize| x.d_o[((b * m + i) * hq + h) * dv + e];
                let qs: Vec<f32> = (0..m * d).map(|t| r(qi(t / d, t % d) * scale)).collect();
                let mut p = vec![0.0f32; m * n];
                for i in 0..m {
                    let row = &mut p[i * n..(i + 1) * n];
                    for (j, pj) in row.iter_mut().enumerate() {
                        let seen = j < kv_len && (!matches!(c.mask, Mask::Causal) || j <= i);
                        *pj = if seen {
                            let sij = r((0..d).map(|e| qs[i * d + e] * kj(j, e)).sum());
                            match c.mask {
                                Mask::LensBias => r(sij + x.bias[(h * m + i) * n + j]),
                                _ => sij,
                            }
                        } else {
                            f32::NEG_INFINITY
                        };
                    }
                    let max = row.iter().fold(f32::NEG_INFINITY, |a, &y| a.max(y));
                    let sum: f32 = row.iter().map(|&y| (y - max).exp()).sum();
                    for pj in row.iter_mut() {
                        *pj = r((*pj - max).exp() / sum);
                    }
                }
                let mut ds = vec![0.0f32; m * n];
                for i in 0..m {
                    let dp: Vec<f32> = (0..n)
                        .map(|j| r((0..dv).map(|e| doi(i, e) * vj(j, e)).sum()))
                        .collect();
                    let dot: f32 = (0..n).map(|j| dp[j] * p[i * n + j]).sum();
                    for j in 0..n {
                        ds[i * n + j] = r(p[i * n + j] * (dp[j] - dot));
                    }
                }
                for i in 0..m {
                    for e in 0..d {
                        let dqs = r((0..n).map(|j| ds[i * n + j] * kj(j, e)).sum());
                        dq[((b * m + i) * hq + h) * d + e] = r(dqs * scale);
                    }
                }
                for j in 0..n {
                    for e in 0..d {
                        dk_sum[j * d + e] += r((0..m).map(|i| ds[i * n + j] * qs[i * d + e]).sum());
                    }
                    for e in 0..dv {
                        dv_sum[j * dv + e] += r((0..m).map(|i| p[i * n + j] * doi(i, e)).sum());
                    }
                }
            }
            for j in 0..n {
                for e in 0..d {
                    dk[((b * n + j) * hk + g) * d + e] = r(dk_sum[j * d + e]);
                }
                for e in 0..dv {
                    dvv[((b * n + j) * hk + g) * dv + e] = r(dv_sum[j * dv + e]);
                }
            }
        }
    }
    [dq, dk, dvv]
}

fn max_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).abs())
        .fold(0.0, f64::max)
}

#[test]
fn half_gradients_meet_flash_attentions_criterion() {
    let Some(engine) = engine() else { return };
    let cases = [
        Case {
            name: "GQA 4/2, d 24",
            s: shape(2, 45, 70, 4, 2, 24),
            mask: Mask::None,
        },
        Case {
            name: "causal, d 64",
            s: shape(1, 64, 64, 2, 2, 64),
            mask: Mask::Causal,
        },
        Case {
            name: "kv lens + bias, d 40",
            s: shape(2, 33, 77, 2, 1, 40),
            mask: Mask::LensBias,
        },
        Case {
            name: "decode-like, d 128",
            s: shape(1, 3, 200, 2, 2, 128),
            mask: Mask::None,
        },
    ];
    eprintln!("| case | dtype | grad | ours max err | naive max err | ours/naive |");
    eprintln!("|---|---|---|---|---|---|");
    for (ci, c) in cases.iter().enumerate() {
        if on_gl(engine) && ci % 2 == 1 {
            continue;
        }
        for dtype in [DType::F16, DType::Bf16] {
            let x = inputs(c, dtype, 900 + 10 * ci as u64);
            let s = c.s;
            let want = reference::attention_backward(
                &s,
                (&x.q, &x.k, &x.v),
                &x.d_o,
                f64::from(x.opts.scale_for(s.d_k)),
                x.opts.masking(),
            );
            let up = |data: &[f32], dims: [usize; 4]| {
                Tensor::upload_as(engine.context(), "in", data, &dims, dtype).unwrap()
            };
            let (q, k, v) = (
                up(&x.q, s.q_dims()),
                up(&x.k, s.k_dims()),
                up(&x.v, s.v_dims()),
            );
            let out = engine.attention(&q, &k, &v, &x.opts).unwrap();
            let d_o = up(&x.d_o, s.o_dims());
            let call = engine
                .prepare_backward((&q, &k, &v), (&out.o, &out.lse), &d_o, &x.opts)
                .unwrap();
            let g = call.output();
            for t in [&g.dq, &g.dk, &g.dv] {
                poison(t).unwrap();
            }
            call.run().unwrap();
            let g = call.into_output();
            let naive = naive_backward(c, &x, dtype);
            let u = match dtype {
                DType::F16 => 2f64.powi(-11),
                _ => 2f64.powi(-8),
            };
            for (i, (what, ours, want)) in [
                ("dQ", &g.dq, &want.dq),
                ("dK", &g.dk, &want.dk),
                ("dV", &g.dv, &want.dv),
            ]
            .into_iter()
            .enumerate()
            {
                assert_eq!(ours.dtype(), dtype, "gradients in the input type");
                let ours = max_err(&ours.to_host().unwrap(), want);
                let naive = max_err(&naive[i], want);
                let largest = want.iter().fold(0.0f64, |a, &y| a.max(y.abs()));
                eprintln!(
                    "| {} | {dtype} | {what} | {ours:.3e} | {naive:.3e} | {:.2} |",
                    c.name,
                    ours / naive
                );
                assert!(
                    ours <= 2.0 * naive + u * largest,
                    "{} {dtype} {what}: error {ours:.3e} over twice the naive same-dtype \
                     backward's {naive:.3e} plus {:.3e}",
                    c.name,
                    u * largest
                );
            }
        }
    }
}
