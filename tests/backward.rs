//! The backward of attention (dQ, dK, dV, dBias) on the GPU against the f64 analytic
//! reference, itself checked by central finite differences; every masking case, GQA/MQA,
//! d_v ≠ d_k, half inputs, passes split under a loop cap, the CPU executor, and the errors;
//! within the budgets `xattn::cpu::budget` derives per gradient.

mod common;

use common::*;

use xattn::cpu::budget::grad_budget;
use xattn::cpu::program::{floats, run, words, HostBuffers};
use xattn::cpu::reference::{self, RefGrads};
use xattn::plan::{BackwardPlan, DeviceCaps};
use xattn::{Alignment, Attention, AttnShape, DType, Engine, Error, Grads, HostGrads, Tensor};

/// Host inputs of one case: Q, K, V, dO.
struct Case {
    s: AttnShape,
    opts: Attention,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
}

impl Case {
    fn new(s: AttnShape, opts: Attention, seed: u64) -> Case {
        let (q, k, v) = qkv(&s, 1.0, seed);
        let d_o = random(s.o_dims().iter().product(), 1.0, seed + 3);
        Case {
            s,
            opts,
            q,
            k,
            v,
            d_o,
        }
    }

    fn reference(&self) -> RefGrads {
        let scale = f64::from(self.opts.scale_for(self.s.d_k));
        reference::attention_backward(
            &self.s,
            (&self.q, &self.k, &self.v),
            &self.d_o,
            scale,
            self.opts.masking(),
        )
    }
}

/// Forward then backward on `engine` with every gradient poisoned first; host gradients.
fn run_backward(engine: &Engine, c: &Case, opts: &Attention) -> xattn::Result<HostGrads> {
    let q = engine.upload(&c.q, &c.s.q_dims())?;
    let k = engine.upload(&c.k, &c.s.k_dims())?;
    let v = engine.upload(&c.v, &c.s.v_dims())?;
    let out = engine.attention(&q, &k, &v, opts)?;
    let d_o = engine.upload(&c.d_o, &c.s.o_dims())?;
    let call = engine.prepare_backward((&q, &k, &v), (&out.o, &out.lse), &d_o, opts)?;
    let g: &Grads = call.output();
    for t in [&g.dq, &g.dk, &g.dv].into_iter().chain(g.dbias.as_ref()) {
        poison(t)?;
    }
    call.run()?;
    let g = call.into_output();
    Ok(HostGrads {
        dq: g.dq.to_host()?,
        dk: g.dk.to_host()?,
        dv: g.dv.to_host()?,
        dbias: g.dbias.as_ref().map(Tensor::to_host).transpose()?,
    })
}

