//! `mpirun -n R xattn run --distributed` on localhost (the `mpi` feature; Open MPI's mpirun on
//! the PATH): R = 2, 3 and 4 ranks, LV-XAttn and Ring Attention, every mask kind, uneven and
//! empty shards, GQA, f16 and bf16, each against the single-device call and the f64 reference
//! within the merge's f32 bound; the byte counters against the byte model; a rank with bad
//! input, no device or another call makes mpirun exit non-zero, with that rank's error and no
//! output file.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::files::*;
use common::*;
use xattn::cpu::budget::grad_budget;
use xattn::cpu::reference;
use xattn::{Alignment, Attention, AttnShape, DType, Tensor};

/// `mpirun -n R` (oversubscribed: more ranks than cores; as root where the tests run as root)
/// on the xattn binary with `args`, killed after 120 s: a hang fails the test.
fn mpirun(ranks: usize, args: &[String]) -> Output {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "-n",
        &ranks.to_string(),
        "--oversubscribe",
        "--allow-run-as-root",
    ])
    .arg(env!("CARGO_BIN_EXE_xattn"))
    .args(args);
    output_within(cmd, 120)
}

/// Several programs under one mpirun (Open MPI's `a : b`): rank p runs `apps[p]`, each a
/// program and its arguments.
fn mpirun_each(apps: &[Vec<String>]) -> Output {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "--allow-run-as-root"]);
    for (i, app) in apps.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-n", "1"]).args(app);
    }
    output_within(cmd, 120)
}

fn text(p: &Path) -> String {
    p.to_str().expect("temp paths are UTF-8").to_string()
}

/// One distributed case: its shape, options (as the reference and the single-device call take
/// them) and the same as flags and files, its ranks, schedule and shards.
struct Case {
    name: &'static str,
    s: AttnShape,
    opts: Attention,
    flags: Vec<String>,
    dtype: DType,
    ranks: usize,
    mode: &'static str,
    shards: Option<Vec<usize>>,
}

/// The single-device call on the test engine: O (f32) and LSE, outputs poisoned first.
fn single(case: &Case, (q, k, v): (&[f32], &[f32], &[f32])) -> (Vec<f32>, Vec<f32>) {
    let engine = engine().expect("checked by the caller");
    let ctx = engine.context();
    let s = &case.s;
    let up = |name, x: &[f32], d: [usize; 4]| Tensor::upload_as(ctx, name, x, &d, case.dtype);
    let (qt, kt, vt) = (
        up("q", q, s.q_dims()).unwrap(),
        up("k", k, s.k_dims()).unwrap(),
        up("v", v, s.v_dims()).unwrap(),
    );
    let opts = case.opts.clone().with_out_dtype(DType::F32);
    let call = engine.prepare(&qt, &kt, &vt, &opts).unwrap();
    poison(&call.output().o).unwrap();
    poison(&call.output().lse).unwrap();
    call.run().unwrap();
    let out = call.into_output();
    (out.o.to_host().unwrap(), out.lse.to_host().unwrap())
}

fn amax(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |a, &y| a.max(f64::from(y.abs())))
}

