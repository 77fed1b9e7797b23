//! The CPU twins of the kernels against the f64 reference: each kernel's algorithm is
//! checked without a GPU, with the same params the planner gives the shaders.

mod common;

use common::*;
use std::collections::HashMap;

use xattn::cpu::program::{floats, run, words, HostBuffers};
use xattn::cpu::reference;
use xattn::mask::Masking;
use xattn::mha::{MhaConfig, NeedWeights};
use xattn::plan::layer::{layer_program, LayerTypes};
use xattn::plan::{MergePlan, Plan, Request};
use xattn::program::{BufferId, Role};
use xattn::{Alignment, Attention, AttnShape, FusedConfig, Path};

/// Runs an attention plan with the CPU executor: (O, LSE, P or empty).
fn run_twins(
    plan: &Plan,
    (q, k, v): (&[f32], &[f32], &[f32]),
    masking: &Masking,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let io = plan.io();
    let inputs = mask_inputs(masking, &plan.shape(), [io.lens, io.mask, io.bias])
        .into_iter()
        .chain([(io.q, words(q)), (io.k, words(k)), (io.v, words(v))])
        .collect();
    let mut out = run(plan.program(), &inputs).unwrap();
    let mut take = |id| floats(&out.remove(&id).unwrap());
    let (o, lse) = (take(io.o), take(io.lse));
    let w = io.weights.map(take).unwrap_or_default();
    (o, lse, w)
}

/// The lengths, mask and bias words the engine would upload, for these ids (a call without
/// a mask or a bias has none: its program declares them absent).
fn mask_inputs(
    masking: &Masking,
    s: &AttnShape,
    [lens, mask, bias]: [xattn::program::BufferId; 3],
) -> HostBuffers {
    let mut inputs = HashMap::from([(lens, masking.lens_words(s))]);
    if let Some(bits) = masking.mask_words() {
        inputs.insert(mask, bits);
    }
    if let Some(values) = masking.bias_values() {
        inputs.insert(bias, words(&values));
    }
    inputs
}

/// The plans of `req`: the planner's own, and for the fused paths one per configuration of
/// the flash kernel (each R, with and without subgroup lanes; forced through the planner),
/// each checked to carry it.
fn plans(req: &Request) -> Vec<(String, Plan)> {
    let mut out = vec![("auto".to_string(), Plan::new(req, &CAPS).unwrap())];
    if req.path == Some(Path::ThreePass) {
        return out;
    }
    for config in FusedConfig::ALL {
        let forced = req.clone().with_fused_config(config);
        let plan = Plan::new(&forced, &CAPS).unwrap();
        let flash: Vec<(u32, bool, bool)> = plan
            .program()
            .dispatches()
            .filter_map(|d| match d.kernel {
                xattn::kernels::Kernel::Flash(xattn::kernels::flash::Flash {
                    r,
                    lanes,
                    broadcast,
                    ..
                }) => Some((r, lanes > 1, broadcast > 1)),
                _ => None,
            })
            .collect();
        let want = (
            config.rows_per_invocation,
            config.subgroup_lanes,
            config.broadcast_loads,
        );
        assert!(
            !flash.is_empty() && flash.iter().all(|&x| x == want),
            "forced {config}, planned {flash:?}\n{plan}"
        );
        out.push((config.to_string(), plan));
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
                dtype: xattn::DType::F32,
                out_dtype: xattn::DType::F32,
                stats: Default::default(),
                pool: None,
                fused: None,
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
                dtype: xattn::DType::F32,
                out_dtype: xattn::DType::F32,
                stats: Default::default(),
                pool: None,
                fused: None,
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

/// The twins under dropout (every path, each flash configuration; unmasked and masked) against
/// the reference with the same keep mask: O within the f32 budget scaled by 1/(1 − p) (plus
/// keep_scale's rounding), the LSE before dropout, the weights 0 exactly where the reference's
/// are (removed or dropped) and within tolerance elsewhere.
#[test]
fn twins_follow_dropout_plans_to_the_reference() {
    let cases = mask_cases().into_iter().step_by(3).chain([(
        "unmasked GQA".to_string(),
        shape(2, 33, 200, 4, 2, 40),
        Attention::default(),
    )]);
    let eps = f64::from(f32::EPSILON);
    for (i, (name, s, opts)) in cases.enumerate() {
        let p = [0.1f32, 0.5, 0.3][i % 3];
        let opts = opts.with_dropout(p, 300 + i as u64, 1 << 33);
        let (q, k, v) = qkv(&s, 1.0, 1300 + i as u64);
        let scale = opts.scale_for(s.d_k);
        let m = opts.masking();
        let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), m);
        let tol = budget_masked(&s, scale, (&q, &k, &v), m);
        let kf = 1.0 / (1.0 - f64::from(p));
        let amax_v = v.iter().fold(0.0f64, |a, &x| a.max(f64::from(x.abs())));
        for path in Path::ALL {
            let req = Request {
                shape: s,
                scale,
                weights: path == Path::ThreePass,
                path: Some(path),
                masks: m.spec(&s).unwrap(),
                dtype: xattn::DType::F32,
                out_dtype: xattn::DType::F32,
                stats: Default::default(),
                pool: None,
                fused: None,
            };
            for (r, plan) in plans(&req) {
                let (o, lse, w) = run_twins(&plan, (&q, &k, &v), m);
                let what = format!("dropout twin {} r{r} {name} p {p} {s}", path.name());
                assert_close(
                    &format!("{what} O"),
                    &o,
                    &want.o,
                    kf * (tol.o + 2.0 * eps * amax_v),
                );
                assert_close(&format!("{what} LSE"), &lse, &want.lse, tol.lse * 10.0);
                if path == Path::ThreePass {
                    for (e, (&g, &x)) in w.iter().zip(&want.weights).enumerate() {
                        assert_eq!(g == 0.0, x == 0.0, "{what}: weight {e} {g} vs {x}");
                    }
                    let tol_w = kf * (tol.weights + 2.0 * eps);
                    assert_close(&format!("{what} P"), &w, &want.weights, tol_w);
                }
            }
        }
    }
}

