//! The fused kernel on matrix units (`flash_coop`, `FusedConfig::MATRIX_UNITS`) on the test
//! adapter. Where the device has matrix units (`XATTN_MATRIX_UNITS=1` on an adapter that
//! reports fitting ones: see README, "Matrix units"), this is the kernel's check on real
//! hardware: fused and split-K, f32 and f16 inputs as its tiles allow, unmasked over odd
//! shapes and with every mask case, NaN-poisoned outputs, against the f64 reference. Elsewhere
//! (lavapipe, GL) forcing it must be a typed error that says why.

mod common;

use common::*;
use xattn::cpu::reference;
use xattn::kernels::Kernel;
use xattn::{Attention, DType, FusedConfig, Path, Tensor};

#[test]
fn matrix_units_match_the_reference_or_are_refused() {
    let Some(engine) = engine() else { return };
    let Some(units) = engine.caps().matrix_units else {
        let s = shape(1, 40, 77, 2, 2, 64);
        let (q, k, v) = qkv(&s, 1.0, 1500);
        for path in [Path::Fused, Path::SplitK] {
            let opts = Attention::default()
                .with_path(path)
                .with_fused_config(FusedConfig::MATRIX_UNITS);
            let err = run_poisoned(engine, &s, (&q, &k, &v), &opts).unwrap_err();
            assert!(
                matches!(err, xattn::Error::Argument(_))
                    && err.to_string().contains("cooperative matrices"),
                "{err}"
            );
        }
        return;
    };
    let mut dtypes = Vec::new();
    if units.f32_tile.is_some() {
        dtypes.push(DType::F32);
    }
    if units.f16_tile.is_some() && engine.caps().native_f16 {
        dtypes.push(DType::F16);
    }
    assert!(
        !dtypes.is_empty(),
        "matrix units {units:?} take none of f32, native f16"
    );
    let cases = matrix_unit_shapes()
        .into_iter()
        .map(|s| ("unmasked".to_string(), s, Attention::default()))
        .chain(mask_cases());
    let ctx = engine.context();
    for (i, (name, s, opts)) in cases.enumerate() {
        for &dtype in &dtypes {
            let (q, k, v) = qkv(&s, 1.0, 1600 + i as u64);
            let round = |x: &[f32]| x.iter().map(|&y| dtype.round(y)).collect::<Vec<f32>>();
            let (q, k, v) = (round(&q), round(&k), round(&v));
            let scale = opts.scale_for(s.d_k);
            let m = opts.masking();
            let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), m);
            let tol = budget_masked(&s, scale, (&q, &k, &v), m);
            let (extra_o, extra_lse) = weight_rounding(dtype == DType::F16, &v);
            let up = |x: &[f32], dims: [usize; 4]| Tensor::upload_as(ctx, "x", x, &dims, dtype);
            let (tq, tk, tv) = (
                up(&q, s.q_dims()).unwrap(),
                up(&k, s.k_dims()).unwrap(),
                up(&v, s.v_dims()).unwrap(),
            );
            for path in [Path::Fused, Path::SplitK] {
                let opts = opts
                    .clone()
                    .with_path(path)
                    .with_out_dtype(DType::F32)
                    .with_fused_config(FusedConfig::MATRIX_UNITS);
                let what = format!("matrix units {dtype} {} {name} {s}", path.name());
                let plan = engine
                    .plan(&tq, &tk, &tv, &opts)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(
                    plan.program()
                        .dispatches()
                        .any(|d| matches!(d.kernel, Kernel::FlashCoop(_))),
                    "{what}: {plan}"
                );
                let call = engine
                    .prepare(&tq, &tk, &tv, &opts)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(call.plan().to_string(), plan.to_string(), "{what}");
                poison(call.o()).unwrap();
                poison(call.lse()).unwrap();
                call.run().unwrap_or_else(|e| panic!("{what}: {e}"));
                let out = call.into_output();
                let o = out.o.to_host().unwrap();
                let lse = out.lse.to_host().unwrap();
                assert_close(&format!("{what} O"), &o, &want.o, tol.o + extra_o);
                let lse_tol = tol.lse * (1.0 + want.lse.iter().fold(0.0f64, |a, x| a.max(x.abs())));
                assert_close(&format!("{what} LSE"), &lse, &want.lse, lse_tol + extra_lse);
            }
        }
    }
}