/// Checks the GPU gradients of `c` under `opts` against the reference; returns the worst
/// errors relative to their budgets.
fn check(engine: &Engine, name: &str, c: &Case, opts: &Attention) -> f64 {
    let HostGrads { dq, dk, dv, dbias } =
        run_backward(engine, c, opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    let want = c.reference();
    let scale = opts.scale_for(c.s.d_k);
    let b = grad_budget(&c.s, scale, (&c.q, &c.k, &c.v, &c.d_o), opts.masking());
    let mut worst = 0.0f64;
    worst = worst.max(assert_close(&format!("{name} dQ"), &dq, &want.dq, b.dq) / b.dq);
    worst = worst.max(assert_close(&format!("{name} dK"), &dk, &want.dk, b.dk) / b.dk);
    worst = worst.max(assert_close(&format!("{name} dV"), &dv, &want.dv, b.dv) / b.dv);
    if let (Some(got), Some(bias)) = (dbias, &opts.masking().bias) {
        let dims = bias.dims;
        let terms = (c.s.batch / dims[0]) * (c.s.q_heads / dims[1]) * (c.s.m / dims[2]);
        let tol = b.dbias_per_term * (b.dbias_len + terms as f64) * terms as f64;
        let want = reference::reduce_to(&c.s, &want.ds, dims);
        worst = worst.max(assert_close(&format!("{name} dBias"), &got, &want, tol) / tol);
    }
    worst
}

#[test]
fn reference_backward_matches_finite_differences() {
    // L = Σ O ∘ dO; dL/dx by central differences of the f64 reference forward.
    use Alignment::BottomRight;
    let s = shape(2, 5, 7, 4, 2, 3);
    let cases = [
        ("plain", Attention::default()),
        (
            "causal + softcap + segment + bias + mask + lengths",
            Attention::default()
                .with_causal(BottomRight)
                .with_softcap(1.5)
                .with_scale(1.3)
                .with_key_segment(2, 4, 1.7)
                .with_bias([1, 4, 5, 7], random(4 * 5 * 7, 1.0, 5))
                .with_mask([2, 1, 1, 7], random_bools(14, 0.8, 6))
                .with_kv_lens(vec![7, 6]),
        ),
        (
            "dropout + causal + GQA",
            Attention::default()
                .with_causal(Alignment::TopLeft)
                .with_dropout(0.3, 17, 5),
        ),
    ];
    for (name, opts) in cases {
        let c = Case::new(s, opts.clone(), 11);
        let scale = f64::from(opts.scale_for(s.d_k));
        let loss = |q: &[f64], k: &[f64], v: &[f64], bias: Option<&[f64]>| -> f64 {
            let mut m = opts.masking().clone();
            if let (Some(bm), Some(b)) = (&mut m.bias, bias) {
                bm.data = b.iter().map(|&x| x as f32).collect();
            }
            // The reference takes f64 inputs; a bias is held in f32, perturbed by h below
            // only through values f32 carries exactly (see h).
            let r = reference::attention_masked(&s, q, k, v, scale, &m);
            r.o.iter().zip(&c.d_o).map(|(o, &g)| o * f64::from(g)).sum()
        };
        let to64 = |x: &[f32]| x.iter().map(|&y| f64::from(y)).collect::<Vec<f64>>();
        let (q, k, v) = (to64(&c.q), to64(&c.k), to64(&c.v));
        let want = c.reference();
        let h = 1e-5;
        let fd = |which: usize, e: usize| {
            let mut t = [q.clone(), k.clone(), v.clone()];
            t[which][e] += h;
            let up = loss(&t[0], &t[1], &t[2], None);
            t[which][e] -= 2.0 * h;
            let down = loss(&t[0], &t[1], &t[2], None);
            (up - down) / (2.0 * h)
        };
        for (which, name_t, analytic) in [
            (0, "dQ", &want.dq),
            (1, "dK", &want.dk),
            (2, "dV", &want.dv),
        ] {
            for (e, &a) in analytic.iter().enumerate() {
                let numeric = fd(which, e);
                assert!(
                    (numeric - a).abs() <= 1e-6 * (1.0 + numeric.abs()),
                    "{name}: {name_t}[{e}] analytic {a} vs finite differences {numeric}"
                );
            }
        }
        // dBias: the bias is f32 in Masking; perturb by a step f32 carries exactly around
        // each value (2^-12 relative), where the quadratic error of the central difference
        // is still far below the tolerance.
        if let Some(bias) = &opts.masking().bias {
            let dims = bias.dims;
            let reduced = reference::reduce_to(&s, &want.ds, dims);
            for e in 0..bias.data.len() {
                let x = bias.data[e];
                let step = f64::from(x.abs().max(1.0)) * 2f64.powi(-12);
                let mut b: Vec<f64> = bias.data.iter().map(|&y| f64::from(y)).collect();
                b[e] = f64::from(x) + step;
                let up = loss(&q, &k, &v, Some(&b));
                b[e] = f64::from(x) - step;
                let down = loss(&q, &k, &v, Some(&b));
                let numeric = (up - down) / (2.0 * step);
                assert!(
                    (numeric - reduced[e]).abs() <= 1e-4 * (1.0 + numeric.abs()),
                    "{name}: dBias[{e}] analytic {} vs finite differences {numeric}",
                    reduced[e]
                );
            }
        }
    }
}

#[test]
fn gradients_match_the_reference_on_every_masking_case() {
    let Some(engine) = engine() else { return };
    let cases = mask_cases();
    let last = cases.len() - 1;
    for (i, (name, s, opts)) in cases.into_iter().enumerate() {
        // On GL, where llvmpipe compiles each specialization slowly, a spread of the cases:
        // bottom-right causal with M > N (rows that see nothing), lengths, a full mask,
        // ALiBi with dBias, GQA and the case that combines every control.
        if on_gl(engine) && ![6, 10, 12, 15, last - 2, last].contains(&i) {
            continue;
        }
        let opts = if opts.masking().bias.is_some() {
            opts.with_bias_grad()
        } else {
            opts
        };
        let c = Case::new(s, opts.clone(), 100 + i as u64);
        let worst = check(engine, &name, &c, &opts);
        eprintln!("{name}: worst error {worst:.3} of budget");
    }
}

#[test]
fn gradients_match_the_reference_on_plain_shapes() {
    let Some(engine) = engine() else { return };
    let cases = [
        ("M=1 decode", shape(1, 1, 300, 4, 4, 64)),
        ("N=1", shape(2, 9, 1, 2, 2, 8)),
        ("d=1", shape(1, 17, 23, 1, 1, 1)),
        ("d=3 GQA", shape(2, 33, 29, 6, 2, 3)),
        ("d=80 MQA", shape(1, 70, 90, 3, 1, 80)),
        ("d=128", shape(1, 65, 66, 2, 2, 128)),
        ("d=256", shape(1, 20, 30, 1, 1, 256)),
        (
            "d_v ≠ d_k",
            AttnShape {
                d_v: 24,
                ..shape(2, 40, 50, 4, 2, 40)
            },
        ),
    ];
    for (i, (name, s)) in cases.into_iter().enumerate() {
        // On GL a spread: N = 1, GQA at d = 3, MQA at d = 80, d_v ≠ d_k.
        if on_gl(engine) && ![1, 3, 4, 7].contains(&i) {
            continue;
        }
        let c = Case::new(s, Attention::default(), 200 + i as u64);
        let worst = check(engine, name, &c, &Attention::default());
        eprintln!("{name}: worst error {worst:.3} of budget");
    }
}

#[test]
fn passes_split_under_a_loop_cap_give_the_same_gradients() {
    let Some(engine) = engine() else { return };
    // A cap this small splits grad_kv into one head at a time and row passes of one tile,
    // grad_q into key passes of two tiles and grad_bias into passes of a few terms.
    let caps = DeviceCaps {
        loop_cap: Some(200),
        ..*engine.caps()
    };
    let small = Engine::with_caps(engine.context(), caps);
    let s = shape(2, 130, 150, 4, 2, 16);
    let opts = Attention::default()
        .with_causal(Alignment::BottomRight)
        .with_bias([2, 1, 1, 150], random(300, 1.0, 7))
        .with_bias_grad();
    let req = opts.request(s).unwrap();
    let plan = BackwardPlan::new(&req, (DType::F32, DType::F32), true, small.caps()).unwrap();
    let count = |name: &str| {
        plan.program()
            .dispatches()
            .filter(|d| d.kernel.name() == name)
            .count()
    };
    assert!(count("grad_kv") > 4, "{plan}");
    assert!(count("grad_q") > 1, "{plan}");
    assert!(count("grad_bias") > 1, "{plan}");
    let c = Case::new(s, opts.clone(), 300);
    check(&small, "split passes", &c, &opts);
}

#[test]
fn half_inputs_accumulate_in_f32() {
    let Some(engine) = engine() else { return };
    let s = shape(2, 45, 70, 4, 2, 24);
    for dtype in [DType::F16, DType::Bf16] {
        let mut c = Case::new(s, Attention::default(), 400);
        // The inputs as the device holds them: rounded to the half type.
        let round = |x: &mut Vec<f32>| *x = dtype.decode(&dtype.encode(x), x.len());
        for t in [&mut c.q, &mut c.k, &mut c.v, &mut c.d_o] {
            round(t);
        }
        let up = |x: &[f32], dims: [usize; 4]| {
            Tensor::upload_as(engine.context(), "in", x, &dims, dtype).unwrap()
        };
        let (q, k, v) = (
            up(&c.q, s.q_dims()),
            up(&c.k, s.k_dims()),
            up(&c.v, s.v_dims()),
        );
        let opts = Attention::default().with_grad_dtype(DType::F32);
        let out = engine.attention(&q, &k, &v, &opts).unwrap();
        let d_o = up(&c.d_o, s.o_dims());
        let g = engine
            .attention_backward((&q, &k, &v), (&out.o, &out.lse), &d_o, &opts)
            .unwrap();
        let want = c.reference();
        // O is stored in the half type before D = rowsum(dO ∘ O) reads it: D is off by the
        // rounding of O, u·Σ|dO·O| ≤ u·d_v·max|dO|·max|V|, which dS carries like an error of dP.
        let u = if dtype == DType::F16 {
            2f64.powi(-11)
        } else {
            2f64.powi(-8)
        };
        let b = grad_budget(
            &s,
            opts.scale_for(s.d_k),
            (&c.q, &c.k, &c.v, &c.d_o),
            opts.masking(),
        );
        let b = b.with_half_o(u);
        for (what, t, want, tol) in [
            ("dQ", &g.dq, &want.dq, b.dq),
            ("dK", &g.dk, &want.dk, b.dk),
            ("dV", &g.dv, &want.dv, b.dv),
        ] {
            assert_eq!(t.dtype(), DType::F32);
            assert_close(&format!("{dtype} {what}"), &t.to_host().unwrap(), want, tol);
        }
    }
}

#[test]
fn the_cpu_executor_runs_the_backward_program() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 20, 33, 4, 2, 8);
    let opts = Attention::default()
        .with_causal(Alignment::TopLeft)
        .with_softcap(2.0)
        .with_bias([1, 4, 20, 33], random(4 * 20 * 33, 0.5, 8))
        .with_bias_grad();
    let c = Case::new(s, opts.clone(), 500);
    let gpu = run_backward(engine, &c, &opts).unwrap();
    // The twins from the GPU forward's O and LSE.
    let q = engine.upload(&c.q, &s.q_dims()).unwrap();
    let k = engine.upload(&c.k, &s.k_dims()).unwrap();
    let v = engine.upload(&c.v, &s.v_dims()).unwrap();
    let out = engine.attention(&q, &k, &v, &opts).unwrap();
    let plan = BackwardPlan::new(
        &opts.request(s).unwrap(),
        (DType::F32, DType::F32),
        true,
        &CAPS,
    )
    .unwrap();
    let io = plan.io();
    let m = opts.masking();
    let mut inputs: HostBuffers = [
        (io.q, words(&c.q)),
        (io.k, words(&c.k)),
        (io.v, words(&c.v)),
        (io.o, words(&out.o.to_host().unwrap())),
        (io.lse, words(&out.lse.to_host().unwrap())),
        (io.d_o, words(&c.d_o)),
        (io.lens, m.lens_words(&s)),
        (io.bias, words(&m.bias_values().unwrap())),
    ]
    .into_iter()
    .collect();
    inputs.retain(|_, w| !w.is_empty());
    let mut got = run(plan.program(), &inputs).unwrap();
    let mut take = |id| floats(&got.remove(&id).unwrap());
    let b = grad_budget(&s, opts.scale_for(s.d_k), (&c.q, &c.k, &c.v, &c.d_o), m);
    let to64 = |x: &[f32]| x.iter().map(|&y| f64::from(y)).collect::<Vec<f64>>();
    // Twin and kernel each within budget of the reference, so within twice it of each other.
    assert_close("twin vs GPU dQ", &take(io.dq), &to64(&gpu.dq), 2.0 * b.dq);
    assert_close("twin vs GPU dK", &take(io.dk), &to64(&gpu.dk), 2.0 * b.dk);
    assert_close("twin vs GPU dV", &take(io.dv), &to64(&gpu.dv), 2.0 * b.dv);
    let db = take(io.dbias.unwrap());
    let tol = b.dbias_per_term * (b.dbias_len + 1.0);
    assert_close(
        "twin vs GPU dBias",
        &db,
        &to64(&gpu.dbias.unwrap()),
        2.0 * tol,
    );
}