#[test]
fn weight_blocks_twins_follow_the_statistics_to_the_reference() {
    use common::weight_stats::check_stats;
    use xattn::{Pool, PoolOp, Stats};
    for (i, (name, s, opts)) in mask_cases().into_iter().enumerate() {
        let (q, k, v) = qkv(&s, 1.0, 1700 + i as u64);
        let scale = opts.scale_for(s.d_k);
        let m = opts.masking();
        let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), m);
        let base = budget_masked(&s, scale, (&q, &k, &v), m).lse;
        let pool = Pool {
            max_side: 5,
            op: [PoolOp::Max, PoolOp::Mean][i % 2],
        };
        let req = Request {
            shape: s,
            scale,
            weights: false,
            path: Some(Path::Fused),
            masks: m.spec(&s).unwrap(),
            dtype: xattn::DType::F32,
            out_dtype: xattn::DType::F32,
            stats: Stats::ALL,
            pool: Some(pool),
            fused: None,
        };
        // A small loop cap, so that every statistic takes several accumulating passes.
        let caps = xattn::plan::DeviceCaps {
            loop_cap: Some(2000),
            ..CAPS
        };
        let plan = Plan::new(&req, &caps).unwrap();
        let io = plan.io();
        let inputs = mask_inputs(m, &s, [io.lens, io.mask, io.bias])
            .into_iter()
            .chain([(io.q, words(&q)), (io.k, words(&k)), (io.v, words(&v))])
            .collect();
        let mut out = run(plan.program(), &inputs).unwrap();
        let mut take = |id: Option<_>| id.map(|id| floats(&out.remove(&id).unwrap()));
        let got = xattn::HostOutput {
            o: Vec::new(),
            lse: Vec::new(),
            weights: None,
            stats: xattn::stats::StatsOutput {
                entropy: take(io.stats.entropy),
                focus: take(io.stats.focus),
                coverage: take(io.stats.coverage),
                pooled: take(io.stats.pooled),
            },
        };
        check_stats(
            &format!("twin {name} {s}"),
            &s,
            &got,
            &want.weights,
            pool,
            base,
        );
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

