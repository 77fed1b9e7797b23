//! `linear`'s backward on the GPU (`dx = dy·w`, `dw = dyᵀ·x`, `db = Σ_rows dy`) against the
//! f64 reference, which is itself checked by central differences: sizes off the 64-wide tiles,
//! f32 and half inputs and weights, outputs poisoned with NaN before each run; reductions split
//! by a loop cap giving the unsplit bits; llvmpipe's cap held at the largest dispatch.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use common::linear_grad::{assert_close_each, backward_program, grad_tolerances, rounded};
use common::{engine, poison, random};
use xattn::cpu::reference;
use xattn::gpu::pipelines::PipelineCache;
use xattn::gpu::pool::BufferPool;
use xattn::kernels::linear_grad::LinearGrad;
use xattn::kernels::KernelSpec;
use xattn::params::LinearGradParams;
use xattn::plan::{DeviceCaps, LLVMPIPE_LOOP_CAP};
use xattn::DType::{self, Bf16, F16, F32};
use xattn::{Engine, Error, Storage, Tensor};

/// The gradients of one run: dx, dw, db (where there is a bias).
type Grads = (Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// Runs the backward program planned with `caps` on `engine`'s device, every output filled
/// with NaN first (an element no dispatch writes fails any comparison). Returns the gradients
/// and the number of dispatches.
fn run_poisoned(
    engine: &Engine,
    dims @ (rows, in_dim, out_dim): (usize, usize, usize),
    (xt, wt): (DType, DType),
    bias: bool,
    caps: &DeviceCaps,
    (x, w, dy): (&[f32], &[f32], &[f32]),
) -> (Grads, usize) {
    static RESOURCES: OnceLock<(PipelineCache, Arc<BufferPool>)> = OnceLock::new();
    let ctx = engine.context();
    let (cache, pool) =
        RESOURCES.get_or_init(|| (PipelineCache::new(ctx), Arc::new(BufferPool::new(ctx))));
    let (program, [xi, wi, dyi, dxi, dwi, dbi]) = backward_program(dims, (xt, wt), bias, caps);
    let xs = Tensor::upload_as(ctx, "x", x, &[rows, in_dim], xt).unwrap();
    let ws = Tensor::upload_as(ctx, "w", w, &[out_dim, in_dim], wt).unwrap();
    let dys = engine.upload(dy, &[rows, out_dim]).unwrap();
    let dx = Tensor::empty(ctx, "dx", &[rows, in_dim]).unwrap();
    let dw = Tensor::empty(ctx, "dw", &[out_dim, in_dim]).unwrap();
    let db = Tensor::empty(ctx, "db", &[out_dim]).unwrap();
    for t in [&dx, &dw, &db] {
        poison(t).unwrap();
    }
    let mut tensors = HashMap::from([(xi, &xs), (wi, &ws), (dyi, &dys), (dxi, &dx), (dwi, &dw)]);
    if bias {
        tensors.insert(dbi, &db);
    }
    xattn::gpu::executor::run(ctx, (cache, pool), &program, &tensors, None).unwrap();
    let grads = (
        dx.to_host().unwrap(),
        dw.to_host().unwrap(),
        bias.then(|| db.to_host().unwrap()),
    );
    (grads, program.dispatches().count())
}

/// Seeded inputs rounded to their types, and `dy`.
fn inputs(
    (rows, in_dim, out_dim): (usize, usize, usize),
    (xt, wt): (DType, DType),
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        rounded(&random(rows * in_dim, 1.0, seed), xt),
        rounded(&random(out_dim * in_dim, 0.5, seed + 1), wt),
        random(rows * out_dim, 1.0, seed + 2),
    )
}

/// Holds each gradient to the f64 reference within its f32 bound ([`grad_tolerances`]);
/// returns the largest error as a fraction of its bound.
fn check(
    what: &str,
    dims: (usize, usize, usize),
    (x, w, dy): (&[f32], &[f32], &[f32]),
    got: &Grads,
) -> f64 {
    let (want_dx, want_dw, want_db) = reference::linear_backward(x, w, dy, dims.1);
    let [tol_dx, tol_dw, tol_db] = grad_tolerances(x, w, dy, dims);
    let mut worst = assert_close_each(&format!("{what} dx"), &got.0, &want_dx, &tol_dx);
    worst = worst.max(assert_close_each(
        &format!("{what} dw"),
        &got.1,
        &want_dw,
        &tol_dw,
    ));
    if let Some(db) = &got.2 {
        worst = worst.max(assert_close_each(
            &format!("{what} db"),
            db,
            &want_db,
            &tol_db,
        ));
    }
    worst
}