/// Runs `case` under mpirun (its inputs and outputs in `dir`, beside the mask files) and checks O and LSE against the reference and the single-device
/// call, and rank 0's report of the bytes against the model.
fn check(case: &Case, dir: &TempDir, seed: u64) {
    let s = &case.s;
    let (q, k, v) = write_inputs(case, dir, seed);
    let (o_path, lse_path) = (dir.path("o.npy"), dir.path("lse.npy"));
    let mut args: Vec<String> = ["run", "--distributed", "--mode", case.mode]
        .map(String::from)
        .to_vec();
    for name in ["q", "k", "v"] {
        args.extend([format!("--{name}"), text(&dir.path(&format!("{name}.npy")))]);
    }
    args.extend([
        "--out".into(),
        text(&o_path),
        "--lse".into(),
        text(&lse_path),
    ]);
    args.extend(["--out-dtype".into(), "f32".into()]);
    if let Some(cuts) = &case.shards {
        let cuts: Vec<String> = cuts.iter().map(usize::to_string).collect();
        args.extend(["--shards".into(), cuts.join(",")]);
    }
    args.extend(
        case.flags
            .iter()
            .map(|f| f.replace("{dir}", &text(&dir.path("")))),
    );
    let what = format!("{} R={} {}", case.name, case.ranks, case.mode);
    let started = std::time::Instant::now();
    let out = mpirun(case.ranks, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: mpirun failed: {err}");
    eprintln!("{what}: {:.1} s\n{err}", started.elapsed().as_secs_f64());
    let (got_o, o_dims) = read_npy::<f32>(&o_path);
    let (got_lse, lse_dims) = read_npy::<f32>(&lse_path);
    assert_eq!(o_dims, s.o_dims().to_vec(), "{what}: O dims");
    assert_eq!(lse_dims, s.lse_dims().to_vec(), "{what}: LSE dims");

    let scale = case.opts.scale_for(s.d_k);
    let m = case.opts.masking();
    let want = reference::attention_masked(s, &q, &k, &v, f64::from(scale), m);
    let budget = budget_masked(s, scale, (&q, &k, &v), m);
    let max_lse = want
        .lse
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |a, &y| a.max(y.abs()));
    let (mo, ml) = merge_bound(case.ranks, max_lse, amax(&v));
    let (tol_o, tol_lse) = (budget.o + mo, budget.lse * (1.0 + max_lse) + ml);
    assert_close(&format!("{what} O"), &got_o, &want.o, tol_o);
    assert_close(&format!("{what} LSE"), &got_lse, &want.lse, tol_lse);
    // Both within their bounds of the reference, so within the sum of each other.
    let (one_o, one_lse) = single(case, (&q, &k, &v));
    let wide = |x: &[f32]| -> Vec<f64> { x.iter().map(|&e| f64::from(e)).collect() };
    assert_close(
        &format!("{what} O vs one device"),
        &got_o,
        &wide(&one_o),
        tol_o + budget.o,
    );
    assert_close(
        &format!("{what} LSE vs one device"),
        &got_lse,
        &wide(&one_lse),
        tol_lse + budget.lse * (1.0 + max_lse),
    );
    // Rank 0's report: "sent (model)" and "received (model)" agree on every rank.
    assert_eq!(
        report_rows(&what, &err).len(),
        case.ranks,
        "{what}: one report line per rank: {err}"
    );
}