#[test]
fn the_cpu_executor_runs_merge_plans() {
    let s = shape(2, 5, 90, 3, 3, 7);
    let (q, k, v) = qkv(&s, 1.0, 41);
    let scale = 1.0 / (s.d_k as f32).sqrt();
    let want = reference::attention(&s, &q, &k, &v, f64::from(scale));
    // Three shards of the keys, each planned and run on its own, then merged.
    let bounds = [0, 20, 21, 90];
    let mut shards = Vec::new();
    for w in bounds.windows(2) {
        let n = w[1] - w[0];
        let sub = AttnShape { n, ..s };
        let take_keys = |x: &[f32], d: usize| -> Vec<f32> {
            (0..s.batch)
                .flat_map(|b| {
                    let row = s.kv_heads * d;
                    x[(b * s.n + w[0]) * row..(b * s.n + w[1]) * row].to_vec()
                })
                .collect()
        };
        let opts = Attention::default()
            .with_scale(scale)
            .with_path(Path::Fused);
        let req = opts.request(sub).unwrap();
        let plan = Plan::new(&req, &CAPS).unwrap();
        let (o, lse, _) = run_twins(
            &plan,
            (&q, &take_keys(&k, s.d_k), &take_keys(&v, s.d_v)),
            &Masking::default(),
        );
        shards.push((o, lse));
    }
    let merge = MergePlan::new(&s, shards.len(), &CAPS).unwrap();
    let inputs: HostBuffers = merge
        .shards
        .iter()
        .zip(&shards)
        .flat_map(|((o_id, lse_id), (o, lse))| [(*o_id, words(o)), (*lse_id, words(lse))])
        .collect();
    let mut out = run(&merge.program, &inputs).unwrap();
    let tol = budget(&s, scale, &q, &k, &v);
    assert_close(
        "merged O",
        &floats(&out.remove(&merge.o).unwrap()),
        &want.o,
        tol.o,
    );
    assert_close(
        "merged LSE",
        &floats(&out.remove(&merge.lse).unwrap()),
        &want.lse,
        10.0 * tol.lse,
    );
}

/// A layer (GQA 4/2, kdim and vdim ≠ E), its random weights, inputs `(2, 5, 37)` and the
/// f64 projections of its key and value narrowed to f32 (what a source cache holds).
struct LayerCase {
    c: MhaConfig,
    dims: (usize, usize, usize),
    w: xattn::mha::MhaWeights,
    query: Vec<f32>,
    key: Vec<f32>,
    value: Vec<f32>,
    projected: [Vec<f32>; 2],
}

fn layer_case(seed: u64) -> LayerCase {
    let c = MhaConfig {
        kv_heads: 2,
        kdim: 24,
        vdim: 20,
        ..MhaConfig::new(32, 4)
    };
    let (batch, m, n) = (2, 5, 37);
    let w = common::layer::random_weights(&c, seed);
    let key = random(batch * n * c.kdim, 1.0, seed + 2);
    let value = random(batch * n * c.vdim, 1.0, seed + 3);
    let narrow = |x: Vec<f64>| x.into_iter().map(|y| y as f32).collect::<Vec<f32>>();
    let projected = [
        narrow(reference::linear(&key, &w.k, w.k_bias.as_deref(), c.kdim)),
        narrow(reference::linear(&value, &w.v, w.v_bias.as_deref(), c.vdim)),
    ];
    LayerCase {
        query: random(batch * m * c.embed_dim, 1.0, seed + 1),
        c,
        dims: (batch, m, n),
        w,
        key,
        value,
        projected,
    }
}

impl LayerCase {
    /// `inputs` with the layer program's query, source (raw, or projected where `cached`) and
    /// every weight and bias added, checked to be all that `program` reads.
    fn complete(
        &self,
        mut inputs: HostBuffers,
        cached: bool,
        program: &xattn::program::Program,
        (query, source, params): (BufferId, [BufferId; 2], [[BufferId; 2]; 4]),
    ) -> HostBuffers {
        inputs.insert(query, words(&self.query));
        let data = if cached {
            [&self.projected[0], &self.projected[1]]
        } else {
            [&self.key, &self.value]
        };
        for (id, data) in source.iter().zip(data) {
            inputs.insert(*id, words(data));
        }
        let w = &self.w;
        let weights = [&w.q, &w.k, &w.v, &w.o];
        let biases = [&w.q_bias, &w.k_bias, &w.v_bias, &w.o_bias];
        for (i, [wid, bid]) in params.iter().enumerate() {
            inputs.insert(*wid, words(weights[i]));
            inputs.insert(
                *bid,
                words(biases[i].as_ref().expect("the case has every bias")),
            );
        }
        assert_eq!(
            program.ids(Role::Input).count(),
            inputs.len(),
            "every input given"
        );
        inputs
    }
}

