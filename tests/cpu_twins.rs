//! The CPU twins of the kernels against the f64 reference: each kernel's algorithm is
//! checked without a GPU, with the same params the planner gives the shaders.

mod common;

use common::*;
use xattn::cpu::{
    flash::flash, mask::MaskData, merge_partials::merge_partials, qk_scores::qk_scores, reference,
    softmax_rows::softmax_rows, weighted_sum::weighted_sum,
};
use xattn::mask::Masking;
use xattn::plan::{with_rows_per_invocation, Plan, Request, Slot, Step};
use xattn::{AttnShape, Path};

/// Executes a plan with the CPU twins in place of the kernels.
fn run_twins(
    plan: &Plan,
    (q, k, v): (&[f32], &[f32], &[f32]),
    masking: &Masking,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let lens = masking.lens_words(&plan.shape);
    let words = masking.mask_words().unwrap_or_default();
    let bias = masking.bias_values().unwrap_or_default();
    let masks = MaskData {
        lens: &lens,
        mask_bits: &words,
        bias: &bias,
    };
    let size = |slot: Slot| -> usize {
        plan.scratch
            .iter()
            .chain(&plan.outputs)
            .find(|(x, _)| *x == slot)
            .map_or(0, |(_, b)| *b as usize / 4)
    };
    let mut bufs: std::collections::HashMap<Slot, Vec<f32>> = [
        Slot::O,
        Slot::Lse,
        Slot::Weights,
        Slot::Scores,
        Slot::PartO,
        Slot::PartLse,
    ]
    .into_iter()
    .map(|slot| (slot, vec![f32::NAN; size(slot)]))
    .collect();
    for step in &plan.steps {
        match step {
            Step::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                size,
            } => {
                let data = bufs[src][*src_offset as usize / 4..][..*size as usize / 4].to_vec();
                bufs.get_mut(dst).unwrap()[*dst_offset as usize / 4..][..data.len()]
                    .copy_from_slice(&data);
            }
            Step::Dispatch(d) => {
                let p = d.params.attn();
                let mut take = |slot: Slot| std::mem::take(bufs.get_mut(&slot).unwrap());
                match d.kernel {
                    xattn::gpu::kernels::Kernel::QkScores { .. } => {
                        let mut sc = take(Slot::Scores);
                        qk_scores(p, q, k, &masks, &mut sc);
                        bufs.insert(Slot::Scores, sc);
                    }
                    xattn::gpu::kernels::Kernel::SoftmaxRows => {
                        let (mut sc, mut lse) = (take(Slot::Scores), take(Slot::Lse));
                        softmax_rows(p, &mut sc, &mut lse);
                        bufs.insert(Slot::Scores, sc);
                        bufs.insert(Slot::Lse, lse);
                    }
                    xattn::gpu::kernels::Kernel::WeightedSum => {
                        let (sc, mut o) = (take(Slot::Scores), take(Slot::O));
                        weighted_sum(p, &sc, v, &mut o);
                        bufs.insert(Slot::Scores, sc);
                        bufs.insert(Slot::O, o);
                    }
                    xattn::gpu::kernels::Kernel::Flash { bc, br, r, .. } => {
                        let (os, ls) = (d.buffers[6], d.buffers[7]);
                        let (mut o, mut lse) = (take(os), take(ls));
                        flash(p, (bc, br, r), q, k, v, &masks, &mut o, &mut lse);
                        bufs.insert(os, o);
                        bufs.insert(ls, lse);
                    }
                    xattn::gpu::kernels::Kernel::Linear
                    | xattn::gpu::kernels::Kernel::MeanHeads => {
                        unreachable!("attention plans have no layer kernels")
                    }
                    xattn::gpu::kernels::Kernel::MergePartials => {
                        let (po, pl, mut o, mut lse) = (
                            take(Slot::PartO),
                            take(Slot::PartLse),
                            take(Slot::O),
                            take(Slot::Lse),
                        );
                        merge_partials(p, &po, &pl, &mut o, &mut lse);
                        bufs.insert(Slot::O, o);
                        bufs.insert(Slot::Lse, lse);
                    }
                }
            }
        }
    }
    (
        bufs.remove(&Slot::O).unwrap(),
        bufs.remove(&Slot::Lse).unwrap(),
        bufs.remove(&Slot::Weights).unwrap(),
    )
}