#[test]
fn bad_backward_calls_are_typed_errors() {
    let Some(engine) = engine() else { return };
    let s = shape(1, 4, 5, 2, 2, 8);
    let c = Case::new(s, Attention::default(), 600);
    let q = engine.upload(&c.q, &s.q_dims()).unwrap();
    let k = engine.upload(&c.k, &s.k_dims()).unwrap();
    let v = engine.upload(&c.v, &s.v_dims()).unwrap();
    let opts = Attention::default();
    let out = engine.attention(&q, &k, &v, &opts).unwrap();
    let d_o = engine.upload(&c.d_o, &s.o_dims()).unwrap();
    let bad_do = engine.upload(&c.d_o, &[1, 4, 2, 8, 1]).unwrap();
    let err = engine
        .attention_backward((&q, &k, &v), (&out.o, &out.lse), &bad_do, &opts)
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    let err = engine
        .attention_backward(
            (&q, &k, &v),
            (&out.o, &out.lse),
            &d_o,
            &opts.clone().with_bias_grad(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("no bias"), "{err}");
    let err = engine
        .attention_backward((&q, &k, &v), (&out.lse, &out.lse), &d_o, &opts)
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    let wide = shape(1, 2, 2, 1, 1, 300);
    let (q, k, v) = qkv(&wide, 1.0, 601);
    let err = engine
        .attention_backward_host(
            (&q, wide.q_dims()),
            (&k, wide.k_dims()),
            (&v, wide.v_dims()),
            &random(600, 1.0, 602),
            &opts.clone().with_path(xattn::Path::ThreePass),
        )
        .unwrap_err();
    assert!(err.to_string().contains("up to 256"), "{err}");
}

#[test]
fn dropout_gradients_use_the_forwards_mask() {
    let Some(engine) = engine() else { return };
    use Alignment::BottomRight;
    let s = shape(2, 70, 90, 4, 2, 16);
    let cases = [
        ("p 0.1", Attention::default().with_dropout(0.1, 1, 0)),
        (
            "p 0.5 causal + bias + lengths",
            Attention::default()
                .with_dropout(0.5, 99, 1 << 40)
                .with_causal(BottomRight)
                .with_kv_lens(vec![90, 61])
                .with_bias([1, 4, 70, 90], random(4 * 70 * 90, 1.0, 9))
                .with_bias_grad(),
        ),
    ];
    for (i, (name, opts)) in cases.into_iter().enumerate() {
        // The reference draws the same mask from the twin's Philox; a backward that
        // regenerated another mask (or none) would miss by O(1).
        let c = Case::new(s, opts.clone(), 700 + i as u64);
        let worst = check(engine, name, &c, &opts);
        eprintln!("dropout {name}: worst error {worst:.3} of budget");
    }
    // Another offset is another mask: the gradients move by far more than the budget.
    let c = Case::new(s, Attention::default().with_dropout(0.5, 1, 0), 710);
    let a = run_backward(engine, &c, &c.opts).unwrap();
    let b = run_backward(engine, &c, &c.opts.clone().with_dropout(0.5, 1, 1)).unwrap();
    let moved =
        a.dv.iter()
            .zip(&b.dv)
            .filter(|(x, y)| (*x - *y).abs() > 1e-3)
            .count();
    assert!(
        moved > a.dv.len() / 4,
        "{moved} of {} dV elements moved",
        a.dv.len()
    );
}

#[test]
fn the_loop_cap_holds_at_the_largest_dispatch() {
    let Some(engine) = engine() else { return };
    // 70,000 keys for one row (grad_q) and 70,000 rows for one key (grad_kv): each kernel's
    // first pass runs as long as its loop cost allows under llvmpipe's cap (on such a device),
    // so a cost that undercounted would let llvmpipe cut the loop and drop keys or rows.
    for (name, s) in [
        ("one row, 70,000 keys", shape(1, 1, 70_000, 1, 1, 8)),
        ("70,000 rows, one key", shape(1, 70_000, 1, 1, 1, 8)),
    ] {
        let opts = Attention::default();
        let c = Case::new(s, opts.clone(), 800);
        let req = opts.request(s).unwrap();
        let plan = BackwardPlan::new(&req, (DType::F32, DType::F32), false, engine.caps()).unwrap();
        if engine.caps().loop_cap.is_some() {
            let passes = plan
                .program()
                .dispatches()
                .filter(|d| matches!(d.kernel.name(), "grad_q" | "grad_kv"))
                .count();
            assert!(passes > 2, "{name}: expected split passes\n{plan}");
        }
        check(engine, name, &c, &opts);
    }
}