#[test]
fn the_cpu_executor_runs_layer_programs() {
    use common::layer::{layer_tolerance, reference_layer};
    let case = layer_case(61);
    let (c, (batch, m, n), w) = (case.c, case.dims, &case.w);
    let (query, key, value) = (&case.query, &case.key, &case.value);
    let attention = Attention::default().with_causal(Alignment::BottomRight);
    let (want, want_p) = reference_layer(&c, w, batch, (query, key, value), &attention);
    let scale = f64::from(attention.scale_for(c.head_dim()));
    let (tol, tol_p) = layer_tolerance(&c, w, [query, key, value], n, scale);
    let shape = c.attn_shape(batch, m, n);
    for cached in [false, true] {
        for need in [
            NeedWeights::None,
            NeedWeights::PerHead,
            NeedWeights::Averaged,
        ] {
            for path in Path::ALL {
                let weights = need != NeedWeights::None;
                if weights && path != Path::ThreePass {
                    continue;
                }
                let req = Request {
                    weights,
                    path: Some(path),
                    ..attention.request(shape).unwrap()
                };
                let kind = (cached, need, [true; 4]);
                let lp = layer_program(&c, &req, kind, LayerTypes::default(), &CAPS).unwrap();
                let inputs = case.complete(
                    mask_inputs(attention.masking(), &shape, lp.masks),
                    cached,
                    &lp.program,
                    (lp.query, lp.source, lp.params),
                );
                let mut out = run(&lp.program, &inputs).unwrap();
                let what = format!("layer cached={cached} {need:?} {}", path.name());
                let got = floats(&out.remove(&lp.out).unwrap());
                assert_close(&format!("{what} out"), &got, &want, tol);
                let p = lp.weights.map(|id| floats(&out.remove(&id).unwrap()));
                match need {
                    NeedWeights::None => assert!(p.is_none()),
                    NeedWeights::PerHead => {
                        assert_close(&format!("{what} P"), &p.unwrap(), &want_p, tol_p);
                    }
                    NeedWeights::Averaged => {
                        let (hs, mn) = (c.num_heads, m * n);
                        let mean: Vec<f64> = (0..batch * mn)
                            .map(|e| {
                                let (b, ij) = (e / mn, e % mn);
                                (0..hs).map(|h| want_p[(b * hs + h) * mn + ij]).sum::<f64>()
                                    / hs as f64
                            })
                            .collect();
                        assert_close(&format!("{what} mean P"), &p.unwrap(), &mean, tol_p);
                    }
                }
            }
        }
    }
}

/// Planner caps with matrix units of both input types (16×16 with f16 inputs, 8×8 with f32),
/// as `tests/shaders.rs` validates them.
fn matrix_caps() -> xattn::plan::DeviceCaps {
    xattn::plan::DeviceCaps {
        matrix_units: Some(xattn::plan::MatrixUnits {
            f32_tile: Some(8),
            f16_tile: Some(16),
        }),
        max_workgroup_bytes: 48 << 10,
        ..CAPS
    }
}