/// The plans of `req`: the planner's own, and for the fused paths one per rows-per-invocation
/// variant R of the flash kernel (forced through the planner), each checked to carry its R.
fn plans(req: &Request) -> Vec<(String, Plan)> {
    let mut out = vec![("auto".to_string(), Plan::new(req, &CAPS).unwrap())];
    if req.path == Some(Path::ThreePass) {
        return out;
    }
    for r in [1, 2, 4] {
        let plan = with_rows_per_invocation(r, || Plan::new(req, &CAPS).unwrap());
        let flash_rows: Vec<u32> = plan
            .steps
            .iter()
            .filter_map(|step| match step {
                Step::Dispatch(d) => match d.kernel {
                    xattn::gpu::kernels::Kernel::Flash { r, .. } => Some(r),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert!(
            !flash_rows.is_empty() && flash_rows.iter().all(|&x| x == r),
            "forced R = {r}, planned {flash_rows:?}\n{plan}"
        );
        out.push((r.to_string(), plan));
    }
    out
}

#[test]
fn twins_follow_every_plan_to_the_reference() {
    let shapes = [
        AttnShape {
            batch: 1,
            m: 1,
            n: 1500,
            q_heads: 2,
            kv_heads: 2,
            d_k: 64,
            d_v: 64,
        },
        AttnShape {
            batch: 2,
            m: 7,
            n: 33,
            q_heads: 3,
            kv_heads: 3,
            d_k: 3,
            d_v: 5,
        },
        AttnShape {
            batch: 1,
            m: 33,
            n: 700,
            q_heads: 2,
            kv_heads: 1,
            d_k: 256,
            d_v: 40,
        },
        AttnShape {
            batch: 1,
            m: 77,
            n: 257,
            q_heads: 2,
            kv_heads: 2,
            d_k: 40,
            d_v: 40,
        },
    ];
    for (i, s) in shapes.iter().enumerate() {
        let (q, k, v) = qkv(s, 1.0, 500 + i as u64);
        let scale = 1.0 / (s.d_k as f32).sqrt();
        let want = reference::attention(s, &q, &k, &v, f64::from(scale));
        let tol = budget(s, scale, &q, &k, &v);
        for path in Path::ALL {
            let req = Request {
                shape: *s,
                scale,
                weights: path == Path::ThreePass,
                path: Some(path),
                masks: Default::default(),
            };
            for (r, plan) in plans(&req) {
                let (o, lse, w) = run_twins(&plan, (&q, &k, &v), &Masking::default());
                let what = format!("twin {} r{r} {s}", path.name());
                assert_close(&format!("{what} O"), &o, &want.o, tol.o);
                assert_close(&format!("{what} LSE"), &lse, &want.lse, tol.lse * 10.0);
                if path == Path::ThreePass {
                    assert_close(&format!("{what} P"), &w, &want.weights, tol.weights);
                }
            }
        }
    }
}

#[test]
fn twins_follow_masked_plans_to_the_reference() {
    for (i, (name, s, opts)) in mask_cases().into_iter().enumerate() {
        let (q, k, v) = qkv(&s, 1.0, 700 + i as u64);
        let scale = opts.scale_for(s.d_k);
        let m = opts.masking();
        let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), m);
        let tol = budget_masked(&s, scale, (&q, &k, &v), m);
        for path in Path::ALL {
            let req = Request {
                shape: s,
                scale,
                weights: path == Path::ThreePass,
                path: Some(path),
                masks: m.spec(&s).unwrap(),
            };
            for (r, plan) in plans(&req) {
                let (o, lse, w) = run_twins(&plan, (&q, &k, &v), m);
                let what = format!("twin {} r{r} {name} {s}", path.name());
                assert_close(&format!("{what} O"), &o, &want.o, tol.o);
                assert_close(&format!("{what} LSE"), &lse, &want.lse, tol.lse * 10.0);
                if path == Path::ThreePass {
                    assert_close(&format!("{what} P"), &w, &want.weights, tol.weights);
                }
            }
        }
    }
}

#[test]
fn linear_and_mean_heads_twins_match_f64() {
    use xattn::cpu::{linear::linear, mean_heads::mean_heads};
    use xattn::params::{AttnParams, LinearParams};
    let (rows, in_dim, out_dim) = (67, 130, 65);
    let x = random(rows * in_dim, 1.0, 1);
    let w = random(out_dim * in_dim, 0.5, 2);
    let b = random(out_dim, 0.5, 3);
    let want = reference::linear(&x, &w, Some(&b), in_dim);
    let mut y = vec![f32::NAN; rows * out_dim];
    // Two chunks of rows, as the planner makes for very tall inputs.
    for (row_offset, n) in [(0, 40), (40, 27)] {
        let p = LinearParams {
            row_offset,
            rows: n,
            in_dim: in_dim as u32,
            out_dim: out_dim as u32,
            has_bias: 1,
            ..Default::default()
        };
        linear(&p, &x, &w, &b, &mut y);
    }
    let eps = f64::from(f32::EPSILON);
    assert_close(
        "linear twin",
        &y,
        &want,
        eps * in_dim as f64 * 0.5 * in_dim as f64,
    );

    let (batch, heads, m, n) = (2, 3, 5, 7);
    let weights = random(batch * heads * m * n, 1.0, 4);
    let p = AttnParams {
        batch: batch as u32,
        q_heads: heads as u32,
        m: m as u32,
        n: n as u32,
        ..Default::default()
    };
    let mut mean = vec![f32::NAN; batch * m * n];
    mean_heads(&p, &weights, &mut mean);
    let want: Vec<f64> = (0..batch * m * n)
        .map(|e| {
            let (b, ij) = (e / (m * n), e % (m * n));
            (0..heads)
                .map(|h| f64::from(weights[(b * heads + h) * m * n + ij]))
                .sum::<f64>()
                / heads as f64
        })
        .collect();
    assert_close("mean_heads twin", &mean, &want, 4.0 * eps);
}
