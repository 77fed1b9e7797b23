//! `xattn bench --backward`: the backward of each timed forward, on its O and LSE and a
//! random dO, timed as the forward is (warm-up, median, GPU timestamps where available), and
//! with `--check` compared with the f64 reference backward within derived budgets.

use xattn::cpu::budget::grad_budget;
use xattn::cpu::reference;
use xattn::{Attention, AttnShape, DType, Grads, Prepared, Tensor};

use super::{out_rounding, print_note, Bench, Check, Inputs, Pass, Record, Timing};
use crate::suite::SuiteShape;
use crate::{one_line, CliResult};

/// The backward's FLOPs over the forward's, as FlashAttention's benchmarks count them: five
/// M×N matrix products (S = Q·Kᵀ recomputed, dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q)
/// to the forward's two (Q·Kᵀ and P·V).
pub const FLOPS_FACTOR: f64 = 2.5;

/// Bytes of the backward's least traffic stored as `dtype`: Q, K, V, O and dO read, dQ, dK
/// and dV written once each.
pub fn min_bytes(s: &AttnShape, dtype: DType) -> u64 {
    let e = |d: [usize; 4]| d.iter().product::<usize>() as u64 * dtype.size();
    2 * (e(s.q_dims()) + e(s.k_dims()) + e(s.v_dims())) + 2 * e(s.o_dims())
}

/// The largest |got − want|, NaN where an element is not finite.
fn max_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g.is_finite() {
                (f64::from(g) - w).abs()
            } else {
                f64::NAN
            }
        })
        .fold(0.0, |acc: f64, e| {
            if e.is_nan() || acc.is_nan() {
                f64::NAN
            } else {
                acc.max(e)
            }
        })
}

impl Bench<'_> {
    /// Times the backward of `forward`'s call (which has run: its O and LSE are the
    /// forward's) and, with --check, compares it; its record, or `None` where it does not
    /// plan (a note says why) or fails (added to `errors`).
    pub(super) fn backward_row(
        &self,
        s: &SuiteShape,
        forward: &Record,
        (call, opts): (&Prepared, &Attention),
        x: &Inputs,
        errors: &mut Vec<String>,
    ) -> Option<Record> {
        let which = (forward.requested, forward.stats);
        let note = |text: &str| {
            println!(
                "{:<10} {:<26} {:<22} {:<11} {}",
                s.name,
                s.shape.to_string(),
                "backward",
                forward.storage.name(),
                one_line(text)
            );
        };
        let (_, d_o) = x.d_o.as_ref().expect("dO is drawn with --backward");
        let qkv = (&x.q, &x.k, &x.v);
        let backward = match self
            .engine
            .prepare_backward(qkv, (call.o(), call.lse()), d_o, opts)
        {
            Ok(b) => b,
            Err(e) => {
                note(&format!("skipped, does not plan: {e}"));
                return None;
            }
        };
        match self.measure_backward(&backward, &forward.shape, opts, x) {
            Ok((timing, check, tolerance, checked)) => {
                let r = Record {
                    timing,
                    check,
                    tolerance,
                    checked,
                    pass: Pass::Backward,
                    ..forward.clone()
                };
                super::print_row(&r);
                Some(r)
            }
            Err(e) => {
                errors.push(format!(
                    "{} backward {} ({})",
                    s.name,
                    forward.dtype,
                    one_line(&e.to_string())
                ));
                print_note(s, which, forward.storage, &format!("backward error: {e}"));
                None
            }
        }
    }

    /// Warmup, timed runs and (with --check) the comparison of dQ, dK and dV with the
    /// reference: the error of the gradient furthest into its budget, the budget, its name.
    fn measure_backward(
        &self,
        call: &Prepared<Grads>,
        &s: &AttnShape,
        opts: &Attention,
        x: &Inputs,
    ) -> CliResult<(Timing, Check, f64, &'static str)> {
        let timing = self.time(call)?;
        let all = "dQ, dK, dV";
        if !self.check {
            return Ok((timing, Check::Off, 0.0, all));
        }
        if FLOPS_FACTOR * s.flops() > self.args.check_max_gflop * 1e9 {
            return Ok((timing, Check::Skipped, 0.0, all));
        }
        eprintln!(
            "      CPU reference backward for {s} {} ({:.2} GFLOP, f64) ...",
            x.dtype,
            FLOPS_FACTOR * s.flops() / 1e9
        );
        let [q, k, v] = &x.host;
        let (d_o, _) = x.d_o.as_ref().expect("dO is drawn with --backward");
        let scale = opts.scale_for(s.d_k);
        let m = opts.masking();
        let want = reference::attention_backward(&s, (q, k, v), d_o, f64::from(scale), m);
        // Half inputs: O is stored in their type before D reads it, and each gradient is
        // rounded to it once when written.
        let u = out_rounding(x.dtype);
        let mut budget = grad_budget(&s, scale, (q, k, v, d_o), m);
        if u > 0.0 {
            budget = budget.with_half_o(u);
        }
        let g = call.output();
        let mut worst: Option<(f64, f64, &'static str)> = None;
        for (name, t, want, tol) in [
            ("dQ", &g.dq, &want.dq, budget.dq),
            ("dK", &g.dk, &want.dk, budget.dk),
            ("dV", &g.dv, &want.dv, budget.dv),
        ] {
            let largest = want.iter().fold(0.0f64, |a, w| a.max(w.abs()));
            let tol = tol + u * largest;
            let err = max_err(&Tensor::to_host(t)?, want);
            let further = match worst {
                None => true,
                Some((e, t, _)) => err.is_nan() || (!e.is_nan() && err / tol > e / t),
            };
            if further {
                worst = Some((err, tol, name));
            }
        }
        let (err, tol, name) = worst.expect("three gradients compared");
        Ok((timing, Check::Err(err), tol, name))
    }
}