/// The matrix-unit kernel's twin on fused and split-K plans, unmasked over odd shapes (head
/// dims and key counts off the tiles, GQA) and with every mask case, against the reference:
/// with f32 inputs (8×8 tiles) within the f32 budget; with f16 inputs (16×16 tiles, the
/// reference on the same f16 values) within the f32 budget plus what rounding each weight P to
/// f16 may move ([`weight_rounding`]).
#[test]
fn matrix_unit_twin_follows_the_reference() {
    let cases = matrix_unit_shapes()
        .into_iter()
        .map(|s| ("unmasked".to_string(), s, Attention::default()))
        .chain(mask_cases());
    let caps = matrix_caps();
    for (i, (name, s, opts)) in cases.enumerate() {
        for (dtype, want_tile) in [
            (xattn::DType::F32, (8, false)),
            (xattn::DType::F16, (16, true)),
        ] {
            let (q, k, v) = qkv(&s, 1.0, 900 + i as u64);
            let round = |x: &[f32]| x.iter().map(|&y| dtype.round(y)).collect::<Vec<f32>>();
            let (q, k, v) = (round(&q), round(&k), round(&v));
            let scale = opts.scale_for(s.d_k);
            let m = opts.masking();
            let want = reference::attention_masked(&s, &q, &k, &v, f64::from(scale), m);
            let tol = budget_masked(&s, scale, (&q, &k, &v), m);
            let (extra_o, extra_lse) = weight_rounding(want_tile.1, &v);
            for path in [Path::Fused, Path::SplitK] {
                let req = Request {
                    path: Some(path),
                    out_dtype: xattn::DType::F32,
                    ..opts.request_typed(s, dtype).unwrap()
                }
                .with_fused_config(FusedConfig::MATRIX_UNITS);
                let plan = Plan::new(&req, &caps).unwrap();
                let tiles: Vec<(u32, bool)> = plan
                    .program()
                    .dispatches()
                    .filter_map(|d| match d.kernel {
                        xattn::kernels::Kernel::FlashCoop(
                            xattn::kernels::flash_coop::FlashCoop {
                                tile, half_inputs, ..
                            },
                        ) => Some((tile, half_inputs)),
                        _ => None,
                    })
                    .collect();
                assert!(
                    !tiles.is_empty() && tiles.iter().all(|&t| t == want_tile),
                    "{name} {dtype}: planned {tiles:?}\n{plan}"
                );
                let io = plan.io();
                let half =
                    |x: &[f32]| -> Vec<u32> { bytemuck::pod_collect_to_vec(&dtype.encode(x)) };
                let inputs = mask_inputs(m, &s, [io.lens, io.mask, io.bias])
                    .into_iter()
                    .chain([(io.q, half(&q)), (io.k, half(&k)), (io.v, half(&v))])
                    .collect();
                let mut out = run(plan.program(), &inputs).unwrap();
                let o = floats(&out.remove(&io.o).unwrap());
                let lse = floats(&out.remove(&io.lse).unwrap());
                let what = format!("matrix-unit twin {dtype} {} {name} {s}", path.name());
                assert_close(&format!("{what} O"), &o, &want.o, tol.o + extra_o);
                let lse_tol = tol.lse * (1.0 + want.lse.iter().fold(0.0f64, |a, x| a.max(x.abs())));
                assert_close(&format!("{what} LSE"), &lse, &want.lse, lse_tol + extra_lse);
            }
        }
    }
}

/// `linear`'s backward through the CPU executor (outputs start as NaN) against the f64
/// reference within the f32 bound of each element ([`grad_tolerances`]), with and without a
/// bias, f32 and half inputs; and with a loop cap that splits both reductions into 32-term
/// ranges, bit for bit the unsplit result.
///
/// [`grad_tolerances`]: common::linear_grad::grad_tolerances
#[test]
fn linear_backward_twins_match_f64_and_split_alike() {
    use common::linear_grad::{assert_close_each, backward_program, grad_tolerances, rounded};
    use xattn::DType::{Bf16, F16, F32};
    // Per 16-term step 23 loop iterations, 11 fixed: a cap of 60 leaves two steps.
    let split = xattn::plan::DeviceCaps {
        loop_cap: Some(60),
        ..CAPS
    };
    let cases = [
        (67, 130, 80, (F32, F32), true),
        (200, 5, 64, (F16, Bf16), false),
        (3, 64, 130, (Bf16, F32), true),
        (1, 1, 1, (F32, F16), true),
    ];
    for (i, &(rows, in_dim, out_dim, (xt, wt), bias)) in cases.iter().enumerate() {
        let dims = (rows, in_dim, out_dim);
        let seed = 800 + 10 * i as u64;
        let x = rounded(&random(rows * in_dim, 1.0, seed), xt);
        let w = rounded(&random(out_dim * in_dim, 0.5, seed + 1), wt);
        let dy = random(rows * out_dim, 1.0, seed + 2);
        let (want_dx, want_dw, want_db) = reference::linear_backward(&x, &w, &dy, in_dim);
        let [tol_dx, tol_dw, tol_db] = grad_tolerances(&x, &w, &dy, dims);
        let encode = |data: &[f32], t: xattn::DType| -> Vec<u32> {
            bytemuck::pod_collect_to_vec(&t.encode(data))
        };
        let mut results = Vec::new();
        for caps in [CAPS, split] {
            let (program, [xi, wi, dyi, dxi, dwi, dbi]) =
                backward_program(dims, (xt, wt), bias, &caps);
            let inputs = HashMap::from([
                (xi, encode(&x, xt)),
                (wi, encode(&w, wt)),
                (dyi, words(&dy)),
            ]);
            let mut out = run(&program, &inputs).unwrap();
            let what = format!(
                "twin {rows}×{in_dim}→{out_dim} x {xt} w {wt} bias {bias} cap {:?}",
                caps.loop_cap
            );
            let dx = floats(&out.remove(&dxi).unwrap());
            let dw = floats(&out.remove(&dwi).unwrap());
            assert_close_each(&format!("{what} dx"), &dx, &want_dx, &tol_dx);
            assert_close_each(&format!("{what} dw"), &dw, &want_dw, &tol_dw);
            let db = out.remove(&dbi).map(|db| floats(&db));
            assert_eq!(
                db.is_some(),
                bias,
                "{what}: db is an output iff there is a bias"
            );
            if let Some(db) = &db {
                assert_close_each(&format!("{what} db"), db, &want_db, &tol_db);
            }
            results.push((program.dispatches().count(), (dx, dw, db)));
        }
        let [(whole, unsplit), (parts, split)] = &results[..] else {
            unreachable!("two runs")
        };
        if rows.max(out_dim) > 32 {
            assert!(
                parts > whole,
                "case {i}: the small cap splits ({parts} dispatches)"
            );
        }
        assert!(
            unsplit == split,
            "case {i}: a split sum differs from the whole"
        );
    }
}