fn flags(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The masks and lengths the cases' flags name (M = 11, N = 57, batch 2, 4 query heads).
struct MaskData {
    /// Key padding `[batch, 1, 1, N]`.
    keep: Vec<bool>,
    /// A general bool mask `[batch, heads, M, N]`.
    general: Vec<bool>,
    /// A bias `[1, heads, M, N]`.
    bias: Vec<f32>,
}

impl MaskData {
    fn new() -> Self {
        MaskData {
            keep: random_bools(2 * 57, 0.7, 31),
            general: random_bools(2 * 4 * 11 * 57, 0.8, 32),
            bias: random(4 * 11 * 57, 1.0, 33),
        }
    }

    /// The files the flags name, written in `dir` (where `check` writes the inputs).
    fn write(&self, dir: &TempDir) {
        write_npy(&dir.path("kl.npy"), &[57i32, 30], &[2]);
        write_npy(&dir.path("ql.npy"), &[11i32, 7], &[2]);
        write_npy(&dir.path("keep.npy"), &self.keep, &[2, 1, 1, 57]);
        write_npy(&dir.path("mask.npy"), &self.general, &[2, 4, 11, 57]);
        write_npy(&dir.path("bias.npy"), &self.bias, &[1, 4, 11, 57]);
    }
}

/// Every mask kind on 2, 3 and 4 ranks, uneven and empty shards, GQA, f16 and bf16: the cases
/// the forward runs as given and the backward on LV-XAttn's ring.
fn mask_cases(d: &MaskData) -> Vec<Case> {
    let (keep, general, bias) = (&d.keep, &d.general, &d.bias);
    let gqa = AttnShape {
        batch: 2,
        m: 11,
        n: 57,
        q_heads: 4,
        kv_heads: 2,
        d_k: 8,
        d_v: 6,
    };
    vec![
        Case {
            name: "plain",
            s: gqa,
            opts: Attention::default(),
            flags: Vec::new(),
            dtype: DType::F32,
            ranks: 2,
            mode: "lv",
            shards: None,
        },
        Case {
            name: "causal-br-lens",
            s: gqa,
            opts: Attention::default()
                .with_causal(Alignment::BottomRight)
                .with_kv_lens(vec![57, 30])
                .with_q_lens(vec![11, 7]),
            flags: flags(&[
                "--causal",
                "bottom-right",
                "--kv-lens",
                "{dir}/kl.npy",
                "--q-lens",
                "{dir}/ql.npy",
            ]),
            dtype: DType::F32,
            ranks: 3,
            mode: "ring",
            shards: Some(vec![0, 20, 41, 57]),
        },
        Case {
            name: "padding-window",
            s: gqa,
            opts: Attention::default()
                .with_mask([2, 1, 1, 57], keep.clone())
                .with_window(Alignment::TopLeft, 9, 4),
            flags: flags(&[
                "--mask",
                "{dir}/keep.npy",
                "--window",
                "9",
                "4",
                "--align",
                "top-left",
            ]),
            dtype: DType::F32,
            ranks: 4,
            mode: "lv",
            shards: Some(vec![0, 13, 13, 40, 57]),
        },
        Case {
            name: "bool-bias-causal",
            s: gqa,
            opts: Attention::default()
                .with_mask([2, 4, 11, 57], general.clone())
                .with_bias([1, 4, 11, 57], bias.clone())
                .with_causal(Alignment::TopLeft)
                .with_softcap(3.0)
                .with_key_segment(10, 30, 1.5),
            flags: flags(&[
                "--mask",
                "{dir}/mask.npy",
                "--bias",
                "{dir}/bias.npy",
                "--causal",
                "top-left",
                "--softcap",
                "3",
                "--key-segment",
                "10",
                "30",
                "1.5",
            ]),
            dtype: DType::F32,
            ranks: 3,
            mode: "lv",
            shards: Some(vec![0, 0, 35, 57]),
        },
        Case {
            name: "f16-ring-empty",
            s: gqa,
            opts: Attention::default().with_causal(Alignment::BottomRight),
            flags: flags(&["--causal", "bottom-right"]),
            dtype: DType::F16,
            ranks: 4,
            mode: "ring",
            shards: Some(vec![0, 25, 25, 57, 57]),
        },
        Case {
            name: "bf16-lv-window",
            s: gqa,
            opts: Attention::default().with_window(Alignment::BottomRight, 15, 2),
            flags: flags(&[
                "--dtype",
                "bf16",
                "--window",
                "15",
                "2",
                "--align",
                "bottom-right",
            ]),
            dtype: DType::Bf16,
            ranks: 2,
            mode: "lv",
            shards: Some(vec![0, 44, 57]),
        },
    ]
}

#[test]
fn every_mask_kind_on_2_3_and_4_ranks_matches_one_device() {
    let Some(_) = engine() else { return };
    let data = MaskData::new();
    for (i, case) in mask_cases(&data).iter().enumerate() {
        let dir = TempDir::new(case.name);
        data.write(&dir);
        check(case, &dir, 5100 + i as u64);
    }
}

/// Writes q, k, v in `dir` as the case stores them (half values rounded first, f16 as a
/// float16 file, bf16 as float32 that `--dtype bf16` converts exactly) and returns the values
/// the ranks compute with.
fn write_inputs(case: &Case, dir: &TempDir, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = &case.s;
    let (q, k, v) = qkv(s, 1.0, seed);
    let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|e| case.dtype.round(e)).collect() };
    let (q, k, v) = (round(q), round(k), round(v));
    for (name, x, d) in [
        ("q", &q, s.q_dims()),
        ("k", &k, s.k_dims()),
        ("v", &v, s.v_dims()),
    ] {
        let path = dir.path(&format!("{name}.npy"));
        if case.dtype == DType::F16 {
            let h: Vec<half::f16> = x.iter().map(|&e| half::f16::from_f32(e)).collect();
            write_npy(&path, &h, &d);
        } else {
            write_npy(&path, x, &d);
        }
    }
    (q, k, v)
}

/// The lines of rank 0's report tables (those that start with a rank number), each checked:
/// bytes sent and received as counted equal the model's.
fn report_rows<'a>(what: &str, err: &'a str) -> Vec<&'a str> {
    let rows: Vec<&str> = err
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<usize>().is_ok())
        })
        .collect();
    for line in &rows {
        let w: Vec<&str> = line.split_whitespace().collect();
        let model = |x: &str| x.trim_matches(|c| c == '(' || c == ')').to_string();
        assert_eq!(w[2], model(w[3]), "{what}: sent, counted vs model: {line}");
        assert_eq!(
            w[4],
            model(w[5]),
            "{what}: received, counted vs model: {line}"
        );
    }
    rows
}