/// The reference against central differences of `L = Σ dy ∘ (x·wᵀ + b)` in f64. L is linear
/// in each single variable, so the difference quotient has no truncation error: what is left
/// is rounding, at most a few ε₆₄·Σ|terms of L| over 2h.
#[test]
fn the_reference_matches_central_differences() {
    let (rows, in_dim, out_dim) = (3, 4, 2);
    let x = random(rows * in_dim, 1.0, 1);
    let w = random(out_dim * in_dim, 1.0, 2);
    let b = random(out_dim, 1.0, 3);
    let dy = random(rows * out_dim, 1.0, 4);
    let f64s = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let (x64, w64, b64, dy64) = (f64s(&x), f64s(&w), f64s(&b), f64s(&dy));
    let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
        let mut l = 0.0;
        for r in 0..rows {
            for o in 0..out_dim {
                let y: f64 = (0..in_dim)
                    .map(|i| x[r * in_dim + i] * w[o * in_dim + i])
                    .sum();
                l += dy64[r * out_dim + o] * (y + b[o]);
            }
        }
        l
    };
    let terms: f64 = (0..rows * out_dim)
        .map(|e| {
            let (r, o) = (e / out_dim, e % out_dim);
            let y: f64 = (0..in_dim)
                .map(|i| (x64[r * in_dim + i] * w64[o * in_dim + i]).abs())
                .sum();
            dy64[e].abs() * (y + b64[o].abs())
        })
        .sum();
    let h = 1e-3;
    let tol = 8.0 * f64::EPSILON * terms / h;
    let (dx, dw, db) = reference::linear_backward(&x, &w, &dy, in_dim);
    let central = |which: usize, at: usize| {
        let mut args = [x64.clone(), w64.clone(), b64.clone()];
        args[which][at] += h;
        let up = loss(&args[0], &args[1], &args[2]);
        args[which][at] -= 2.0 * h;
        let down = loss(&args[0], &args[1], &args[2]);
        (up - down) / (2.0 * h)
    };
    for (which, (name, grad)) in [("dx", &dx), ("dw", &dw), ("db", &db)].iter().enumerate() {
        for (at, &g) in grad.iter().enumerate() {
            let fd = central(which, at);
            assert!(
                (fd - g).abs() <= tol,
                "{name}[{at}]: reference {g}, central difference {fd} (tolerance {tol:e})"
            );
        }
    }
}

/// Every size of rows {1, 3, 67, 200} × in {1, 5, 64, 80, 130} × out {1, 5, 64, 80, 130}, in
/// f32 and in one of the half combinations (native and packed f16, bf16, for x, w or both,
/// rotating), with and without a bias, against the f64 reference on the same rounded values.
#[test]
fn gradients_match_f64_over_awkward_sizes() {
    let Some(engine) = engine() else { return };
    let packed = DeviceCaps {
        native_f16: false,
        ..*engine.caps()
    };
    let halves = [
        ((F16, F16), engine.caps()),
        ((Bf16, Bf16), engine.caps()),
        ((F16, F32), &packed),
        ((F32, Bf16), engine.caps()),
        ((Bf16, F16), &packed),
        ((F32, F16), engine.caps()),
    ];
    let (mut case, mut worst) = (0, 0.0f64);
    for rows in [1, 3, 67, 200] {
        for in_dim in [1, 5, 64, 80, 130] {
            for out_dim in [1, 5, 64, 80, 130] {
                let dims = (rows, in_dim, out_dim);
                let bias = case % 3 != 1;
                let (half, half_caps) = halves[case % halves.len()];
                for (types, caps) in [((F32, F32), engine.caps()), (half, half_caps)] {
                    let storages = (
                        Storage::of(types.0, caps.native_f16).name(),
                        Storage::of(types.1, caps.native_f16).name(),
                    );
                    let what = format!(
                        "{rows}×{in_dim}→{out_dim} x {} w {} bias {bias}",
                        storages.0, storages.1
                    );
                    let (x, w, dy) = inputs(dims, types, 1000 + 10 * case as u64);
                    let (got, _) = run_poisoned(engine, dims, types, bias, caps, (&x, &w, &dy));
                    worst = worst.max(check(&what, dims, (&x, &w, &dy), &got));
                }
                case += 1;
            }
        }
    }
    eprintln!("largest error: {worst:.3} of its bound");
}