/// The layer's backward program (forward recomputed, W^O's, the attention's and the
/// projections' backward) on the CPU executor, raw and cached source, against the f64
/// layer reference within the GPU tests' budget.
#[test]
fn the_cpu_executor_runs_the_layer_backward_program() {
    use common::layer_grad::{cached, compare, HostLayerGrads};
    use xattn::mha::reference::layer_backward;
    use xattn::plan::layer_backward::layer_backward_program;
    use xattn::{DType, Stats};
    let case = layer_case(81);
    let (c, (batch, m, n), w) = (case.c, case.dims, &case.w);
    let (query, key, value) = (&case.query, &case.key, &case.value);
    let d_out = random(batch * m * c.embed_dim, 1.0, 85);
    let attention = Attention::default()
        .with_causal(Alignment::BottomRight)
        .with_kv_lens(vec![30, 37]);
    let scale = f64::from(attention.scale_for(c.head_dim()));
    let masking = attention.masking();
    let want = layer_backward(&c, w, (query, key, value), &d_out, batch, scale, masking);
    let shape = c.attn_shape(batch, m, n);
    let req = Request {
        weights: false,
        stats: Stats::default(),
        out_dtype: DType::F32,
        ..attention.request(shape).unwrap()
    };
    for is_cached in [false, true] {
        let lb = layer_backward_program(
            &c,
            &req,
            (is_cached, [true; 4]),
            (DType::F32, DType::F32),
            &CAPS,
        )
        .unwrap();
        let mut masks = mask_inputs(masking, &shape, lb.masks);
        masks.insert(lb.d_out, words(&d_out));
        let inputs = case.complete(
            masks,
            is_cached,
            &lb.program,
            (lb.query, lb.source, lb.params),
        );
        let mut out = run(&lb.program, &inputs).unwrap();
        let mut take = |id| floats(&out.remove(&id).unwrap());
        let got = HostLayerGrads {
            d_query: take(lb.d_inputs[0]),
            d_key: take(lb.d_inputs[1]),
            d_value: take(lb.d_inputs[2]),
            d_weights: lb.d_params.map(|[dw, _]| dw.map(&mut take)),
            d_biases: lb.d_params.map(|[_, db]| db.map(&mut take)),
        };
        let (name, want) = if is_cached {
            ("CPU layer backward, cached", cached(&want))
        } else {
            ("CPU layer backward", want.clone())
        };
        let worst = compare(name, &c, (batch, m, n), scale, w, [1.0, 1.0], &got, &want);
        eprintln!("{name}: worst error {worst:.4} of budget");
    }
}

/// The `add` twin through the CPU executor: a copy puts `a` in the (NaN-poisoned) output,
/// `add` adds `x`, element by element in f32 as the host does, off the workgroup's 64.
#[test]
fn the_cpu_executor_runs_add() {
    let len = 64 * 3 + 5;
    let (a, x) = (random(len, 2.0, 1), random(len, 2.0, 2));
    let mut program = xattn::program::Program::new();
    let bytes = 4 * len as u64;
    let (ai, xi, acc) = (
        program.input("a", bytes),
        program.input("x", bytes),
        program.output("acc", bytes),
    );
    program.copy((ai, 0), (acc, 0), bytes);
    xattn::plan::add(&mut program, len, [xi, acc], &CAPS).unwrap();
    let inputs = HashMap::from([(ai, words(&a)), (xi, words(&x))]);
    let got = floats(&run(&program, &inputs).unwrap()[&acc]);
    let want: Vec<f32> = a.iter().zip(&x).map(|(a, x)| a + x).collect();
    assert!(got == want, "acc = a + x");
}