/// Runs `xattn grad --distributed` for `case` under mpirun and checks dQ, dK and dV against
/// the f64 reference backward (its budget plus the bound of the f32 sums of the partials: R
/// key shards into dQ, R query blocks into dK and dV) and the one-device backward, and both
/// report tables (forward and backward) against the byte models.
fn check_grad(case: &Case, dir: &TempDir, seed: u64) {
    let s = &case.s;
    let (q, k, v) = write_inputs(case, dir, seed);
    // dO is read as the inputs are (a float16 file for f16), rounded alike.
    let d_o: Vec<f32> = random(s.o_dims().iter().product(), 1.0, seed + 1)
        .into_iter()
        .map(|e| case.dtype.round(e))
        .collect();
    if case.dtype == DType::F16 {
        let h: Vec<half::f16> = d_o.iter().map(|&e| half::f16::from_f32(e)).collect();
        write_npy(&dir.path("d_o.npy"), &h, &s.o_dims());
    } else {
        write_npy(&dir.path("d_o.npy"), &d_o, &s.o_dims());
    }
    let mut args: Vec<String> = flags(&["grad", "--distributed", "--grad-dtype", "f32"]);
    for name in ["q", "k", "v", "d-o", "dq", "dk", "dv"] {
        let file = dir.path(&format!("{}.npy", name.replace('-', "_")));
        args.extend([format!("--{name}"), text(&file)]);
    }
    if let Some(cuts) = &case.shards {
        let cuts: Vec<String> = cuts.iter().map(usize::to_string).collect();
        args.extend(["--shards".into(), cuts.join(",")]);
    }
    args.extend(
        case.flags
            .iter()
            .map(|f| f.replace("{dir}", &text(&dir.path("")))),
    );
    let what = format!("{} R={} backward", case.name, case.ranks);
    let started = std::time::Instant::now();
    let out = mpirun(case.ranks, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: mpirun failed: {err}");
    eprintln!("{what}: {:.1} s\n{err}", started.elapsed().as_secs_f64());
    assert_eq!(
        report_rows(&what, &err).len(),
        2 * case.ranks,
        "{what}: a forward and a backward line per rank: {err}"
    );

    let scale = case.opts.scale_for(s.d_k);
    let m = case.opts.masking();
    let want = reference::attention_backward(s, (&q, &k, &v), &d_o, f64::from(scale), m);
    let b = grad_budget(s, scale, (&q, &k, &v, &d_o), m);
    // The f32 sums of R partials (the module docs of xattn::distributed::backward):
    // (R − 1)·ε·Σ|partials|, with Σ_s|dQ_s| ≤ 2·d_v·max|dO|·max|V|·|scale|·slope·max|K|,
    // Σ_b|dK_b| ≤ 2·M·g·d_v·max|dO|·max|V|·|scale|·slope·max|Q|, Σ_b|dV_b| ≤ M·g·max|dO|.
    let slope = m
        .segments
        .iter()
        .fold(1.0f64, |a, g| a.max(f64::from(g.factor.abs())));
    let sums = (case.ranks - 1) as f64 * f64::from(f32::EPSILON);
    let rows = (s.m * (s.q_heads / s.kv_heads)) as f64;
    let ds = 2.0 * s.d_v as f64 * amax(&d_o) * amax(&v) * f64::from(scale.abs()) * slope;
    let tol = [
        b.dq + sums * ds * amax(&k),
        b.dk + sums * rows * ds * amax(&q),
        b.dv + sums * rows * amax(&d_o),
    ];
    let one = engine()
        .expect("checked by the caller")
        .attention_backward_host(
            (&q, s.q_dims()),
            (&k, s.k_dims()),
            (&v, s.v_dims()),
            &d_o,
            &case.opts,
        )
        .unwrap_or_else(|e| panic!("{what} one device: {e}"))
        .1;
    for ((name, want, one, dims), tol) in [
        ("dq", &want.dq, &one.dq, s.q_dims()),
        ("dk", &want.dk, &one.dk, s.k_dims()),
        ("dv", &want.dv, &one.dv, s.v_dims()),
    ]
    .into_iter()
    .zip(tol)
    {
        let (got, got_dims) = read_npy::<f32>(&dir.path(&format!("{name}.npy")));
        assert_eq!(got_dims, dims.to_vec(), "{what}: {name} dims");
        let err = assert_close(&format!("{what} {name}"), &got, want, tol);
        // Both within their budgets of the reference, so within the sum of each other.
        let one: Vec<f64> = one.iter().map(|&x| f64::from(x)).collect();
        let apart = assert_close(
            &format!("{what} {name} vs one device"),
            &got,
            &one,
            2.0 * tol,
        );
        eprintln!(
            "{what} {name}: error {err:.1e} (tolerance {tol:.1e}), one device {apart:.1e} apart"
        );
    }
}

#[test]
fn gradients_on_2_3_and_4_ranks_match_one_device() {
    let Some(_) = engine() else { return };
    let data = MaskData::new();
    for (i, case) in mask_cases(&data).into_iter().enumerate() {
        let dir = TempDir::new(case.name);
        data.write(&dir);
        let case = Case { mode: "lv", ..case };
        check_grad(&case, &dir, 5400 + 2 * i as u64);
    }
}

#[test]
fn the_distributed_backward_refuses_what_it_cannot_do() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("grad-refusals");
    let s = AttnShape {
        batch: 1,
        m: 6,
        n: 20,
        q_heads: 2,
        kv_heads: 2,
        d_k: 4,
        d_v: 4,
    };
    let case = Case {
        name: "refusals",
        s,
        opts: Attention::default(),
        flags: Vec::new(),
        dtype: DType::F32,
        ranks: 2,
        mode: "lv",
        shards: None,
    };
    write_inputs(&case, &dir, 5500);
    write_npy(
        &dir.path("d_o.npy"),
        &random(6 * 2 * 4, 1.0, 5501),
        &s.o_dims(),
    );
    write_npy(
        &dir.path("d_o5.npy"),
        &random(5 * 2 * 4, 1.0, 5502),
        &[1, 5, 2, 4],
    );
    let dq = dir.path("dq.npy");
    let base = |d_o: &str, extra: &[&str]| -> Vec<String> {
        let mut a = flags(&["grad", "--distributed", "--dq", &text(&dq)]);
        for (flag, file) in [
            ("--q", "q.npy"),
            ("--k", "k.npy"),
            ("--v", "v.npy"),
            ("--d-o", d_o),
        ] {
            a.extend([flag.into(), text(&dir.path(file))]);
        }
        a.extend(flags(extra));
        a
    };
    for (what, args, says) in [
        (
            "ring mode",
            base("d_o.npy", &["--mode", "ring"]),
            "--mode lv",
        ),
        (
            "dropout",
            base("d_o.npy", &["--dropout", "0.1"]),
            "--dropout",
        ),
        (
            "dO of another shape",
            base("d_o5.npy", &[]),
            "dO has the shape of O",
        ),
    ] {
        let out = mpirun(2, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: mpirun should fail: {err}");
        assert!(err.contains(says), "{what}: stderr says `{says}`: {err}");
        assert!(!dq.exists(), "{what}: no output is written");
    }
}

#[test]
fn a_failing_rank_ends_every_rank_with_its_error_and_no_output() {
    let Some(_) = engine() else { return };
    let dir = TempDir::new("faults");
    let s = AttnShape {
        batch: 1,
        m: 6,
        n: 20,
        q_heads: 2,
        kv_heads: 2,
        d_k: 4,
        d_v: 4,
    };
    let (q, k, v) = qkv(&s, 1.0, 5200);
    write_npy(&dir.path("q.npy"), &q, &s.q_dims());
    write_npy(&dir.path("k.npy"), &k, &s.k_dims());
    write_npy(&dir.path("v.npy"), &v, &s.v_dims());
    let longer = AttnShape { m: 7, ..s };
    write_npy(
        &dir.path("q7.npy"),
        &random(7 * 2 * 4, 1.0, 5201),
        &longer.q_dims(),
    );
    let o = dir.path("o.npy");
    let app = |q: &str, k: &str, env: Option<&str>| -> Vec<String> {
        let mut a: Vec<String> = env
            .map(|e| vec!["env".into(), e.into()])
            .unwrap_or_default();
        a.push(env!("CARGO_BIN_EXE_xattn").into());
        a.extend(flags(&["run", "--distributed", "--out", &text(&o)]));
        for (flag, file) in [("--q", q), ("--k", k), ("--v", "v.npy")] {
            a.extend([flag.into(), text(&dir.path(file))]);
        }
        a
    };
    let cases = [
        (
            "bad input on rank 1 of 2",
            vec![
                app("q.npy", "k.npy", None),
                app("q.npy", "missing.npy", None),
            ],
            ["rank 1 of 2", "missing.npy"],
        ),
        (
            "no device on rank 2 of 3",
            vec![
                app("q.npy", "k.npy", None),
                app("q.npy", "k.npy", None),
                app("q.npy", "k.npy", Some("WGPU_ADAPTER_NAME=no-such-adapter")),
            ],
            ["rank 2 of 3", "no GPU adapter"],
        ),
        (
            "rank 1 of 2 on another call",
            vec![app("q.npy", "k.npy", None), app("q7.npy", "k.npy", None)],
            ["rank 1 of 2", "differs from rank 0's"],
        ),
    ];
    for (what, apps, says) in cases {
        let started = std::time::Instant::now();
        let out = mpirun_each(&apps);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: mpirun should fail: {err}");
        for part in says {
            assert!(err.contains(part), "{what}: stderr names `{part}`: {err}");
        }
        assert!(!o.exists(), "{what}: no output is written");
        eprintln!(
            "{what}: failed in {:.1} s as it should",
            started.elapsed().as_secs_f64()
        );
    }
}