/// `Engine::linear_backward` runs the same program: bit for bit the poisoned run's gradients,
/// `dx` shaped like `x` (leading dims kept), `db` only with a bias; typed errors for the rest.
#[test]
fn the_engine_call_is_the_program() {
    let Some(engine) = engine() else { return };
    let ctx = engine.context();
    for (i, (lead, in_dim, out_dim, types, bias)) in [
        (vec![2, 3], 5, 7, (F32, F32), true),
        (vec![67], 130, 64, (Bf16, F16), false),
        (vec![1, 1, 1], 1, 1, (F16, F32), true),
    ]
    .into_iter()
    .enumerate()
    {
        let rows: usize = lead.iter().product();
        let dims = (rows, in_dim, out_dim);
        let (x, w, dy) = inputs(dims, types, 2000 + 10 * i as u64);
        let (want, _) = run_poisoned(engine, dims, types, bias, engine.caps(), (&x, &w, &dy));
        let with = |last| lead.iter().copied().chain([last]).collect::<Vec<usize>>();
        let xs = Tensor::upload_as(ctx, "x", &x, &with(in_dim), types.0).unwrap();
        let ws = Tensor::upload_as(ctx, "w", &w, &[out_dim, in_dim], types.1).unwrap();
        let dys = engine.upload(&dy, &with(out_dim)).unwrap();
        let g = engine.linear_backward(&xs, &ws, &dys, bias).unwrap();
        assert_eq!(g.dx.dims(), xs.dims());
        assert_eq!(g.dw.dims(), [out_dim, in_dim]);
        assert_eq!(
            g.db.as_ref().map(|t| t.dims().to_vec()),
            bias.then(|| vec![out_dim])
        );
        let got = (
            g.dx.to_host().unwrap(),
            g.dw.to_host().unwrap(),
            g.db.map(|t| t.to_host().unwrap()),
        );
        assert!(
            got == want,
            "case {i}: the engine's gradients differ from the program's"
        );
    }

    let x = engine.upload(&[0.0; 6], &[2, 3]).unwrap();
    let w = engine.upload(&[0.0; 12], &[4, 3]).unwrap();
    let dy = engine.upload(&[0.0; 8], &[2, 4]).unwrap();
    let shape = |e: Error| matches!(e, Error::Shape(_));
    let wrong_w = engine.upload(&[0.0; 8], &[4, 2]).unwrap();
    assert!(shape(
        engine.linear_backward(&x, &wrong_w, &dy, true).unwrap_err()
    ));
    let wrong_dy = engine.upload(&[0.0; 6], &[2, 3]).unwrap();
    assert!(shape(
        engine.linear_backward(&x, &w, &wrong_dy, true).unwrap_err()
    ));
    let flat_w = engine.upload(&[0.0; 12], &[12]).unwrap();
    assert!(shape(
        engine.linear_backward(&x, &flat_w, &dy, false).unwrap_err()
    ));
    let half_dy = Tensor::upload_as(ctx, "dy", &[0.0; 8], &[2, 4], F16).unwrap();
    let e = engine.linear_backward(&x, &w, &half_dy, false).unwrap_err();
    assert!(matches!(e, Error::Argument(_)), "{e}");
}

/// A loop cap that leaves 32 terms per dispatch splits both reductions (dx over 80 output
/// features, dw and db over 200 rows); the later ranges continue the earlier sums, so the
/// gradients are the unsplit ones bit for bit (and within the reference's bound).
#[test]
fn split_reductions_give_the_unsplit_bits() {
    let Some(engine) = engine() else { return };
    let split = Engine::with_caps(
        engine.context(),
        DeviceCaps {
            loop_cap: Some(60),
            ..*engine.caps()
        },
    );
    let dims = (200, 130, 80);
    for (i, types) in [(F32, F32), (F16, Bf16)].into_iter().enumerate() {
        let (x, w, dy) = inputs(dims, types, 3000 + 10 * i as u64);
        let (whole, one) = run_poisoned(engine, dims, types, true, engine.caps(), (&x, &w, &dy));
        let (parts, many) = run_poisoned(engine, dims, types, true, split.caps(), (&x, &w, &dy));
        // dx: 80 / 32 → 3 ranges; dw: 200 / 32 → 7 ranges.
        assert_eq!((one, many), (2, 10), "dispatches unsplit and split");
        check(&format!("split {types:?}"), dims, (&x, &w, &dy), &parts);
        assert!(
            parts == whole,
            "{types:?}: the split gradients differ from the unsplit"
        );
    }
}

/// With llvmpipe's loop cap (planned on every adapter), the weight product over 2·span + 5 rows
/// (span: the most the kernel's loop cost lets one dispatch sum) runs as two dispatches of the
/// full span and one of 5: dw and db of ones are the row count exactly, so a dispatch that the
/// device cut short would show. On llvmpipe this proves the loop cost an upper bound.
#[test]
fn the_loop_cap_holds_at_the_largest_dispatch() {
    let Some(engine) = engine() else { return };
    let caps = DeviceCaps {
        loop_cap: Some(LLVMPIPE_LOOP_CAP),
        ..*engine.caps()
    };
    let kernel = LinearGrad { src: Storage::F32 };
    let (cost, _) = kernel.loop_cost(&LinearGradParams::default());
    let span = cost.max_len(LLVMPIPE_LOOP_CAP - 1) as usize;
    let rows = 2 * span + 5;
    let (program, _) = backward_program((rows, 1, 1), (F32, F32), true, &caps);
    let lens: Vec<u32> = program
        .dispatches()
        .filter_map(|d| d.params_as::<LinearGradParams>())
        .filter(|p| p.product == xattn::params::linear_grad::WEIGHT)
        .map(|p| p.k_end - p.k_begin)
        .collect();
    assert_eq!(lens, [span as u32, span as u32, 5], "weight-product ranges");
    let ones = vec![1.0; rows];
    let (got, _) = run_poisoned(
        engine,
        (rows, 1, 1),
        (F32, F32),
        true,
        &caps,
        (&ones, &[0.5], &ones),
    );
    assert_eq!(got.0, vec![0.5; rows], "dx");
    assert_eq!(got.1, [rows as f32], "dw");
    assert_eq!(got.2, Some(vec![rows as f32]), "db");
    // The quirk is real for this kernel: planned without the cap, one dispatch over all the
    // rows is cut short on llvmpipe (a test that fails if llvmpipe stops cutting).
    if engine.caps().loop_cap.is_some() {
        let uncapped = DeviceCaps {
            loop_cap: None,
            ..caps
        };
        let (cut, n) = run_poisoned(
            engine,
            (rows, 1, 1),
            (F32, F32),
            true,
            &uncapped,
            (&ones, &[0.5], &ones),
        );
        assert_eq!(n, 2, "uncapped: one dispatch per product");
        assert!(
            cut.1 != [rows as f32],
            "llvmpipe summed {rows} rows in one dispatch: {:?}",
            cut.1
        );
    }
}

/// `add_into` adds element by element in f32, so its sums are the host's bit for bit: sizes
/// within one workgroup, off its 64, and past 65,535 workgroups (the grid folds into y).
#[test]
fn add_into_sums_as_the_host_does() {
    let Some(engine) = engine() else { return };
    for (i, len) in [1, 63, 64 * 65 + 3, 65_535 * 64 + 5]
        .into_iter()
        .enumerate()
    {
        let acc_host = random(len, 3.0, 40 + i as u64);
        let x_host = random(len, 3.0, 80 + i as u64);
        let acc = engine.upload(&acc_host, &[len]).unwrap();
        let x = engine.upload(&x_host, &[len]).unwrap();
        engine.add_into(&acc, &x).unwrap();
        let want: Vec<f32> = acc_host.iter().zip(&x_host).map(|(a, x)| a + x).collect();
        assert!(acc.to_host().unwrap() == want, "acc + x at {len} elements");
        assert_eq!(x.to_host().unwrap(), x_host, "x is only read");
    }
}

#[test]
fn add_into_refuses_what_it_cannot_sum() {
    let Some(engine) = engine() else { return };
    let a = engine.upload(&random(6, 1.0, 1), &[2, 3]).unwrap();
    let b = engine.upload(&random(6, 1.0, 2), &[3, 2]).unwrap();
    assert!(matches!(engine.add_into(&a, &b), Err(Error::Shape(_))));
    let half = Tensor::upload_as(engine.context(), "h", &random(6, 1.0, 3), &[2, 3], F16).unwrap();
    assert!(matches!(
        engine.add_into(&a, &half),
        Err(Error::Argument(_))
    ));
    let view = a.reshaped(&[2, 3]).unwrap();
    assert!(matches!(
        engine.add_into(&a, &view),
        Err(Error::Argument(_))
    ));
    assert!(matches!(a.reshaped(&[7]), Err(Error::Shape(_))));
}
